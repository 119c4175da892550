"""Stage 8, rewrite: build the DropBlock modules of each planned scope, insert their calls into its graph
(:mod:`.sites`) and install the injected forward (``inject``); remove it all again (``strip``).

Each rewritten scope gets a ``dropblocks`` ``ModuleDict`` holding its DropBlock modules (one per point, keyed by
the node it follows), and each module whose graph calls them an instance ``forward``
(:class:`~.forward.InjectedForward`), an instance ``__prepare_scriptable__`` refusing TorchScript and an instance
``_get_name`` making an fx trace of it trace that forward (:class:`~.roottrace.TraceInstalledForward`): the scope
itself, or the plain Sequentials that run the top module's points (:mod:`.sequentials`). ``strip`` deletes
exactly these (putting back what was there), so the original objects remain. A container (``Sequential``,
``ModuleList``, ``ModuleDict``) never holds DropBlocks: its forward runs every child it has.
Every rewrite is built before any module is touched, so a failure leaves the model as it was.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

import torch.fx as fx
from torch import nn

from ..recipe import RecipeLike, ScheduleConfig, load_recipe
from .analyze import Candidate, Scope
from .calls import Param
from .checkpointing import calls_checkpoint, combinations, variant_flags
from .forward import InjectedForward, RefuseScripting, check_not_injected, injected_modules
from .kinds import is_container
from .roottrace import TraceInstalledForward
from .points import InsertionPoint, is_dropblock_container, new_dropblock
from .select import build_plan
from .sequentials import HOLDER, delegate
from .sites import Site, insert
from ..errors import SurgeryError
from .trace import trace_variant
from .wrappers import unwrap

_CONTAINER = "dropblocks"


_CHECKPOINT_HINT = ("to keep DropBlock there, checkpoint a submodule, not a closure or a lambda: "
                    "checkpoint(self.block, x), with torch.utils.checkpoint.checkpoint or timm's checkpoint_seq "
                    "called by name, through the module, as an attribute or as a functools.partial")

def _variants(scope: Scope, sites: list[Site], container: str, flag_names: tuple[str, ...]
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
            variants[values], ok = insert(graph, sites, container, scope.module, like=scope.graph)
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


@dataclass
class _Install:
    """One module's injected forward, before it is installed."""

    module: nn.Module
    path: str
    graph: fx.Graph
    params: tuple[Param, ...] | None
    out_spec: Any
    flags: tuple[str, ...]
    variants: dict[tuple[bool, ...], Any]
    inplace: tuple[tuple[str, str], ...]
    holder: nn.Module | None  # the module holding its DropBlocks, when it is not ``module`` (see .sequentials)
    container: str  # the name of the DropBlocks' ModuleDict on ``holder`` (or ``module``)


def _dropblocks(points: list[tuple[Candidate, InsertionPoint]], scope: Scope, schedule: ScheduleConfig
                ) -> tuple[nn.ModuleDict, list[Site]]:
    """The scope's DropBlock modules by key, and where each is called."""
    container = nn.ModuleDict()
    sites = []
    for c, point in points:
        key = f"{point.kind}_{point.after}" if point.kind == "shortcut" else point.after
        container[key] = new_dropblock(point, schedule, scope.spatial_dims)
        sites.append(Site(key, c.node.name, c.add.name if c.kind == "shortcut" else None))  # type: ignore[union-attr]
    return container, sites


def _inplace(graph: fx.Graph, sources: dict[str, str], writable: set[str], name: str,
             container: Mapping[str, nn.Module]) -> tuple[tuple[str, str], ...]:
    """(DropBlock path from its holder, path of the module producing its input) of those that may work in
    place; the DropBlocks' flags set to match, until a call finds a hook on the producer."""
    producers = {n.name: str(n.target) for n in graph.nodes if n.op == "call_module"}
    for key, db in container.items():
        db.inplace = key in writable
    return tuple((f"{name}.{k}", producers[sources[k]]) for k in container if k in writable)


