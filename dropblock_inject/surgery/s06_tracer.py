"""The fx tracer of the surgery: one module's own forward, its children leaves, nothing outside it changed.

:class:`Tracer` traces a module's own forward with every child a leaf (a ``call_module`` node that runs the
child's own code, reading its own ``training`` flag), except plain ``nn.Sequential`` containers, which are
traced through. Augmented assignments (``out += identity``) are recorded as the in-place operators, so a
rewritten graph does what the original code did. What the forward assigns to the module while it is traced is
undone, and the functions the registry records as one call are found in globals owned by the trace
(:mod:`.s05_globals_of`). Used by :mod:`.s07_kinds` (is a module a conv-norm-act chain?) and :mod:`.s18_trace` (a scope's
graph).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import threading
from typing import Any, Callable, Iterator

import torch.fx as fx
from torch import nn

from .s05_globals_of import own_globals, own_methods, own_space
from .s04_outputs import Structure, flatten_output


def is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


_INPLACE_OPERATORS = ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
                      "ilshift", "irshift", "imatmul")


class _Proxy(fx.Proxy):
    """An fx Proxy that records augmented assignments (``out += identity``) as the in-place operators, and
    iterates over the parts of a ``chunk``/``split`` whose count its arguments give.

    A plain Proxy has no ``__iadd__``, so Python falls back to ``out = out + identity``, and the rewritten
    graph would allocate a new tensor where the original code reused one (fx's code generator emits
    ``operator.iadd`` back as ``+=``). A plain Proxy cannot be iterated but by unpacking into names.
    """


def _parts(node: fx.Node) -> int | None:
    """How many tensors a ``chunk(n)`` or ``split([sizes])`` node returns, when its arguments say (literals)."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op not in ("call_method", "call_function") or name not in ("chunk", "split"):
        return None
    arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks", node.kwargs.get("split_size_or_sections"))
    if name == "chunk":
        return arg if isinstance(arg, int) and not isinstance(arg, bool) and arg > 0 else None
    return len(arg) if isinstance(arg, (list, tuple)) and all(isinstance(a, int) for a in arg) else None


class _Parts(_Proxy):
    """The proxy of a ``chunk(n)``/``split([sizes])`` node: it iterates over its parts (``list(x.chunk(2, 1))``,
    Ultralytics' C2f), which fx's own Proxy does only when unpacked into names."""

    def __iter__(self) -> Iterator[fx.Proxy]:
        return iter([self[i] for i in range(_parts(self.node) or 0)])

    def __len__(self) -> int:  # ``list()`` asks for the length first
        return _parts(self.node) or 0


def _inplace(name: str) -> Callable[[fx.Proxy, Any], fx.Proxy]:
    target = getattr(operator, name)

    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", target, (self, other), {})

    method.__name__ = f"__{name}__"
    return method


for _name in _INPLACE_OPERATORS:
    setattr(_Proxy, f"__{_name}__", _inplace(_name))


TRACING = threading.RLock()
"""Held while the surgery traces or runs an example forward. fx's ``Tracer.trace`` replaces
``nn.Module.__call__`` for the whole process while it runs: a model called by another thread of ours meanwhile
(its example forward, its own trace) would be recorded into the wrong graph. Our plans take turns."""


class Tracer(fx.Tracer):
    """Traces one module's own forward; children are leaves, except plain Sequential containers.

    A structured output (a NamedTuple, a ``ModelOutput``, a dataclass) is returned by the graph as a flat list
    of its leaves; ``out_structure`` rebuilds it with its exact type (fx itself would turn an OrderedDict
    subclass into a plain dict). Nothing outside the traced module changes: the functions recorded as one
    call (checkpointing, padding helpers, ``math``: see :mod:`.s01_registry`) are found in a copy of the forward's
    globals that this trace owns (:func:`.s05_globals_of.own_globals`), not patched into their modules, and the
    plain Sequentials traced through run their code without the hooks ``Module.__call__`` would fire.
    """

    def __init__(self, leaves: frozenset[str] = frozenset(), varargs: bool = True) -> None:
        super().__init__(autowrap_modules=(), autowrap_functions=())
        self.leaves = leaves  # plain Sequentials kept as leaves too (by qualified name)
        self.varargs = varargs  # False: a forward's ``*args``/``**kwargs`` traced empty, not as placeholders
        self.out_structure: Structure | None = None

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """fx's trace, one at a time in this process (see :data:`TRACING`), leaving nothing on ``root``."""
        with TRACING, _state_kept(root) if isinstance(root, nn.Module) else contextlib.nullcontext():
            graph = super().trace(root, concrete_args)
        if not self.varargs:  # the placeholders of ``*args``/``**kwargs``, called empty
            for node in [n for n in graph.find_nodes(op="placeholder") if str(n.target).startswith("*")]:
                graph.erase_node(node)
        return graph

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not is_plain_sequential(m) or module_qualified_name in self.leaves

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if not self.is_leaf_module(m, self.path_of_module(m)):
            forward = m.forward  # its own code, without the (user's, global) hooks of ``Module.__call__``
        return super().call_module(m, forward, args, kwargs)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Parts(node, self) if _parts(node) is not None else _Proxy(node, self)

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool,
                             concrete_args: Any = None) -> tuple[Any, list[Any]]:
        space = own_space(root_fn)
        fn = own_globals(root_fn, space)
        if space is not None and is_module:  # its methods next to the forward see the same globals
            self.root.__dict__.update(own_methods(self.root, root_fn, space))  # (undone by _state_kept)

        flags = inspect.unwrap(root_fn).__code__.co_flags
        if not flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS):
            @functools.wraps(root_fn)  # fx reads the signature through __wrapped__
            def flat_output(*args: Any, **kwargs: Any) -> Any:
                return self._flat(fn(*args, **kwargs))

            return super().create_args_for_root(flat_output, is_module, concrete_args)

        # ``forward(self, x, *args, **kwargs)`` (Ultralytics'): fx rewrites the forward's own code to take them one
        # by one, so it gets the forward itself, and what it will call is wrapped after; traced empty unless
        # ``varargs``
        traced_fn, args = super().create_args_for_root(fn, is_module, concrete_args)
        if not self.varargs:
            empty = ([()] if flags & inspect.CO_VARARGS else []) + ([{}] if flags & inspect.CO_VARKEYWORDS else [])
            args = [*args[:len(args) - len(empty)], *empty]

        return lambda *args: self._flat(traced_fn(*args)), args

    def _flat(self, out: Any) -> Any:
        """The traced output as the graph returns it: its leaves, one leaf alone (:attr:`out_structure` rebuilds
        a structured one)."""
        leaves, self.out_structure = flatten_output(out)
        return leaves if self.out_structure is not None else leaves[0]


@contextlib.contextmanager
def _state_kept(scope: nn.Module) -> Iterator[None]:
    """While tracing: whatever the forward assigns to the scope (``self.last = x`` keeps an fx Proxy), its
    parameters, buffers and children, undone afterwards."""
    saved = dict(scope.__dict__)
    inner = [(d, dict(d)) for d in (scope._parameters, scope._buffers, scope._modules)]
    try:
        yield
    finally:
        for key in [k for k in scope.__dict__ if k not in saved]:
            del scope.__dict__[key]
        for key, value in saved.items():
            if scope.__dict__.get(key, saved) is not value:
                scope.__dict__[key] = value
        for d, before in inner:
            if d.keys() != before.keys() or any(d[k] is not v for k, v in before.items()):
                d.clear()
                d.update(before)
