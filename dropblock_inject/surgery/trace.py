"""Stage 1, tracing: the training-mode fx graph of one module (a *scope*), specialised to how it is called.

Only one module's own forward is traced: every child is a leaf (it stays a ``call_module`` node that runs the
child's own code, reading its own ``training`` flag), except plain ``nn.Sequential`` containers, which are
traced through. Augmented assignments (``out += identity``) are recorded as the in-place operators, so the
rewritten graph does what the original code did.

How a scope's forward is called matters: fx traces every argument as a Proxy, so ``if shortcut is None:``
or ``if not isinstance(x, list):`` would bake the wrong branch, and a ``List[Tensor]`` input cannot be
indexed. Arguments that were None, lists/tuples of tensors, or plain constants in the example forward (or,
without one, parameters whose default is None) are specialised with ``concrete_args``; the injected forward
(:mod:`.forward`) checks each call against that pattern and runs the original forward when it differs.
"""

from __future__ import annotations

import functools
import inspect
import operator
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch.fx as fx
from torch import Tensor, nn

from ..ops import _DropBlockNd
from .checkpointing import checkpoint_functions, flags, flags_set, no_inline_checkpoint
from .outputs import Structure, flatten_output


class SurgeryError(RuntimeError):
    """A model that cannot be rewritten as asked: an untraceable target, or a model already injected."""


def is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


_INPLACE_OPERATORS = ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
                      "ilshift", "irshift", "imatmul")


class _Proxy(fx.Proxy):
    """An fx Proxy that records augmented assignments (``out += identity``) as the in-place operators.

    A plain Proxy has no ``__iadd__``, so Python falls back to ``out = out + identity``, and the rewritten
    graph would allocate a new tensor where the original code reused one (fx's code generator emits
    ``operator.iadd`` back as ``+=``).
    """


def _inplace(name: str) -> Callable[[fx.Proxy, Any], fx.Proxy]:
    target = getattr(operator, name)

    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", target, (self, other), {})

    method.__name__ = f"__{name}__"
    return method


for _name in _INPLACE_OPERATORS:
    setattr(_Proxy, f"__{_name}__", _inplace(_name))


class Tracer(fx.Tracer):
    """Traces one module's own forward; children are leaves, except plain Sequential containers.

    A structured output (a NamedTuple, a ``ModelOutput``, a dataclass) is returned by the graph as a flat list
    of its leaves; ``out_structure`` rebuilds it with its exact type (fx itself would turn an OrderedDict
    subclass into a plain dict).
    """

    out_structure: Structure | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not is_plain_sequential(m) or isinstance(m, _DropBlockNd)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool,
                             concrete_args: Any = None) -> tuple[Any, list[Any]]:
        @functools.wraps(root_fn)  # fx reads the signature through __wrapped__
        def flat_output(*args: Any, **kwargs: Any) -> Any:
            leaves, self.out_structure = flatten_output(root_fn(*args, **kwargs))
            return leaves if self.out_structure is not None else leaves[0]

        return super().create_args_for_root(flat_output, is_module, concrete_args)


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
    None unless ``expect`` is true.
    """

    name: str
    index: int | None  # position, None for a keyword-only parameter
    default: Any  # EMPTY when required
    kind: str
    expect: Any = None

    def describe(self) -> str:
        what = {"none": "None", "free": "any" if self.expect else "not None"}.get(self.kind)
        if self.kind == "seq":
            what = f"{self.expect[0].__name__} of {self.expect[1]} tensors"
        elif self.kind == "const":
            what = repr(self.expect)
        return f"{self.name}={what}"


@dataclass
class Traced:
    graph: fx.Graph
    params: tuple[Param, ...] | None  # None: a forward with *args/**kwargs, called as it is
    out_spec: Any  # a Structure (or, with list arguments, fx's TreeSpec) rebuilding the output; None: a tensor
    input_shapes: list[tuple[int, ...] | None]  # one per placeholder, from the example forward


@functools.lru_cache(maxsize=None)
def forward_signature(cls: type) -> inspect.Signature | None:
    try:
        return inspect.signature(inspect.unwrap(cls.forward))
    except (TypeError, ValueError):
        return None


def _specialise(scope: nn.Module, call: Call | None, floats: int = 0
                ) -> tuple[dict[str, Any], tuple[Param, ...] | None, list[tuple[int, ...] | None]]:
    """``concrete_args`` for fx, the parameter layout of the traced graph and its placeholders' shapes.
    Float arguments are placeholders (``floats`` 0), constants where the parameter defaults to None (1), or
    all constants (2)."""
    positional = [a.shapes[0] if a.kind == "tensor" else None for a in call.args] if call else []
    sig = forward_signature(type(scope))
    if sig is None:
        return {}, None, positional
    params = list(sig.parameters.values())[1:]  # without self
    if not params or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return {}, None, positional
    passed: dict[str, Any] = {}
    if call is not None:
        try:
            passed = dict(sig.bind(None, *call.args, **call.kwargs).arguments)
        except TypeError:
            call = None
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
            layout.append(Param(p.name, index, p.default, "free", arg is None or arg.kind == "other"))
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


# helpers that compute padding from a map's size in Python (``int`` of shapes, ``max``): called on a Proxy
# they fail, so fx records them as one call (module, function name), if that library is loaded
_PADDING_HELPERS = (("transformers.models.mobilenet_v1.modeling_mobilenet_v1", "apply_tf_padding"),
                    ("transformers.models.mobilenet_v2.modeling_mobilenet_v2", "apply_tf_padding"),
                    ("timm.layers.padding", "pad_same"))


def _leaf_functions() -> tuple[Callable[..., Any], ...]:
    """The functions fx records as single calls: checkpointing's and the loaded padding helpers."""
    found = [getattr(sys.modules[mod], name, None) for mod, name in _PADDING_HELPERS if mod in sys.modules]
    return (*checkpoint_functions(), *(f for f in found if callable(f)))


