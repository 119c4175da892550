"""The end of the plan phase: one immutable :class:`Plan` holding, per rewritten scope, everything the install
phase (:mod:`.s28_rewrite`) needs, so that installing never traces nor analyses.

After selection (:mod:`.s22_select`) a scope's points become *sites* (:mod:`.s23_sites`); then, here, the other
graphs that scope's rewrite needs are traced: one per other value of its gradient-checkpointing flags
(:mod:`.s17_checkpointing`; a value that cannot keep its DropBlocks is a reason, warned about now), and, for the
top module, the plain Sequentials its points may be handed to (:mod:`.s24_sequentials`). ``plan()`` returns the
points of this plan, so ``plan`` refuses exactly what ``inject`` refuses.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch.fx as fx
from torch import nn

from ..errors import SurgeryError
from .._args import check_surgery_args
from ..recipe import RecipeLike, ScheduleConfig, load_recipe
from .s19_analyze import Candidate, Scope
from .s11_calls import Param
from .s17_checkpointing import calls_checkpoint, combinations, variant_flags
from .s07_kinds import is_container
from .s03_points import InsertionPoint, check_not_injected
from .s22_select import build_plan
from .s24_sequentials import Delegated, delegate
from .s23_sites import Site, missing
from .s18_trace import trace_variant
from .s02_wrappers import unwrap

CONTAINER = "dropblocks"  # the name of a scope's DropBlock ModuleDict (underscores added if it is taken)

_CHECKPOINT_HINT = ("to keep DropBlock there, checkpoint a submodule, not a closure or a lambda: "
                    "checkpoint(self.block, x), with torch.utils.checkpoint.checkpoint or timm's checkpoint_seq "
                    "called by name, through the module, as an attribute or as a functools.partial")


@dataclass(frozen=True)
class ScopePlan:
    """One scope's rewrite, decided.

    Attributes:
        path: the scope's path (``""``: the top module); ``module`` the module itself.
        container: the attribute name its DropBlocks' ``ModuleDict`` will have on ``module``.
        spatial_dims: 2 or 3 (DropBlock2d or 3d).
        points: its insertion points, in graph order; ``sites`` where each DropBlock is called (same order).
        graph: its traced training-mode graph, without DropBlocks (never changed: install copies it).
        params: how that graph takes the forward's arguments (see :mod:`.s11_calls`); ``out_spec`` its output.
        flags: the checkpointing flags the injected forward reads per call (empty: none);
        variants: per other value of ``flags``, that value's traced graph, or why it runs without DropBlock.
        delegated: the plain Sequentials that run the top module's points instead (None: the scope does).
    """

    path: str
    module: nn.Module
    container: str
    spatial_dims: int
    points: tuple[InsertionPoint, ...]
    sites: tuple[Site, ...]
    graph: fx.Graph
    params: tuple[Param, ...] | None
    out_spec: Any
    flags: tuple[str, ...]
    variants: Mapping[tuple[bool, ...], fx.Graph | str]
    delegated: tuple[Delegated, ...] | None


@dataclass(frozen=True)
class Plan:
    """Everything :func:`.s28_rewrite.inject` installs: the scopes' rewrites, in module order, and the recipe's
    schedule (carried by each DropBlock)."""

    scopes: tuple[ScopePlan, ...]
    schedule: ScheduleConfig

    @property
    def points(self) -> list[InsertionPoint]:
        """Every insertion point, in module order, then graph order."""
        return [p for s in self.scopes for p in s.points]


def _sites(points: list[tuple[Candidate, InsertionPoint]]) -> tuple[Site, ...]:
    """Where each point's DropBlock is called, keyed as in its container."""
    return tuple(Site(f"{p.kind}_{p.after}" if p.kind == "shortcut" else p.after, c.node.name,
                      c.add.name if c.kind == "shortcut" else None)  # type: ignore[union-attr]
                 for c, p in points)


