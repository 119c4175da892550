"""Checkpointing: the gradient-checkpointing flags a scope's code reads, decided at run time.

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
from typing import Iterator

import torch
import torch.fx as fx
from torch import nn

from .globals_of import checkpoint_call, recording
from .registry import checkpoint_functions, is_checkpointing_layer

FLAGS = ("grad_checkpointing", "gradient_checkpointing")  # timm, Hugging Face


def wraps_checkpointing(scope: nn.Module) -> bool:
    """Whether ``scope`` is a Hugging Face ``GradientCheckpointingLayer``: its class forward is a wrapper that
    checkpoints the layer's own forward when ``gradient_checkpointing`` is on."""
    return is_checkpointing_layer(scope)


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
    the checkpoint functions it holds as instance attributes (``self.checkpoint_fn = checkpoint``, a
    ``functools.partial`` of one) recording one call; those its forward's module holds are found by
    :func:`.globals_of.own_globals`. Only the scope's own attributes change, and are restored."""
    saved = {n: scope.__dict__[n] for n in names if n in scope.__dict__}
    held = [(n, found) for n, v in list(scope.__dict__.items()) if (found := checkpoint_call(v)) is not None]
    original = {n: scope.__dict__[n] for n, _ in held}
    try:
        for n, v in zip(names, values):
            setattr(scope, n, v)
        for n, found in held:
            scope.__dict__[n] = recording(*found)
        yield
    finally:
        scope.__dict__.update(original)
        for n in names:
            if n in saved:
                setattr(scope, n, saved[n])
            else:
                scope.__dict__.pop(n, None)


def calls_checkpoint(graph: fx.Graph) -> bool:
    """Whether ``graph`` holds a checkpoint call (else the flag's branch was traced through, inline)."""
    fns = checkpoint_functions()
    return any(n.op == "call_function" and n.target in fns for n in graph.nodes)
