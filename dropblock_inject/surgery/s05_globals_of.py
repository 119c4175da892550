"""The globals a traced forward sees: its module's, with the functions fx must record as one call replaced, in
a copy this trace owns.

fx's ``autowrap_functions`` and ``autowrap_modules`` patch the forward's module globals (and ``math``) for
the duration of a trace: process state that another thread sees half-patched. Here the traced forward is a
copy of the function bound to a copy of its globals, in which the functions the registry names (checkpointing,
padding helpers: see :mod:`.s01_registry`), partials of checkpoint functions, ``math``'s functions, and the
``torch`` / ``torch.utils.checkpoint`` modules (so that ``torch.utils.checkpoint.checkpoint(...)`` is found
too) are stand-ins recording one ``call_function`` node when called on an fx Proxy. Nothing else changes.
"""

from __future__ import annotations

import functools
import math
import types
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from .s01_registry import CHECKPOINT_MODULE, CHECKPOINT_NAMES, checkpoint_functions, leaf_functions

_MATH = tuple(v for k, v in vars(math).items() if callable(v) and not k.startswith("_"))


def recording(fn: Callable[..., Any], bound: tuple[Any, ...] = (), keywords: dict[str, Any] | None = None
              ) -> Callable[..., Any]:
    """A stand-in for ``fn`` (with ``bound`` / ``keywords`` first, as a partial) that, called on fx Proxies,
    records one ``call_function`` node of ``fn`` itself (a bound ``module.__call__`` argument becomes the
    module: fx names modules, not methods); called on anything else, it is ``fn``."""

    @functools.wraps(fn)
    def record(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = bound + args, {**(keywords or {}), **kwargs}
        proxy = next((a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)), None)
        if proxy is None:
            return fn(*args, **kwargs)
        args = tuple(a.__self__ if getattr(a, "__func__", None) is nn.Module.__call__ else a for a in args)
        return proxy.tracer.create_proxy("call_function", fn, args, kwargs)

    return record


def checkpoint_call(value: Any) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None:
    """``value`` as (checkpoint function, bound arguments, bound keywords) if it is one or a partial of one."""
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    while isinstance(value, functools.partial):
        args, kwargs, value = value.args + args, {**value.keywords, **kwargs}, value.func
    if not any(value is f for f in checkpoint_functions()):
        return None
    return value, args, kwargs


class _Namespace:
    """A module seen through a trace: ``names`` replaced, every other attribute the module's own."""

    def __init__(self, module: types.ModuleType, names: dict[str, Any]) -> None:
        self._module = module
        self.__dict__.update(names)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


_MATH_STAND_INS: dict[int, Any] = {id(f): recording(f) for f in _MATH}
_MATH_SPACE = _Namespace(math, {f.__name__: _MATH_STAND_INS[id(f)] for f in _MATH})
# the stand-ins last built, by the ids of the functions they stand in for (which they keep alive, so an id is
# never reused while it is a key); one entry: a new set of functions replaces it. A race builds it twice.
_cache: dict[tuple[int, ...], dict[int, Any]] = {}


def _stand_ins() -> dict[int, Any]:
    """id of a global value -> what the traced forward sees instead (built once per set of functions: a
    library imported later, a function registered, torch's checkpoint wrapped, make a new set)."""
    leaves = leaf_functions()
    reached = tuple(getattr(CHECKPOINT_MODULE, name, None) for name in CHECKPOINT_NAMES)
    key = tuple(map(id, (*leaves, *reached)))
    found = _cache.get(key)
    if found is not None:
        return found
    found = {**_MATH_STAND_INS, **{id(f): recording(f) for f in leaves}}
    cp = _Namespace(CHECKPOINT_MODULE, {name: recording(f) for name, f in zip(CHECKPOINT_NAMES, reached)
                                        if f is not None})
    found[id(CHECKPOINT_MODULE)] = cp
    found[id(torch.utils)] = utils = _Namespace(torch.utils, {"checkpoint": cp})
    found[id(torch)] = _Namespace(torch, {"utils": utils})
    found[id(math)] = _MATH_SPACE
    _cache.clear()
    _cache[key] = found
    return found


def _rebind(fn: types.FunctionType, space: dict[str, Any]) -> types.FunctionType:
    own = types.FunctionType(fn.__code__, space, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__ = fn.__kwdefaults__
    own.__qualname__ = fn.__qualname__
    own.__annotations__ = fn.__annotations__
    own.__module__ = fn.__module__
    return own


def _plain(fn: Any) -> bool:
    return isinstance(fn, types.FunctionType) and not hasattr(fn, "__wrapped__")


def own_space(fn: Callable[..., Any]) -> dict[str, Any] | None:
    """A copy of the globals of ``fn`` (a plain function) with the stand-ins, in which the module's own plain
    functions are rebound to the copy too (a helper of the forward calling a checkpoint function); None when
    ``fn`` is not a plain function or its globals need no stand-in."""
    if not _plain(fn):
        return None
    stand_ins = _stand_ins()
    space = fn.__globals__
    changed: dict[str, Any] = {}
    for name, value in space.items():
        # a module under any name; a function under a public name (fx's rule for its autowrap)
        new = stand_ins.get(id(value)) if isinstance(value, types.ModuleType) or not name.startswith("_") else None
        if new is None and isinstance(value, functools.partial):
            found = checkpoint_call(value)
            new = recording(*found) if found is not None else None
        if new is not None:
            changed[name] = new
    if not changed:
        return None
    own = {**space, **changed}
    for name, value in space.items():
        if name not in changed and _plain(value) and value.__globals__ is space:
            own[name] = _rebind(value, own)
    return own


def own_globals(fn: Callable[..., Any], space: dict[str, Any] | None = None) -> Callable[..., Any]:
    """``fn`` bound to ``space`` (default: :func:`own_space` of ``fn``); ``fn`` itself when it needs none (a
    decorated forward keeps its globals).

    Args:
        fn: the forward a trace is about to run (``type(scope).forward``).
        space: the globals to bind it to.

    Returns:
        A function with the same code, defaults and closure, whose globals are this trace's own.
    """
    space = own_space(fn) if space is None else space
    return fn if space is None or not _plain(fn) else _rebind(fn, space)


def own_methods(module: Any, fn: Callable[..., Any], space: dict[str, Any]) -> dict[str, Any]:
    """The methods of ``module``'s class defined next to ``fn`` (its forward), bound to ``module`` with the
    globals ``space`` (``self.forward_features(x)`` calling ``checkpoint_seq``): set as instance attributes for
    one trace, which undoes them."""
    found: dict[str, Any] = {}
    seen: set[str] = set()
    for cls in type(module).__mro__:
        for name, value in vars(cls).items():
            if name in seen:
                continue
            seen.add(name)
            if name != "forward" and _plain(value) and value.__globals__ is fn.__globals__ \
                    and name not in module.__dict__:
                found[name] = types.MethodType(_rebind(value, space), module)
    return found
