"""Stage 6, rewrite: insert the DropBlock nodes into each planned scope's graph and install the injected
forward (``inject``); remove it all again (``strip``).

Each rewritten scope gets a ``dropblocks`` ``ModuleDict`` holding its DropBlock modules (one per point, keyed by
the node it follows), an instance ``forward`` (:class:`~.forward.InjectedForward`), an instance
``__prepare_scriptable__`` refusing TorchScript and an instance ``_get_name`` refusing an fx trace that would
lose its DropBlocks (:class:`~.forward.RefuseRootTrace`); ``strip`` deletes exactly these (putting back what
was there), so the original objects remain.
Every rewrite is built before any module is touched, so a failure leaves the model as it was.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from ..ops import DropBlock2d, DropBlock3d
from ..recipe import RecipeLike, ScheduleConfig, load_recipe
from .analyze import Candidate, Scope
from .checkpointing import calls_checkpoint, combinations, variant_flags
from .forward import InjectedForward, RefuseRootTrace, RefuseScripting, check_not_injected, injected_modules
from .select import InsertionPoint, build_plan
from .trace import SurgeryError, trace_variant
from .wrappers import unwrap

_CONTAINER = "dropblocks"


_CHECKPOINT_HINT = ("to keep DropBlock there, checkpoint a submodule, not a closure or a lambda: "
                    "checkpoint(self.block, x), with torch.utils.checkpoint.checkpoint or timm's checkpoint_seq "
                    "called by name, through the module, as an attribute or as a functools.partial")

_OUTPUT_NOT_SAVED = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d,
                     nn.Conv3d)


def _writable(source: fx.Node, scope: nn.Module) -> bool:
    """Whether DropBlock may work in place on ``source`` (when no hook observes its producer, checked per call
    by the injected forward): a fresh BatchNorm or convolution output (exact types: subclasses such as timm's
    BatchNormAct2d end with an activation that keeps its output for backward) that nothing but the DropBlock
    reads."""
    if source.op != "call_module" or len(source.users) != 1:
        return False
    return type(scope.get_submodule(str(source.target))) in _OUTPUT_NOT_SAVED


@dataclass(frozen=True)
class _Site:
    """One DropBlock call: after node ``source`` (a branch), or between ``source`` and the addition ``add``."""

    key: str
    source: str
    add: str | None


def _insert(src: fx.Graph, sites: list[_Site], container: str, scope: nn.Module,
            like: fx.Graph | None = None) -> tuple[fx.Graph, set[str]]:
    """A copy of ``src`` with the DropBlock calls of ``sites`` (nodes found by name, and, when ``like`` is
    given, checked to do what ``like``'s nodes of that name do), and the keys of those that may work in place.
    KeyError: a node is missing or differs."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(src, {}))
    nodes = {n.name: n for n in graph.nodes}
    reference = {n.name: n for n in (like or src).nodes}
    writable = set()
    for site in sites:
        for name in (site.source, site.add):
            if name is not None and (name not in nodes or (nodes[name].op, nodes[name].target) != (
                    reference[name].op, reference[name].target)):
                raise KeyError(name)
        source = nodes[site.source]
        if site.add is None:
            with graph.inserting_after(source):
                new = graph.call_module(f"{container}.{site.key}", (source,))
            source.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        else:
            add = nodes[site.add]
            with graph.inserting_before(add):
                new = graph.call_module(f"{container}.{site.key}", (source,))
            add.replace_input_with(source, new)
        if _writable(source, scope):
            writable.add(site.key)
    graph.lint()
    return graph, writable


def _variants(scope: Scope, sites: list[_Site], container: str, flag_names: tuple[str, ...]
              ) -> tuple[dict[tuple[bool, ...], fx.Graph | str], set[str] | None]:
    """One rewritten graph per other value of the scope's checkpointing flags (or why there is none), and the
    keys that may work in place in every one of them (None: no variant)."""
    variants: dict[tuple[bool, ...], fx.Graph | str] = {}
    writable: set[str] | None = None
    main = scope.graph.python_code("self").src
    for values in combinations(flag_names):
        state = ", ".join(f"{n}={v}" for n, v in zip(flag_names, values))
        try:
            graph = trace_variant(scope.module, scope.path, scope.params, flag_names, values)
        except SurgeryError as e:
            variants[values] = f"{e}; {_CHECKPOINT_HINT}"
            continue
        if graph.python_code("self").src == main:
            continue  # the flags do not change this scope's code
        if not calls_checkpoint(graph):
            variants[values] = f"with {state} fx traced through its checkpoint call; {_CHECKPOINT_HINT}"
            continue
        try:
            variants[values], ok = _insert(graph, sites, container, scope.module, like=scope.graph)
        except KeyError as e:
            variants[values] = f"with {state} its graph has no node {e} to put DropBlock after"
            continue
        writable = ok if writable is None else writable & ok
    for values, why in variants.items():
        if isinstance(why, str):
            warnings.warn(f"dropblock_inject: module {scope.path or '<root>'!r} ({type(scope.module).__name__}) "
                          f"will run without DropBlock while {', '.join(f'{n}={v}' for n, v in zip(flag_names, values))}: "
                          f"{why}", stacklevel=4)
    return variants, writable


def _rewrite(scope: Scope, points: list[tuple[Candidate, InsertionPoint]], schedule: ScheduleConfig,
             container_name: str) -> tuple[fx.Graph, nn.ModuleDict, tuple[str, ...], dict[tuple[bool, ...], Any],
                                           tuple[tuple[str, str], ...]]:
    container = nn.ModuleDict()
    cls = DropBlock3d if scope.spatial_dims == 3 else DropBlock2d
    sites = []
    for c, point in points:
        key = f"{point.kind}_{point.after}" if point.kind == "shortcut" else point.after
        db = cls(point.block_size, point.keep_prob, per_channel=point.per_channel)
        db.point = point  # type: ignore[assignment]
        db.schedule = schedule  # type: ignore[assignment]
        container[key] = db
        sites.append(_Site(key, c.node.name, c.add.name if c.kind == "shortcut" else None))  # type: ignore[union-attr]
    graph, writable = _insert(scope.graph, sites, container_name, scope.module)
    flag_names = variant_flags(scope.module)
    variants, also = _variants(scope, sites, container_name, flag_names) if flag_names else ({}, None)
    if also is not None:
        writable &= also
    sources = {s.key: s.source for s in sites}
    producers = {n.name: str(n.target) for n in graph.nodes if n.op == "call_module"}
    inplace = tuple((f"{container_name}.{k}", producers[sources[k]]) for k in container if k in writable)
    for key, db in container.items():
        db.inplace = key in writable  # until a call finds a hook on its producer
    return graph, container, flag_names if variants else (), variants, inplace


def inject(model: nn.Module, recipe: RecipeLike, *, example_input: Any = None) -> nn.Module:
    """Insert DropBlock into ``model`` in place, where ``recipe`` says.

    Args:
        model: the network, usually with pretrained weights loaded, or a wrapper holding it (DataParallel,
            DistributedDataParallel, torch.compile's OptimizedModule, an EMA / SWA copy): the recipe then
            applies to the network inside.
        recipe: a recipe name (see :func:`~dropblock_inject.available_recipes`), path, dict or Recipe.
        example_input: input used when a rule selects by output stride (default ``1x3x224x224``); with
            path-based recipes no forward pass is run unless it is given.

    Returns:
        ``model`` itself (the wrapper, if one was given): same type, same Parameter objects, same
        ``state_dict``. Each DropBlock starts at its final keep_prob; a :class:`~dropblock_inject.KeepProbScheduler` ramps it during training.

    Raises:
        RecipeError: a bad recipe, or a rule that selects nothing.
        SurgeryError: the model is already injected, or a selected module cannot be traced. On any error
            the model is left exactly as it was.
    """
    wrapper, model = model, unwrap(model)
    recipe = load_recipe(recipe)
    check_not_injected(model)
    built = build_plan(model, recipe, example_input, with_shapes=example_input is not None)
    rewrites = []
    for path, points in built.points.items():
        scope = built.scopes[path]
        name = _CONTAINER
        while hasattr(scope.module, name):
            name = f"_{name}"
        rewrites.append((scope.module, path, name, *_rewrite(scope, points, recipe.schedule, name)))
    done: list[tuple[nn.Module, str]] = []
    try:
        for module, path, name, graph, container, flag_names, variants, inplace in rewrites:
            original = module.__dict__.get("forward")
            fwd = InjectedForward(module, graph, original, f"{type(module).__name__} {path}",
                                   built.scopes[path].params, built.scopes[path].out_spec, flag_names, variants,
                                   inplace)
            module.add_module(name, container)
            module.forward = fwd  # type: ignore[method-assign]
            module.__dict__["__prepare_scriptable__"] = RefuseScripting(
                fwd.name, module.__dict__.get("__prepare_scriptable__"))
            points = tuple(f"{'shortcut of' if db.point.kind == 'shortcut' else 'after'} {db.point.after}"
                           for db in container.values())
            module.__dict__["_get_name"] = RefuseRootTrace(module, path or "<root>", points,
                                                           module.__dict__.get("_get_name"))
            done.append((module, name))
    except Exception:
        for module, name in done:
            _undo(module)
        raise
    return wrapper


def _remove_guard(module: nn.Module, name: str, guard_type: type) -> None:
    """Delete the instance attribute ``name`` if inject stored a ``guard_type`` there, putting back what it
    shadowed (models injected before a guard existed have none)."""
    guard = module.__dict__.get(name)
    if isinstance(guard, guard_type):
        del module.__dict__[name]
        if guard.original is not None:
            module.__dict__[name] = guard.original


def _undo(module: nn.Module) -> None:
    _remove_guard(module, "_get_name", RefuseRootTrace)
    _remove_guard(module, "__prepare_scriptable__", RefuseScripting)
    fwd = module.__dict__.pop("forward")
    if fwd.original is not None:
        module.forward = fwd.original  # type: ignore[method-assign]
    for name, child in list(module.named_children()):
        if isinstance(child, nn.ModuleDict) and child and all(hasattr(c, "point") for c in child.values()):
            delattr(module, name)


def strip(model: nn.Module) -> nn.Module:
    """Remove every DropBlock that :func:`inject` inserted; a model never injected is returned unchanged.

    Args:
        model: an injected (or plain) model, or a wrapper holding one.

    Returns:
        ``model`` itself, made of its original module objects with their current (trained) weights, ready
        for TorchScript, ONNX or torch.export.
    """
    for _, module in list(injected_modules(unwrap(model))):
        _undo(module)
    return model
