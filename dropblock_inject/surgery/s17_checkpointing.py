"""Checkpointing: the gradient-checkpointing flags a scope's code reads, decided at run time.

timm modules read ``self.grad_checkpointing`` in their forward (``checkpoint_seq(self.blocks, x)``), Hugging
Face encoders ``self.gradient_checkpointing``, other code any boolean attribute of its own (``use_checkpoint``,
mmcv's ``with_cp``); fx would bake the value the flag had at trace time into the graph. Those other flags are
found from what the forward does, not from their names: :func:`candidates` lists the boolean attributes read by
a forward whose code can reach a checkpoint function, and :func:`.s18_trace.trace_scope` keeps those whose value
decides whether a checkpoint call is traced (:func:`remember`). So the main graph of a scope is traced with
every flag off (:mod:`.s18_trace`), one more graph per other value of the flags, in which the checkpoint call stays
one node (its modules ``get_attr`` nodes), and the injected forward (:mod:`.s26_forward`) picks the graph by the
flags' current values; while a flag whose graph fx cannot trace is on (a checkpointed closure), it runs the
original forward. Hugging Face's
``GradientCheckpointingLayer`` decides in a class-level wrapper around the layer's own forward: the injected
forward does what that wrapper does.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import types
import weakref
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn

from .s05_globals_of import checkpoint_call, recording
from .s01_registry import CHECKPOINT_MODULE, CHECKPOINT_NAMES, checkpoint_functions, is_checkpointing_layer

FLAGS = ("grad_checkpointing", "gradient_checkpointing")  # timm, Hugging Face
# the flags found in each module's code by its last trace (see :func:`remember`): a plan's later stages
# (variants, delegation) ask :func:`flags` for the same names; weak, so nothing outlives the module
_FOUND: "weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]]" = weakref.WeakKeyDictionary()


def wraps_checkpointing(scope: nn.Module) -> bool:
    """Whether ``scope`` is a Hugging Face ``GradientCheckpointingLayer``: its class forward is a wrapper that
    checkpoints the layer's own forward when ``gradient_checkpointing`` is on."""
    return is_checkpointing_layer(scope)


def known_flags(scope: nn.Module) -> tuple[str, ...]:
    """The boolean attributes of ``scope`` named as timm and Hugging Face name their checkpointing flags."""
    return tuple(n for n in FLAGS if isinstance(getattr(scope, n, None), bool))


def flags(scope: nn.Module) -> tuple[str, ...]:
    """The checkpointing flags of ``scope``: those timm and Hugging Face name, then those its last trace found
    deciding whether its forward calls a checkpoint function."""
    known = known_flags(scope)
    return (*known, *(n for n in _FOUND.get(scope, ()) if n not in known and _bool(scope, n) is not None))


def remember(scope: nn.Module, names: tuple[str, ...]) -> None:
    """Record the flags a trace of ``scope`` found in its code (an empty tuple forgets them)."""
    if names:
        _FOUND[scope] = names
    else:
        _FOUND.pop(scope, None)


def _bool(scope: nn.Module, name: str) -> bool | None:
    """The boolean ``scope.name`` (instance or class attribute, no property run), None if it is no bool."""
    if name in scope.__dict__:
        value = scope.__dict__[name]
    else:
        value = next((vars(c)[name] for c in type(scope).__mro__ if name in vars(c)), None)
    return value if isinstance(value, bool) else None


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:  # closures and comprehensions (mmcv's ``_inner_forward``)
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _reaches_checkpoint(value: Any, fns: tuple[Any, ...]) -> bool:
    """Whether ``value`` is the checkpoint module, one of the checkpoint functions ``fns`` or a partial of one."""
    while isinstance(value, functools.partial):
        value = value.func
    return value is CHECKPOINT_MODULE or any(value is f for f in fns)


def _method(cls: type, name: str) -> types.FunctionType | None:
    """The plain function ``cls.name`` of a class of the model (not of ``nn.Module``), if there is one."""
    for c in cls.__mro__:
        if c is nn.Module:
            return None
        if name in vars(c):
            found = vars(c)[name]
            return found if isinstance(found, types.FunctionType) else None
    return None


def candidates(scope: nn.Module) -> tuple[str, ...]:
    """The boolean attributes of ``scope`` (but ``training`` and the named flags) that its forward reads, when
    that forward can reach a checkpoint function: through its globals (a checkpoint function or a partial of
    one, ``torch.utils.checkpoint``), an attribute named as one of its functions, an instance attribute holding
    one, or the methods of its class and plain functions of its module it calls. Whether each decides the
    checkpoint call is for a trace to tell (see :func:`.s18_trace.trace_scope`).

    Args:
        scope: the module about to be traced.

    Returns:
        The attribute names, in the order the code first reads them; empty when no checkpoint is reachable.
    """
    forward = type(scope).forward
    forward = getattr(forward, "__wrapped__", forward)
    if not isinstance(forward, types.FunctionType):
        return ()
    read: dict[str, None] = {}
    fns = checkpoint_functions()
    reaches = False
    todo, seen = [forward], {forward}
    while todo:
        fn = todo.pop()
        for code in _codes(fn.__code__):
            for name in code.co_names:
                read.setdefault(name, None)
                found = fn.__globals__.get(name)
                reaches = reaches or name in CHECKPOINT_NAMES or _reaches_checkpoint(found, fns) \
                    or _reaches_checkpoint(scope.__dict__.get(name), fns)
                for nxt in (_method(type(scope), name), found):
                    if isinstance(nxt, types.FunctionType) and nxt not in seen and nxt.__module__ == fn.__module__:
                        seen.add(nxt)
                        todo.append(nxt)
    if not reaches:
        return ()
    return tuple(n for n in read if n != "training" and n not in FLAGS and _bool(scope, n) is not None)


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
    :func:`.s05_globals_of.own_globals`. Only the scope's own attributes change, and are restored."""
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