def _trace(scope: nn.Module, path: str, concrete: dict[str, Any],
           checkpointing: tuple[tuple[str, ...], tuple[bool, ...]]) -> tuple[fx.Graph, Any]:
    was_training = scope.training
    scope.training = True  # only the scope's own flag can be baked: children are leaves
    try:
        with warnings.catch_warnings(), flags_set(scope, *checkpointing), no_inline_checkpoint():
            warnings.simplefilter("ignore")  # fx warns about constants it cannot guard; the layout checks them
            try:  # without fx's patching of every ``math`` function: a third of the tracing time
                tracer = Tracer(autowrap_modules=(), autowrap_functions=_leaf_functions())
                graph = tracer.trace(scope, concrete_args=concrete or None)
            except Exception:  # noqa: BLE001 - e.g. ``math.sqrt(proxy)``: fx's default tracer wraps it
                tracer = Tracer(autowrap_functions=_leaf_functions())
                graph = tracer.trace(scope, concrete_args=concrete or None)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ...
        raise SurgeryError(f"cannot trace module {path or '<root>'!r} ({type(scope).__name__}) with torch.fx: "
                           f"{type(e).__name__}: {e}") from e
    finally:
        scope.training = was_training
    for node in graph.find_nodes(op="output"):
        node.type = None  # the graph returns the flat list, not the annotated type
    info = getattr(graph._codegen, "pytree_info", None)  # list arguments: fx flattened the output again
    if tracer.out_structure is None and info is not None and info.out_spec is not None:
        return graph, info.out_spec  # a one-leaf list: its spec gives the leaf back
    return graph, tracer.out_structure


_INTERNAL = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_backward_hooks",
                       "_backward_pre_hooks", "_is_full_backward_hook", "_forward_hooks", "_forward_hooks_with_kwargs",
                       "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
                       "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                       "_load_state_dict_post_hooks"})
_PLAIN = (type(None), bool, int, float, str)


def _plain(value: Any) -> bool:
    return isinstance(value, _PLAIN) or (type(value) in (tuple, list) and all(isinstance(v, _PLAIN) for v in value))