def _rewrite(scope: Scope, points: list[tuple[Candidate, InsertionPoint]], schedule: ScheduleConfig,
             name: str) -> tuple[nn.ModuleDict, list[_Install]]:
    """The scope's DropBlock container (``name`` on the scope's module) and the forwards to install: the
    scope's own, or those of the plain Sequentials holding all its points (:func:`.sequentials.delegate`)."""
    container, sites = _dropblocks(points, scope, schedule)
    delegated = delegate(scope, sites)
    if delegated is not None:
        installs = []
        for d in delegated:
            graph, writable = insert(d.graph, d.sites, f"{HOLDER}.{name}", d.module)
            inplace = _inplace(graph, {s.key: s.source for s in d.sites}, writable, name,
                               {s.key: container[s.key] for s in d.sites})
            installs.append(_Install(d.module, d.name, graph, None, None, (), {}, inplace, scope.module, name))
        return container, installs
    graph, writable = insert(scope.graph, sites, name, scope.module)
    flag_names = variant_flags(scope.module)
    variants, also = _variants(scope, sites, name, flag_names) if flag_names else ({}, None)
    if also is not None:
        writable &= also
    inplace = _inplace(graph, {s.key: s.source for s in sites}, writable, name, container)
    return container, [_Install(scope.module, scope.path, graph, scope.params, scope.out_spec,
                                flag_names if variants else (), variants, inplace, None, name)]


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
        if is_container(scope.module):
            raise SurgeryError(
                f"cannot add DropBlocks to module {path or '<root>'!r}: it is a {type(scope.module).__name__}, whose "
                f"forward runs every child it holds (in eval too), so it cannot hold them; put its layers in a "
                f"module of your own (an nn.Module whose forward calls them), or select blocks below it")
        rewrites.append((scope.module, name, *_rewrite(scope, points, recipe.schedule, name)))
    added: list[tuple[nn.Module, str]] = []  # containers added, to take back on failure
    installed: list[nn.Module] = []
    try:
        for owner, name, container, installs in rewrites:
            owner.add_module(name, container)
            added.append((owner, name))
            for i in installs:
                _install(i, container)
                installed.append(i.module)
    except Exception:
        for module in installed:
            _undo(module)
        for owner, name in added:
            if name in owner._modules:
                delattr(owner, name)
        raise
    return wrapper


def _install(i: _Install, container: nn.ModuleDict) -> None:
    """Install the record on ``i.module``: the :class:`~.forward.InjectedForward` as its ``forward``, and the
    two guards derived from it (refusing TorchScript; making a root fx trace trace the installed forward), which
    the record lists so that :func:`strip` removes exactly them."""
    module = i.module
    name = f"{type(module).__name__} {i.path}"
    keys = {str(n.target).rpartition(".")[2] for n in i.graph.find_nodes(op="call_module")}
    runs = [db for key, db in container.items() if key in keys]
    points = tuple(f"{'shortcut of' if db.point.kind == 'shortcut' else 'after'} {db.point.after}" for db in runs)
    guards = {"__prepare_scriptable__": RefuseScripting(name, module.__dict__.get("__prepare_scriptable__")),
              "_get_name": TraceInstalledForward(module, i.path or "<root>", points, module.__dict__.get("_get_name"))}
    fwd = InjectedForward(module, i.graph, module.__dict__.get("forward"), name, i.params, i.out_spec, i.flags,
                          i.variants, i.inplace, i.holder, i.container, guards)
    module.forward = fwd  # type: ignore[method-assign]
    module.__dict__.update(guards)


def _undo(module: nn.Module) -> None:
    """Remove what inject put on ``module``, as its record lists it: the guards (putting back what they
    shadowed), the injected forward, and the DropBlock container it names, on it or on its holder."""
    record = module.__dict__.get("forward")
    if not isinstance(record, InjectedForward):
        return
    for attr, guard in record.guards.items():
        if module.__dict__.get(attr) is guard:
            del module.__dict__[attr]
            if guard.original is not None:
                module.__dict__[attr] = guard.original
    del module.__dict__["forward"]
    if record.original is not None:
        module.forward = record.original  # type: ignore[method-assign]
    owner = module if record.holder is None else record.holder
    if is_dropblock_container(owner._modules.get(record.container)):  # type: ignore[arg-type]
        delattr(owner, record.container)


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
