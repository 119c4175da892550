"""Tracing: the training-mode fx graph of one module (a *scope*), specialised to how it is called.

Only one module's own forward is traced, by :class:`.s06_tracer.Tracer` (every child a leaf, except plain
``nn.Sequential`` containers), in training mode.

How a scope's forward is called matters: fx traces every argument as a Proxy, so ``if shortcut is None:``
would bake the wrong branch; :mod:`.s11_calls` specialises such arguments (``concrete_args``) from the example
forward. Blocks of the same class, call and state share one traced graph within a plan (:func:`trace_scope`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from .s11_calls import Call, Param, specialise
from .s17_checkpointing import calls_checkpoint, candidates, flags_set, known_flags, remember
from ..errors import SurgeryError
from .s06_tracer import Tracer


@dataclass
class Traced:
    graph: fx.Graph
    params: tuple[Param, ...] | None  # None: called with *args/**kwargs filled (or unrecorded): run as called
    out_spec: Any  # a Structure (or, with list arguments, fx's TreeSpec) rebuilding the output; None: a tensor
    input_shapes: list[tuple[int, ...] | None]  # one per placeholder, from the example forward


def _trace(scope: nn.Module, path: str, concrete: dict[str, Any],
           checkpointing: tuple[tuple[str, ...], tuple[bool, ...]], leaves: frozenset[str] = frozenset(),
           varargs: bool = True) -> tuple[fx.Graph, Any]:
    was_training = scope.training
    scope.training = True  # only the scope's own flag can be baked: children are leaves
    try:
        with warnings.catch_warnings(), flags_set(scope, *checkpointing):
            warnings.simplefilter("ignore")  # fx warns about constants it cannot guard; the layout checks them
            tracer = Tracer(leaves=leaves, varargs=varargs)
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
    (:func:`_found_flags`; remembered for :func:`.s17_checkpointing.flags`).

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
    found = _found_flags(scope, path, concrete, known, params is None)
    names = (*known, *found)
    try:
        graph, structure = _trace(scope, path, concrete, (names, (False,) * len(names)), varargs=params is None)
    except SurgeryError:
        # ``if drop_connect_rate:`` (efficientnet_pytorch's MBConvBlock): a float argument the forward branches
        # on is specialised to its value in the example forward; other values run the original forward
        if call is None or not any(a.kind == "float" for a in (*call.args, *call.kwargs.values())):
            raise
        try:  # first only the optional ones (``rate=None``), then every float
            concrete, params, shapes = specialise(scope, call, floats=1)
            graph, structure = _trace(scope, path, concrete, (names, (False,) * len(names)), varargs=params is None)
        except SurgeryError:
            concrete, params, shapes = specialise(scope, call, floats=2)
            graph, structure = _trace(scope, path, concrete, (names, (False,) * len(names)), varargs=params is None)
    placeholders = sum(n.op == "placeholder" for n in graph.nodes)
    if params is not None and placeholders != len(shapes):
        raise SurgeryError(f"cannot trace module {path or '<root>'!r} ({type(scope).__name__}) with torch.fx: "
                           f"{placeholders} placeholders for the arguments {[p.describe() for p in params]}")
    remember(scope, found)
    if key is not None and _state_key(scope, concrete, known) == key:  # (unless tracing changed the module)
        cache[key] = (graph, structure, found)  # type: ignore[index]
    return Traced(graph, params, structure, shapes)


def _found_flags(scope: nn.Module, path: str, concrete: dict[str, Any], known: tuple[str, ...],
                 varargs: bool = True) -> tuple[str, ...]:
    """The boolean attributes among :func:`.s17_checkpointing.candidates` that decide whether the forward calls a
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
                graphs.append(_trace(scope, path, concrete, (names, (False,) * (len(names) - 1) + (value,)),
                                     varargs=varargs)[0])
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
    return _trace(scope, path, concrete_args(params), (names, values), leaves, varargs=params is None)[0]


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
