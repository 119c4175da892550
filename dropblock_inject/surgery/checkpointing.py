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
import itertools
import sys
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.utils.checkpoint
from torch import nn

FLAGS = ("grad_checkpointing", "gradient_checkpointing")  # timm, Hugging Face


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
    """Temporarily give the flags ``names`` of ``scope`` these ``values`` (restored, class attributes too)."""
    saved = {n: scope.__dict__[n] for n in names if n in scope.__dict__}
    try:
        for n, v in zip(names, values):
            setattr(scope, n, v)
        yield
    finally:
        for n in names:
            if n in saved:
                setattr(scope, n, saved[n])
            else:
                scope.__dict__.pop(n, None)


def checkpoint_functions() -> tuple[Callable[..., Any], ...]:
    """The checkpoint functions kept as one fx node when traced: torch's, and timm's if timm is imported."""
    found: list[Callable[..., Any]] = [torch.utils.checkpoint.checkpoint, torch.utils.checkpoint.checkpoint_sequential]
    timm_helpers = sys.modules.get("timm.models._manipulate")
    for name in ("checkpoint_seq", "checkpoint"):
        fn = getattr(timm_helpers, name, None)
        if callable(fn):
            found.append(fn)
    return tuple(found)


class CheckpointTracedThrough(RuntimeError):
    """Raised while tracing when a checkpoint call runs on fx Proxies (it would be inlined, not checkpointed)."""


class _Refuse:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise CheckpointTracedThrough("torch.utils.checkpoint ran on fx Proxies: the checkpoint call would be "
                                      "traced through (its function is not a module fx can name)")

    apply = __init__


@contextlib.contextmanager
def no_inline_checkpoint() -> Iterator[None]:
    """While tracing: a checkpoint call that was not recorded as one node (e.g. checkpointing a closure, or a
    ``functools.partial`` bound to torch's function) raises instead of being traced through, inline."""
    names = ("_checkpoint_without_reentrant_generator_impl", "CheckpointFunction")
    mod = torch.utils.checkpoint
    saved = {n: mod.__dict__[n] for n in names if n in mod.__dict__}
    try:
        for n in saved:
            setattr(mod, n, _Refuse)
        yield
    finally:
        for n, v in saved.items():
            setattr(mod, n, v)


def calls_checkpoint(graph: fx.Graph) -> bool:
    """Whether ``graph`` holds a checkpoint call (else the flag's branch was traced through, inline)."""
    fns = checkpoint_functions()
    return any(n.op == "call_function" and n.target in fns for n in graph.nodes)
