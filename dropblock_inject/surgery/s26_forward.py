"""The runtime side of an injected module: the callable installed as its ``forward``.

:class:`InjectedForward` runs the rewritten graph in training mode and the module's original ``forward`` in
eval mode, so eval() is the original code bit for bit and whatever fx would bake in from ``self.training``
follows train()/eval(); the gradient-checkpointing flags likewise pick their graph per call (see
:mod:`.s17_checkpointing`), and a structured output is rebuilt with its type (:mod:`.s04_outputs`). A graph traced
with specialised arguments (see :mod:`.s11_calls`) runs only for calls that match them. :class:`RefuseScripting`
makes ``torch.jit.script`` of an injected model a clear error (:mod:`.s27_roottrace` likewise refuses an fx trace of
a rewritten module as the root in training mode: fx would trace its class's forward, not this one). An fx trace
of an enclosing module calls this forward with Proxies and records its DropBlocks.
Used by :mod:`.s22_select` (is a model already injected?) and :mod:`.s28_rewrite` (installing it); depends on
:mod:`.s01_registry`, :mod:`.s04_outputs`, :mod:`.s17_checkpointing` and :mod:`.s11_calls` only.
"""

from __future__ import annotations

import copy
import functools
import inspect
import types
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch import nn

from .s17_checkpointing import hf_checkpointing_on, wraps_checkpointing
from .s04_outputs import unflatten_output
from .s11_calls import EMPTY, Param
from ..errors import SurgeryError
from .s01_registry import compile_forward, global_hooks_present


def _compile_graph(graph: fx.Graph) -> Callable[..., Any]:
    """The graph's forward as a function of the module (fx's code, compiled by torch's own helper). No node is
    marked for ``fx.wrap``, which would register its function in fx's process-wide list."""
    code = graph.python_code(root_module="self")
    return compile_forward(code.src, dict(code.globals))


def _observed(m: nn.Module) -> bool:
    """Whether a forward or backward hook (the module's own or a global one) can see ``m``'s output."""
    return bool(m._forward_hooks or m._backward_hooks) or global_hooks_present("forward", "backward")


