"""Stage 0c, checkpointing: the gradient-checkpointing flags a scope's code reads, decided at run time.

timm modules read ``self.grad_checkpointing`` in their forward (``checkpoint_seq(self.blocks, x)``), Hugging
Face encoders ``self.gradient_checkpointing``; fx would bake the value the flag had at trace time into the graph.
So the main graph of a scope is traced with every flag off (:mod:`.trace`), one more graph per other value of
the flags, in which the checkpoint call stays one node (its modules ``get_attr`` nodes), and the injected
forward (:mod:`.forward`) picks the graph by the flags' current values. Hugging Face's
``GradientCheckpointingLayer`` decides in a class-level wrapper around the layer's own forward: the injected
forward does what that wrapper does.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import sys
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.utils.checkpoint
from torch import nn

FLAGS = ("grad_checkpointing", "gradient_checkpointing")  # timm, Hugging Face
_TORCH_CHECKPOINT = torch.utils.checkpoint.checkpoint


def wraps_checkpointing(scope: nn.Module) -> bool:
    """Whether ``scope`` is a Hugging Face ``GradientCheckpointingLayer``: its class forward is a wrapper that
    checkpoints the layer's own forward when ``gradient_checkpointing`` is on."""
    layer = getattr(sys.modules.get("transformers.modeling_layers"), "GradientCheckpointingLayer", None)
    return isinstance(layer, type) and isinstance(scope, layer)


def flags(scope: nn.Module) -> tuple[str, ...]:
    """The checkpointing flags of ``scope`` (boolean attributes named as timm and Hugging Face name them)."""
    return tuple(n for n in FLAGS if isinstance(getattr(scope, n, None), bool))


def variant_flags(scope: nn.Module) -> tuple[str, ...]:
    """The flags read by the scope's own traced code: all but the one a ``GradientCheckpointingLayer``'s
    wrapper reads (that one is decided by :func:`hf_checkpointing_on` instead)."""
    names = flags(scope)
    return tuple(n for n in names if not (n == "gradient_checkpointing" and wraps_checkpointing(scope)))


def hf_checkpointing_on(module: nn.Module) -> bool:
    """The condition under which Hugging Face's wrapper checkpoints the layer's forward (train, grad on)."""
    return bool(getattr(module, "gradient_checkpointing", False)) and module.training and torch.is_grad_enabled()


def combinations(names: tuple[str, ...]) -> Iterator[tuple[bool, ...]]:
    """Every value of ``names`` except all off (the main graph)."""
    return (values for values in itertools.product((False, True), repeat=len(names)) if any(values))


@contextlib.contextmanager
def flags_set(scope: nn.Module, names: tuple[str, ...], values: tuple[bool, ...]) -> Iterator[None]:
    """While tracing ``scope``: its flags ``names`` set to these ``values`` (restored, class attributes too), and
    the checkpoint functions its forward reaches where fx's autowrap does not look (an attribute such as
    ``self.checkpoint_fn = checkpoint``, a ``functools.partial`` of one, there or as a global of the forward's
    module) recording one call, as autowrap does for the functions called by their global names."""
    saved = {n: scope.__dict__[n] for n in names if n in scope.__dict__}
    forward = getattr(type(scope).forward, "__wrapped__", type(scope).forward)
    spaces = [scope.__dict__, *([forward.__globals__] if hasattr(forward, "__globals__") else [])]
    held = [(space, n, v) for i, space in enumerate(spaces) for n, v in list(space.items())
            if (i == 0 or isinstance(v, functools.partial)) and _checkpoint_call(v) is not None]
    try:
        for n, v in zip(names, values):
            setattr(scope, n, v)
        for space, n, v in held:
            space[n] = _recording(*_checkpoint_call(v))  # type: ignore[misc]
        yield
    finally:
        for space, n, v in held:
            space[n] = v
        for n in names:
            if n in saved:
                setattr(scope, n, saved[n])
            else:
                scope.__dict__.pop(n, None)


def checkpoint_functions() -> tuple[Callable[..., Any], ...]:
    """The checkpoint functions kept as one fx node when traced: torch's, and timm's if timm is imported."""
    found: list[Callable[..., Any]] = [torch.utils.checkpoint.checkpoint, torch.utils.checkpoint.checkpoint_sequential]
    if _TORCH_CHECKPOINT is not found[0]:  # patched since (a profiler, a test): a partial may hold the original
        found.append(_TORCH_CHECKPOINT)
    timm_helpers = sys.modules.get("timm.models._manipulate")
    for name in ("checkpoint_seq", "checkpoint"):
        fn = getattr(timm_helpers, name, None)
        if callable(fn):
            found.append(fn)
    return tuple(found)


def _checkpoint_call(value: Any) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None:
    """``value`` as (checkpoint function, bound arguments, bound keywords) if it is one or a partial of one."""
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    while isinstance(value, functools.partial):
        args, kwargs, value = value.args + args, {**value.keywords, **kwargs}, value.func
    if not any(value is f for f in checkpoint_functions()):
        return None
    return value, args, kwargs


def _recording(fn: Callable[..., Any], bound: tuple[Any, ...] = (), keywords: dict[str, Any] | None = None
               ) -> Callable[..., Any]:
    """A stand-in for ``fn`` (with ``bound`` / ``keywords`` first, as a partial) that, called on fx Proxies,
    records one ``call_function`` node of ``fn`` itself; a bound ``module.__call__`` argument becomes the module
    (fx names modules, not methods)."""

    @functools.wraps(fn)
    def record(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = bound + args, {**(keywords or {}), **kwargs}
        proxy = next((a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)), None)
        if proxy is None:
            return fn(*args, **kwargs)
        args = tuple(a.__self__ if getattr(a, "__func__", None) is nn.Module.__call__ else a for a in args)
        return proxy.tracer.create_proxy("call_function", fn, args, kwargs)

    return record


class CheckpointTracedThrough(RuntimeError):
    """Raised while tracing when a checkpoint call runs on fx Proxies (it would be inlined, not checkpointed)."""


class _Refuse:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise CheckpointTracedThrough("torch.utils.checkpoint ran on fx Proxies: the checkpoint call would be "
                                      "traced through (its function is not a module fx can name)")

    apply = __init__


@contextlib.contextmanager
def no_inline_checkpoint() -> Iterator[None]:
    """While tracing: ``torch.utils.checkpoint.checkpoint`` called through the module attribute records one
    node, and a checkpoint call that was not recorded as one node (checkpointing a closure, a checkpoint
    function held where fx cannot see it) raises instead of being traced through, inline."""
    names = ("_checkpoint_without_reentrant_generator_impl", "CheckpointFunction")
    mod = torch.utils.checkpoint
    saved = {n: mod.__dict__[n] for n in (*names, "checkpoint") if n in mod.__dict__}
    try:
        for n in saved:
            setattr(mod, n, _Refuse if n in names else _recording(saved[n]))
        yield
    finally:
        for n, v in saved.items():
            setattr(mod, n, v)


def calls_checkpoint(graph: fx.Graph) -> bool:
    """Whether ``graph`` holds a checkpoint call (else the flag's branch was traced through, inline)."""
    fns = checkpoint_functions()
    return any(n.op == "call_function" and n.target in fns for n in graph.nodes)