def _state_key(scope: nn.Module, concrete: dict[str, Any], names: tuple[str, ...]) -> tuple[Any, ...] | None:
    """Everything fx's trace of ``scope`` can depend on besides the code: the class, how it is called, and
    for the scope and every module under it the names, types and plain attributes (ints, strings, tuples of
    them), and its parameters' and buffers' names, shapes and dtypes. None when some attribute is anything
    else (a function, a tensor, a config object): such a scope is traced on its own."""
    if "forward" in scope.__dict__:
        return None
    call = tuple((k, type(v), len(v) if type(v) in (list, tuple) else v) for k, v in concrete.items())
    state: list[Any] = [type(scope), call, names]
    for name, m in scope.named_modules():
        attrs = [(k, tuple(v) if type(v) is list else v) for k, v in m.__dict__.items() if k not in _INTERNAL]
        if not all(_plain(v) for _, v in attrs):
            return None
        tensors = [(k, None if t is None else (tuple(t.shape), t.dtype, t.requires_grad))
                   for k, t in (*m._parameters.items(), *m._buffers.items())]
        state.append((name, type(m), tuple(attrs), tuple(tensors), frozenset(m._non_persistent_buffers_set)))
    return tuple(state)


def trace_scope(scope: nn.Module, path: str, call: Call | None = None,
                cache: dict[Any, tuple[fx.Graph, Any]] | None = None) -> Traced:
    """The training-mode graph of ``scope``, with its checkpointing flags off.

    Args:
        scope: the module whose own forward is traced.
        path: its path, for error messages.
        call: how the example forward called it (None: with its parameters' defaults).
        cache: graphs traced earlier in the same plan, by :func:`_state_key`: a scope of the same class, call
            and state (ResNet's identical blocks) shares its graph, which nothing downstream changes.

    Returns:
        The graph, its parameter layout, output structure and placeholder shapes.

    Raises:
        SurgeryError: naming ``path``, if fx cannot trace it.
    """
    concrete, params, shapes = _specialise(scope, call)
    names = flags(scope)
    key = _state_key(scope, concrete, names) if cache is not None else None
    if key is not None and key in cache:  # type: ignore[operator]
        graph, structure = cache[key]  # type: ignore[index]
        return Traced(graph, params, structure, shapes)
    try:
        graph, structure = _trace(scope, path, concrete, (names, (False,) * len(names)))
    except SurgeryError:
        # ``if drop_connect_rate:`` (efficientnet_pytorch's MBConvBlock): a float argument the forward branches
        # on is specialised to its value in the example forward; other values run the original forward
        if call is None or not any(a.kind == "float" for a in (*call.args, *call.kwargs.values())):
            raise
        try:  # first only the optional ones (``rate=None``), then every float
            concrete, params, shapes = _specialise(scope, call, floats=1)
            graph, structure = _trace(scope, path, concrete, (names, (False,) * len(names)))
        except SurgeryError:
            concrete, params, shapes = _specialise(scope, call, floats=2)
            graph, structure = _trace(scope, path, concrete, (names, (False,) * len(names)))
    placeholders = sum(n.op == "placeholder" for n in graph.nodes)
    if params is not None and placeholders != len(shapes):
        raise SurgeryError(f"cannot trace module {path or '<root>'!r} ({type(scope).__name__}) with torch.fx: "
                           f"{placeholders} placeholders for the arguments {[p.describe() for p in params]}")
    if key is not None and _state_key(scope, concrete, names) == key:  # (unless tracing changed the module)
        cache[key] = (graph, structure)  # type: ignore[index]
    return Traced(graph, params, structure, shapes)


def trace_variant(scope: nn.Module, path: str, params: tuple[Param, ...] | None, names: tuple[str, ...],
                  values: tuple[bool, ...]) -> fx.Graph:
    """The graph of ``scope`` specialised as :func:`trace_scope` did (``params``), with the checkpointing flags
    ``names`` set to ``values``; SurgeryError if fx cannot trace it."""
    concrete: dict[str, Any] = {}
    for p in params or ():
        if p.kind == "none":
            concrete[p.name] = None
        elif p.kind == "seq":
            concrete[p.name] = p.expect[0]([fx.PH] * p.expect[1])
        elif p.kind == "const":
            concrete[p.name] = p.expect
    return _trace(scope, path, concrete, (names, values))[0]


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