class InjectedForward:
    """Stored as ``module.forward``: the rewritten graph in training mode, the original forward in eval.

    A graph traced with specialised arguments (see :func:`.s11_calls.specialise`) runs only for calls that match them:
    another call pattern (e.g. ``shortcut=None`` where the trace saw a tensor, a dict where it saw a tensor)
    runs the original forward, which warns unless that forward called this one in the traced pattern
    (Ultralytics' ``model(batch)`` runs ``self.forward(batch["img"])``). The scope's gradient-checkpointing ``flags`` pick one of the ``variants``
    graphs per call (a string where a value could not be traced with its checkpoint call: that call warns and
    runs the original forward); a Hugging Face ``GradientCheckpointingLayer`` checkpoints the graph as its own
    wrapper would. A DropBlock listed in ``inplace`` (with the module producing its input) writes in place only
    while no hook can observe that module's output. A plain ``Sequential`` rewritten for its owner (see
    :mod:`.s24_sequentials`) reaches the DropBlocks in its ``holder``'s container, as ``self.forward.holder``.
    Pickles (torch.save of a whole model), deep-copies and compiles; its code is regenerated from the graphs.
    """

    def __init__(self, module: nn.Module, graph: fx.Graph, original: Callable[..., Any] | None,
                 name: str, params: tuple[Param, ...] | None = None, out_spec: Any = None,
                 flags: tuple[str, ...] = (), variants: dict[tuple[bool, ...], fx.Graph | str] | None = None,
                 inplace: tuple[tuple[str, str], ...] = (), holder: nn.Module | None = None,
                 container: str = "", guards: dict[str, Any] | None = None) -> None:
        self.module = module
        self.holder = holder  # the module whose container holds the DropBlocks, when it is not ``module``
        self.graph = graph
        self.original = original  # an instance-level forward that was there before, if any
        self.name = name
        self.params = params
        self.out_spec = out_spec
        self.flags = flags
        self.variants = variants or {}
        self.inplace = inplace
        self.container = container  # the name of the DropBlocks' ModuleDict on ``holder`` (or ``module``)
        self.guards = guards or {}  # instance attribute -> the guard inject stored there (see .rewrite)
        self._fn = _compile_graph(graph)
        self._variant_fns = {k: _compile_graph(g) if isinstance(g, fx.Graph) else g
                             for k, g in self.variants.items()}
        self._checkpoints_itself = wraps_checkpointing(module)
        self._producers: list[tuple[nn.Module, nn.Module]] | None = None  # resolved on the first call
        self._names = frozenset(p.name for p in params or ())
        self._positional = sum(p.index is not None for p in params or ())
        self._falling_back = self._reentered = False  # see _fall_back

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.module.training:
            return self._original(*args, **kwargs)
        if torch.jit.is_tracing():
            raise SurgeryError(f"torch.jit.trace cannot record the random DropBlock ops of {self.name!r} in "
                               f"training mode; trace the model in eval() mode, or call "
                               f"dropblock_inject.strip(model) first")
        fn = self._fn
        if self.flags:
            key = tuple(bool(getattr(self.module, f)) for f in self.flags)
            fn = self._variant_fns.get(key, fn)  # a value absent from the variants traces as the main graph
            if isinstance(fn, str):
                warnings.warn(f"dropblock_inject: {self.name!r} runs its original forward, without DropBlock, "
                              f"while {', '.join(f'{f}={v}' for f, v in zip(self.flags, key))}: {fn}", stacklevel=2)
                return self._original(*args, **kwargs)
        if self._falling_back:
            self._reentered = True
        if self.params is not None:
            flat = self._flatten(args, kwargs)
            if flat is None:
                return self._fall_back(args, kwargs)
            args, kwargs = tuple(flat), {}
        if self.inplace and not torch.compiler.is_compiling():  # compiled DropBlocks never write in place
            self._allow_inplace()
        if self._checkpoints_itself and hf_checkpointing_on(self.module):
            return self.module._gradient_checkpointing_func(functools.partial(self._run, fn, **kwargs), *args)
        return self._run(fn, *args, **kwargs)

    def _fall_back(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A call unlike the traced one runs the original forward; it warns unless that forward called the
        module's forward again in a way that was traced (Ultralytics' ``model(batch_dict)`` computes the loss
        on ``self.forward(batch["img"])``, which runs with its DropBlocks)."""
        outer = self._falling_back, self._reentered
        self._falling_back, self._reentered = True, False
        try:
            out = self._original(*args, **kwargs)
            reentered = self._reentered
        finally:
            self._falling_back, self._reentered = outer
        if not reentered:
            warnings.warn(f"dropblock_inject: {self.name!r} was rewritten for calls with "
                          f"({', '.join(p.describe() for p in self.params or ())}) but is called otherwise; this "
                          f"call runs its original forward, without DropBlock", stacklevel=3)
        return out

    @property
    def __signature__(self) -> inspect.Signature:
        """The original forward's signature, for whoever reads ``inspect.signature(module.forward)``: torch.export
        binds the example arguments with it, Hugging Face's Trainer keeps the dataset columns it names."""
        return inspect.signature(self._original_forward())

    @property
    def __code__(self) -> types.CodeType:
        """The original forward's code object, for whoever reads ``module.forward.__code__`` (torch.export names
        its shape environment after it)."""
        return inspect.unwrap(self._original_forward()).__code__

    def _original_forward(self) -> Callable[..., Any]:
        if self.original is not None:
            return self.original
        return types.MethodType(type(self.module).forward, self.module)

    def called_module(self, target: str) -> nn.Module:
        """The module a ``call_module`` node of its graphs calls (``target`` is relative to ``module``, and
        reaches the holder's DropBlocks through ``forward.holder``)."""
        return functools.reduce(getattr, target.split("."), self.module)

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return unflatten_output(fn(self.module, *args, **kwargs), self.out_spec)

    def _original(self, *args: Any, **kwargs: Any) -> Any:
        if self.original is not None:
            return self.original(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def _allow_inplace(self) -> None:
        if self._producers is None:
            holder = self.module if self.holder is None else self.holder
            self._producers = [(holder.get_submodule(db), self.module.get_submodule(producer))
                               for db, producer in self.inplace]
        for db, producer in self._producers:
            allowed = not _observed(producer)
            if db.inplace is not allowed:
                db.inplace = allowed

    def _flatten(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any] | None:
        """The graph's placeholder values for this call, or None if it does not match the traced pattern."""
        if len(args) > self._positional or (kwargs and not self._names.issuperset(kwargs)):
            return None
        flat: list[Any] = []
        for p in self.params:  # type: ignore[union-attr]
            if p.index is not None and p.index < len(args):
                if p.name in kwargs:
                    return None
                value = args[p.index]
            elif p.name in kwargs:
                value = kwargs[p.name]
            elif p.default is not EMPTY:
                value = p.default
            else:
                return None
            if p.kind == "free":
                if (value is None and p.expect is not True) or (
                        p.expect is torch.Tensor and not isinstance(value, (torch.Tensor, fx.Proxy))):
                    return None
                flat.append(value)
            elif p.kind == "none":
                if value is not None:
                    return None
                flat.append(None)
            elif p.kind == "seq":
                if type(value) is not p.expect[0] or len(value) != p.expect[1]:
                    return None
                flat.extend(value)
            else:
                if type(value) is not type(p.expect) or value != p.expect:
                    return None
                flat.append(value)
        return flat

    def __reduce__(self) -> tuple[Any, ...]:
        return (InjectedForward, (self.module, self.graph, self.original, self.name, self.params, self.out_spec,
                                  self.flags, self.variants, self.inplace, self.holder, self.container,
                                  self.guards))

    def __deepcopy__(self, memo: dict[int, Any]) -> InjectedForward:
        return InjectedForward(copy.deepcopy(self.module, memo), copy.deepcopy(self.graph, memo),
                                copy.deepcopy(self.original, memo), self.name, self.params, self.out_spec,
                                self.flags, copy.deepcopy(self.variants, memo), self.inplace,
                                copy.deepcopy(self.holder, memo), self.container, copy.deepcopy(self.guards, memo))


class RefuseScripting:
    """Stored as ``module.__prepare_scriptable__``, which ``torch.jit.script`` calls before compiling."""

    def __init__(self, name: str, original: Callable[[], nn.Module] | None) -> None:
        self.name = name
        self.original = original  # an instance-level hook that was there before, if any

    def __call__(self) -> nn.Module:
        raise SurgeryError(f"torch.jit.script cannot compile the forward that dropblock_inject installed on "
                           f"{self.name!r}; call dropblock_inject.strip(model) before scripting (or use "
                           f"torch.jit.trace / torch.export / torch.onnx.export in eval mode, which see the "
                           f"original forward)")


def injected_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if isinstance(m.__dict__.get("forward"), InjectedForward):
            yield name, m
