"""Tracing: the training-mode fx graph of one module (a *scope*), specialised to how it is called.

Only one module's own forward is traced: every child is a leaf (it stays a ``call_module`` node that runs the
child's own code, reading its own ``training`` flag), except plain ``nn.Sequential`` containers, which are
traced through. Augmented assignments (``out += identity``) are recorded as the in-place operators, so the
rewritten graph does what the original code did.

How a scope's forward is called matters: fx traces every argument as a Proxy, so ``if shortcut is None:``
would bake the wrong branch; :mod:`.calls` specialises such arguments (``concrete_args``) from the example
forward. Blocks of the same class, call and state share one traced graph within a plan (:func:`trace_scope`).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch.fx as fx
from torch import nn

from .calls import Call, Param, specialise
from .checkpointing import calls_checkpoint, candidates, flags_set, known_flags, remember
from ..errors import SurgeryError
from .globals_of import own_globals, own_methods, own_space
from .outputs import Structure, flatten_output


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


TRACING = threading.RLock()
"""Held while the surgery traces or runs an example forward. fx's ``Tracer.trace`` replaces
``nn.Module.__call__`` for the whole process while it runs: a model called by another thread of ours meanwhile
(its example forward, its own trace) would be recorded into the wrong graph. Our plans take turns."""


class Tracer(fx.Tracer):
    """Traces one module's own forward; children are leaves, except plain Sequential containers.

    A structured output (a NamedTuple, a ``ModelOutput``, a dataclass) is returned by the graph as a flat list
    of its leaves; ``out_structure`` rebuilds it with its exact type (fx itself would turn an OrderedDict
    subclass into a plain dict). Nothing outside the traced module changes: the functions recorded as one
    call (checkpointing, padding helpers, ``math``: see :mod:`.registry`) are found in a copy of the forward's
    globals that this trace owns (:func:`.globals_of.own_globals`), not patched into their modules, and the
    plain Sequentials traced through run their code without the hooks ``Module.__call__`` would fire.
    """

    def __init__(self, leaves: frozenset[str] = frozenset()) -> None:
        super().__init__(autowrap_modules=(), autowrap_functions=())
        self.leaves = leaves  # plain Sequentials kept as leaves too (by qualified name)
        self.out_structure: Structure | None = None

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """fx's trace, one at a time in this process (see :data:`TRACING`), leaving nothing on ``root``."""
        with TRACING, _state_kept(root) if isinstance(root, nn.Module) else contextlib.nullcontext():
            return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not is_plain_sequential(m) or module_qualified_name in self.leaves

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if not self.is_leaf_module(m, self.path_of_module(m)):
            forward = m.forward  # its own code, without the (user's, global) hooks of ``Module.__call__``
        return super().call_module(m, forward, args, kwargs)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool,
                             concrete_args: Any = None) -> tuple[Any, list[Any]]:
        space = own_space(root_fn)
        fn = own_globals(root_fn, space)
        if space is not None and is_module:  # its methods next to the forward see the same globals
            self.root.__dict__.update(own_methods(self.root, root_fn, space))  # (undone by _state_kept)

        @functools.wraps(root_fn)  # fx reads the signature through __wrapped__
        def flat_output(*args: Any, **kwargs: Any) -> Any:
            leaves, self.out_structure = flatten_output(fn(*args, **kwargs))
            return leaves if self.out_structure is not None else leaves[0]

        return super().create_args_for_root(flat_output, is_module, concrete_args)


@dataclass
class Traced:
    graph: fx.Graph
    params: tuple[Param, ...] | None  # None: a forward with *args/**kwargs, called as it is
    out_spec: Any  # a Structure (or, with list arguments, fx's TreeSpec) rebuilding the output; None: a tensor
    input_shapes: list[tuple[int, ...] | None]  # one per placeholder, from the example forward


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