def _variants(scope: Scope, sites: tuple[Site, ...], flag_names: tuple[str, ...]
              ) -> dict[tuple[bool, ...], fx.Graph | str]:
    """The traced graph of each other value of the scope's checkpointing flags (or why it has none, warned)."""
    variants: dict[tuple[bool, ...], fx.Graph | str] = {}
    main = scope.graph.python_code("self").src
    # flags of inverted sense (``no_cp``): the main graph (every flag False) checkpoints through a call it
    # recognised, so a value whose graph has no checkpoint call is the code's plain branch, not a trace through
    main_checkpoints = calls_checkpoint(scope.graph)
    for values in combinations(flag_names):
        state = ", ".join(f"{n}={v}" for n, v in zip(flag_names, values))
        try:
            graph = trace_variant(scope.module, scope.path, scope.params, flag_names, values)
        except SurgeryError as e:
            variants[values] = f"{e}; {_CHECKPOINT_HINT}"
            continue
        if graph.python_code("self").src == main:
            continue  # the flags do not change this scope's code
        if not calls_checkpoint(graph) and not main_checkpoints:
            variants[values] = f"with {state} fx traced through its checkpoint call; {_CHECKPOINT_HINT}"
            continue
        node = missing(graph, sites, like=scope.graph)
        variants[values] = graph if node is None else f"with {state} its graph has no node {node!r} to put DropBlock after"
    for values, why in variants.items():
        if isinstance(why, str):
            warnings.warn(f"dropblock_inject: module {scope.path or '<root>'!r} ({type(scope.module).__name__}) "
                          f"will run without DropBlock while {', '.join(f'{n}={v}' for n, v in zip(flag_names, values))}: "
                          f"{why}", stacklevel=5)
    return variants


def _scope_plan(scope: Scope, points: list[tuple[Candidate, InsertionPoint]]) -> ScopePlan:
    if is_container(scope.module):
        raise SurgeryError(
            f"cannot add DropBlocks to module {scope.path or '<root>'!r}: it is a {type(scope.module).__name__}, "
            f"whose forward runs every child it holds (in eval too), so it cannot hold them; put its layers in a "
            f"module of your own (an nn.Module whose forward calls them), or select blocks below it")
    name = CONTAINER
    while hasattr(scope.module, name):
        name = f"_{name}"
    sites = _sites(points)
    delegated = delegate(scope, list(sites))
    flag_names = variant_flags(scope.module) if delegated is None else ()
    variants = _variants(scope, sites, flag_names) if flag_names else {}
    return ScopePlan(scope.path, scope.module, name, scope.spatial_dims, tuple(p for _, p in points), sites,
                     scope.graph, scope.params, scope.out_spec, flag_names if variants else (),
                     MappingProxyType(variants), None if delegated is None else tuple(delegated))


def make_plan(model: nn.Module, recipe: RecipeLike, example_input: Any = None, *, with_shapes: bool = True) -> Plan:
    """The plan phase: probe the model, trace and analyse the scopes, select the points, trace what their
    rewrite needs. Changes nothing.

    Args:
        model: the network (already unwrapped).
        recipe: a recipe name, path, dict or Recipe.
        example_input: the example forward's input (default ``1x3x224x224`` where shapes are needed).
        with_shapes: the example forward must run (its failure an error) even when no rule selects by
            stride; otherwise it is tried, and a model that does not take the default input is planned
            without its facts.

    Returns:
        The immutable :class:`Plan`.

    Raises:
        RecipeError: a bad recipe, or a rule that selects nothing.
        SurgeryError: the model is already injected, holds lazy modules, or a selected module cannot be traced.
    """
    recipe = load_recipe(recipe)
    check_not_injected(model)
    built = build_plan(model, recipe, example_input, with_shapes=with_shapes)
    scopes = []
    for path, points in built.points.items():  # (a loop, not a generator: warnings name the user's line)
        scopes.append(_scope_plan(built.scopes[path], points))
    return Plan(tuple(scopes), recipe.schedule)


def plan(model: nn.Module, recipe: RecipeLike, *, example_input: Any = None) -> list[InsertionPoint]:
    """List where ``recipe`` would insert DropBlock in ``model``, changing nothing.

    Args:
        model: the network, or a wrapper holding it (DataParallel, DDP, torch.compile, an EMA copy).
        recipe: a recipe name, path, dict or :class:`~dropblock_inject.recipe.Recipe`.
        example_input: input used to compute feature shapes and strides (default ``1x3x224x224``).

    Returns:
        The insertion points of the plan ``inject`` would install, in module order then graph order.
        ``format_plan`` prints them as a table.

    Raises:
        RecipeError: a bad recipe, or a rule that selects nothing.
        SurgeryError: a selected module that torch.fx cannot trace.
    """
    check_surgery_args("plan", model, example_input)
    # the same plan phase as ``inject``'s: it refuses exactly what inject refuses
    return make_plan(unwrap(model), recipe, example_input, with_shapes=example_input is not None).points
