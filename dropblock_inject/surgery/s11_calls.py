"""How a scope is called: the arguments the example forward passed it, and how its traced graph takes them.

fx traces every argument as a Proxy, so an argument that was None, a list/tuple of tensors, a plain constant
(or a float the forward branches on) in the example forward is specialised with ``concrete_args``
(:func:`specialise`); :class:`Param` records the resulting layout, which the injected forward
(:mod:`.s26_forward`) checks every call against. Used by :mod:`.s18_trace`, :mod:`.s12_shapes` and :mod:`.s26_forward`.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import Tensor, nn


@dataclass(frozen=True)
class Arg:
    """One argument of a module call in the example forward."""

    kind: str  # "tensor" | "none" | "seq" (list/tuple of tensors) | "const" (bool/int/str) | "float" | "other"
    shapes: tuple[tuple[int, ...], ...] = ()  # "tensor": its shape; "seq": one per element
    value: Any = None  # "const": the value; "seq": list or tuple


def describe(value: Any) -> Arg:
    if isinstance(value, Tensor):
        return Arg("tensor", (tuple(value.shape),))
    if value is None:
        return Arg("none")
    if type(value) in (list, tuple) and value and all(isinstance(t, Tensor) for t in value):
        return Arg("seq", tuple(tuple(t.shape) for t in value), type(value))
    if type(value) in (bool, int, str):
        return Arg("const", value=value)
    if type(value) is float:
        return Arg("float", value=value)
    return Arg("other")


@dataclass(frozen=True)
class Call:
    """The first call of a module in the example forward."""

    args: tuple[Arg, ...]
    kwargs: dict[str, Arg]


EMPTY = inspect.Parameter.empty


@dataclass(frozen=True)
class Param:
    """How the traced graph takes one parameter of the scope's forward.

    ``kind`` "none" / "seq" / "const": specialised at trace time to None, a list (or tuple) of ``expect[1]``
    tensors of type ``expect[0]``, or the constant ``expect``; "free": one placeholder, which must not be
    None unless ``expect`` is True, and must be a Tensor where ``expect`` is ``Tensor`` (the example passed one:
    a forward that branches on ``isinstance(x, dict)`` was traced for tensors only).
    """

    name: str
    index: int | None  # position, None for a keyword-only parameter
    default: Any  # EMPTY when required
    kind: str
    expect: Any = None

    def describe(self) -> str:
        what = {"none": "None", "free": "any" if self.expect is True else "Tensor" if self.expect is Tensor
                else "not None"}.get(self.kind)
        if self.kind == "seq":
            what = f"{self.expect[0].__name__} of {self.expect[1]} tensors"
        elif self.kind == "const":
            what = repr(self.expect)
        return f"{self.name}={what}"


@functools.lru_cache(maxsize=None)
def forward_signature(cls: type) -> inspect.Signature | None:
    try:
        return inspect.signature(inspect.unwrap(cls.forward))
    except (TypeError, ValueError):
        return None


def specialise(scope: nn.Module, call: Call | None, floats: int = 0
                ) -> tuple[dict[str, Any], tuple[Param, ...] | None, list[tuple[int, ...] | None]]:
    """``concrete_args`` for fx, the parameter layout of the traced graph and its placeholders' shapes.
    Float arguments are placeholders (``floats`` 0), constants where the parameter defaults to None (1), or
    all constants (2)."""
    positional = [a.shapes[0] if a.kind == "tensor" else None for a in call.args] if call else []
    sig = forward_signature(type(scope))
    if sig is None:
        return {}, None, positional
    params = list(sig.parameters.values())[1:]  # without self
    var = {p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if not params or (var and call is None):
        return {}, None, positional
    passed: dict[str, Any] = {}
    if call is not None:
        try:
            passed = dict(sig.bind(None, *call.args, **call.kwargs).arguments)
        except TypeError:
            call = None
    if var and (call is None or any(passed.get(name) for name in var)):
        return {}, None, positional  # ``*args``/``**kwargs`` given: the forward is called as it is
    params = [p for p in params if p.name not in var]  # ``*args``/``**kwargs`` left empty: traced empty
    concrete: dict[str, Any] = {}
    layout: list[Param] = []
    shapes: list[tuple[int, ...] | None] = []
    for i, p in enumerate(params):
        index = None if p.kind is p.KEYWORD_ONLY else i
        if call is None:
            arg = Arg("none") if p.default is None else None
        elif p.name in passed:
            arg = passed[p.name]
        else:
            arg = describe(p.default)
        if arg is not None and arg.kind == "float":
            const = floats == 2 or (floats == 1 and p.default is None)
            arg = Arg("const", value=arg.value) if const else Arg("other")
        if arg is None or arg.kind in ("tensor", "other"):
            layout.append(Param(p.name, index, p.default, "free",
                                Tensor if arg is not None and arg.kind == "tensor" else arg is None or arg.kind == "other"))
            shapes.append(arg.shapes[0] if arg is not None and arg.kind == "tensor" else None)
        elif arg.kind == "none":
            concrete[p.name] = None
            layout.append(Param(p.name, index, p.default, "none"))
            shapes.append(None)
        elif arg.kind == "seq":
            concrete[p.name] = arg.value([fx.PH] * len(arg.shapes))
            layout.append(Param(p.name, index, p.default, "seq", (arg.value, len(arg.shapes))))
            shapes.extend(arg.shapes)
        else:
            concrete[p.name] = arg.value
            layout.append(Param(p.name, index, p.default, "const", arg.value))
            shapes.append(None)
    return concrete, tuple(layout), shapes


def wants_call(scope: nn.Module) -> bool:
    """Whether tracing ``scope`` depends on how it is called: a forward taking more than one argument,
    optional ones, or an input annotated as something other than a Tensor (e.g. ``List[Tensor]``)."""
    sig = forward_signature(type(scope))
    if sig is None:
        return True
    params = list(sig.parameters.values())[1:]
    if len(params) != 1:
        return True
    p = params[0]
    return p.kind is not p.POSITIONAL_OR_KEYWORD or p.default is not EMPTY or p.annotation not in (
        EMPTY, Tensor, "Tensor", "torch.Tensor")