def _trace(scope: nn.Module, path: str, concrete: dict[str, Any],
           checkpointing: tuple[tuple[str, ...], tuple[bool, ...]], leaves: frozenset[str] = frozenset()
           ) -> tuple[fx.Graph, Any]:
    was_training = scope.training
    scope.training = True  # only the scope's own flag can be baked: children are leaves
    try:
        with warnings.catch_warnings(), flags_set(scope, *checkpointing):
            warnings.simplefilter("ignore")  # fx warns about constants it cannot guard; the layout checks them
            tracer = Tracer(leaves=leaves)
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
                cache: dict[Any, tuple[fx.Graph, Any, tuple[str, ...]]] | None = None) -> Traced:
    """The training-mode graph of ``scope``, with its checkpointing flags off: those timm and Hugging Face name,
    and any boolean attribute found deciding whether the forward calls a checkpoint function
    (:func:`_found_flags`; remembered for :func:`.checkpointing.flags`).

    Args:
        scope: the module whose own forward is traced.
        path: its path, for error messages.
        call: how the example forward called it (None: with its parameters' defaults).
        cache: graphs traced earlier in the same plan, by :func:`_state_key`: a scope of the same class, call
            and state (ResNet's identical blocks) shares its graph and flags, which nothing downstream changes.

    Returns:
        The graph, its parameter layout, output structure and placeholder shapes.

    Raises:
        SurgeryError: naming ``path``, if fx cannot trace it.
    """
    concrete, params, shapes = specialise(scope, call)
    known = known_flags(scope)
    key = _state_key(scope, concrete, known) if cache is not None else None
    if key is not None and key in cache:  # type: ignore[operator]
        graph, structure, found = cache[key]  # type: ignore[index]
        remember(scope, found)
        return Traced(graph, params, structure, shapes)
    found = _found_flags(scope, path, concrete, known)
    names = (*known, *found)
    try:
        graph, structure = _trace(scope, path, concrete, (names, (False,) * len(names)))
    except SurgeryError:
        # ``if drop_connect_rate:`` (efficientnet_pytorch's MBConvBlock): a float argument the forward branches
        # on is specialised to its value in the example forward; other values run the original forward
        if call is None or not any(a.kind == "float" for a in (*call.args, *call.kwargs.values())):
            raise
        try:  # first only the optional ones (``rate=None``), then every float
            concrete, params, shapes = specialise(scope, call, floats=1)
            graph, structure = _trace(scope, path, concrete, (names, (False,) * len(names)))
        except SurgeryError:
            concrete, params, shapes = specialise(scope, call, floats=2)
            graph, structure = _trace(scope, path, concrete, (names, (False,) * len(names)))
    placeholders = sum(n.op == "placeholder" for n in graph.nodes)
    if params is not None and placeholders != len(shapes):
        raise SurgeryError(f"cannot trace module {path or '<root>'!r} ({type(scope).__name__}) with torch.fx: "
                           f"{placeholders} placeholders for the arguments {[p.describe() for p in params]}")
    remember(scope, found)
    if key is not None and _state_key(scope, concrete, known) == key:  # (unless tracing changed the module)
        cache[key] = (graph, structure, found)  # type: ignore[index]
    return Traced(graph, params, structure, shapes)


def _found_flags(scope: nn.Module, path: str, concrete: dict[str, Any], known: tuple[str, ...]) -> tuple[str, ...]:
    """The boolean attributes among :func:`.checkpointing.candidates` that decide whether the forward calls a
    checkpoint function, whatever their names: traced off (False), the forward calls none; traced on (True),
    it calls one or fx cannot trace it (mmcv's ``if self.with_cp and x.requires_grad:``, a checkpointed
    closure: the injected forward then runs the original code while it is on). A flag of inverted sense
    (``no_cp``: off checkpoints, on does not, both traceable) counts too: the graphs are keyed by the flags'
    values, whatever they mean. Two traces per candidate, and only forwards that can reach a checkpoint
    function have candidates."""
    found: list[str] = []
    for name in candidates(scope):
        names = (*known, *found, name)
        graphs = []
        for value in (False, True):
            try:
                graphs.append(_trace(scope, path, concrete, (names, (False,) * (len(names) - 1) + (value,)))[0])
            except SurgeryError:
                graphs.append(None)
        off, on = graphs
        if off is not None and not calls_checkpoint(off) and (on is None or calls_checkpoint(on)):
            found.append(name)
        elif off is not None and on is not None and calls_checkpoint(off) and not calls_checkpoint(on):
            found.append(name)  # a flag of inverted sense (``no_cp``): the main graph checkpoints, True does not
    return tuple(found)


def trace_variant(scope: nn.Module, path: str, params: tuple[Param, ...] | None, names: tuple[str, ...],
                  values: tuple[bool, ...], leaves: frozenset[str] = frozenset()) -> fx.Graph:
    """The graph of ``scope`` specialised as :func:`trace_scope` did (``params``), with the checkpointing flags
    ``names`` set to ``values`` and the plain Sequentials named in ``leaves`` kept as leaves; SurgeryError if fx
    cannot trace it."""
    return _trace(scope, path, concrete_args(params), (names, values), leaves)[0]


def concrete_args(params: tuple[Param, ...] | None) -> dict[str, Any]:
    """fx ``concrete_args`` tracing a forward as :func:`trace_scope` specialised it (``params``): its
    ``None``, constant and list arguments fixed, the others free."""
    concrete: dict[str, Any] = {}
    for p in params or ():
        if p.kind == "none":
            concrete[p.name] = None
        elif p.kind == "seq":
            concrete[p.name] = p.expect[0]([fx.PH] * p.expect[1])
        elif p.kind == "const":
            concrete[p.name] = p.expect
    return concrete
