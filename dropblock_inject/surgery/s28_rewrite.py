"""The install phase: from the plan phase's immutable :class:`~.s25_blueprint.Plan`, build the DropBlock modules of
each scope, insert their calls into copies of its graphs (:mod:`.s23_sites`) and install the injected forwards
(``inject``); remove it all again (``strip``). Nothing here traces or analyses.

Each rewritten scope gets a ``dropblocks`` ``ModuleDict`` holding its DropBlock modules (one per point, keyed by
the node it follows), and each module whose graph calls them an instance ``forward``
(:class:`~.s26_forward.InjectedForward`), an instance ``__prepare_scriptable__`` refusing TorchScript and an instance
``_get_name`` refusing an fx trace of it as the root in training mode, which would trace its class's forward,
without its DropBlocks (:class:`~.s27_roottrace.RefuseRootTrace`): the scope itself, or the plain Sequentials that run
the top module's points (:mod:`.s24_sequentials`). ``strip`` deletes
exactly these, as the injected forward (the module's injection record) lists them, putting back what was there,
so the original objects remain. A container (``Sequential``,
``ModuleList``, ``ModuleDict``) never holds DropBlocks: its forward runs every child it has.
Every rewrite is built before any module is touched, so a failure leaves the model as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

import torch.fx as fx
from torch import nn

from .._args import check_surgery_args
from ..recipe import RecipeLike, ScheduleConfig
from .s25_blueprint import Plan, ScopePlan, make_plan
from .s11_calls import Param
from .s26_forward import InjectedForward, RefuseScripting, injected_modules
from .s03_points import is_dropblock_container, new_dropblock
from .s27_roottrace import RefuseRootTrace
from .s24_sequentials import HOLDER
from .s23_sites import insert
from .s02_wrappers import unwrap


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


def _inplace(graph: fx.Graph, sources: dict[str, str], writable: set[str], name: str,
             container: Mapping[str, nn.Module]) -> tuple[tuple[str, str], ...]:
    """(DropBlock path from its holder, path of the module producing its input) of those that may work in
    place; the DropBlocks' flags set to match, until a call finds a hook on the producer."""
    producers = {n.name: str(n.target) for n in graph.nodes if n.op == "call_module"}
    for key, db in container.items():
        db.inplace = key in writable
    return tuple((f"{name}.{k}", producers[sources[k]]) for k in container if k in writable)


def _build(scope: ScopePlan, schedule: ScheduleConfig) -> tuple[nn.ModuleDict, list[_Install]]:
    """The scope's DropBlock container and the forwards to install: the scope's own, or those of the plain
    Sequentials that run its points (``scope.delegated``). Graphs are copied, never changed."""
    container = nn.ModuleDict({site.key: new_dropblock(point, schedule, scope.spatial_dims)
                               for site, point in zip(scope.sites, scope.points)})
    name = scope.container
    if scope.delegated is not None:
        installs = []
        for d in scope.delegated:
            graph, writable = insert(d.graph, d.sites, f"{HOLDER}.{name}", d.module)
            inplace = _inplace(graph, {s.key: s.source for s in d.sites}, writable, name,
                               {s.key: container[s.key] for s in d.sites})
            installs.append(_Install(d.module, d.name, graph, None, None, (), {}, inplace, scope.module, name))
        return container, installs
    graph, writable = insert(scope.graph, scope.sites, name, scope.module)
    variants: dict[tuple[bool, ...], Any] = {}
    for values, traced in scope.variants.items():
        if isinstance(traced, str):
            variants[values] = traced
            continue
        variants[values], ok = insert(traced, scope.sites, name, scope.module, like=scope.graph)
        writable &= ok
    inplace = _inplace(graph, {s.key: s.source for s in scope.sites}, writable, name, container)
    return container, [_Install(scope.module, scope.path, graph, scope.params, scope.out_spec, scope.flags,
                                variants, inplace, None, name)]


def install(plan: Plan) -> None:
    """The install phase: build every scope's DropBlocks and injected forwards from ``plan``, then install
    them all; on any error, take back what was installed, so the model is as it was.

    Args:
        plan: the plan phase's result (:func:`.s25_blueprint.make_plan`); it is not changed.
    """
    rewrites = [(scope.module, scope.container, *_build(scope, plan.schedule)) for scope in plan.scopes]
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
        ``state_dict``. Each DropBlock starts at its final keep_prob; a
        :class:`~dropblock_inject.KeepProbScheduler` ramps it during training.

    Raises:
        RecipeError: a bad recipe, or a rule that selects nothing.
        SurgeryError: the model is already injected, a selected module cannot be traced, or a lazy module
            (``LazyConv2d``) is not initialised yet (run one forward pass first: inject never initialises
            it), or ``model`` is Ultralytics' ``YOLO(...)`` object, whose ``train`` builds a new network: call
            ``dropblock_inject.integrations.ultralytics.add_dropblock(yolo, recipe)`` to train with DropBlock,
            or pass ``yolo.model`` for a training loop of your own. On any error the model is left exactly as
            it was.
    """
    check_surgery_args("inject", model, example_input)
    install(make_plan(unwrap(model), recipe, example_input, with_shapes=example_input is not None))
    return model


def _install(i: _Install, container: nn.ModuleDict) -> None:
    """Install the record on ``i.module``: the :class:`~.s26_forward.InjectedForward` as its ``forward``, and the
    two guards derived from it (refusing TorchScript; refusing a training-mode fx trace of the module as the
    root), which the record lists so that :func:`strip` removes exactly them."""
    module = i.module
    name = f"{type(module).__name__} {i.path}"
    keys = {str(n.target).rpartition(".")[2] for n in i.graph.find_nodes(op="call_module")}
    runs = [db for key, db in container.items() if key in keys]
    points = tuple(f"{'shortcut of' if db.point.kind == 'shortcut' else 'after'} {db.point.after}" for db in runs)
    guards = {"__prepare_scriptable__": RefuseScripting(name, module.__dict__.get("__prepare_scriptable__")),
              "_get_name": RefuseRootTrace(module, i.path or "<root>", points, module.__dict__.get("_get_name"),
                                           i.holder)}
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
    check_surgery_args("strip", model)
    for _, module in list(injected_modules(unwrap(model))):
        _undo(module)
    return model
