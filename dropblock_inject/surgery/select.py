"""Stage 5, selection: recipe rules -> scopes -> insertion points (``plan``, ``format_plan``).

Each rule picks *scopes* (the smallest modules whose own forward calls the chosen layers: the owners of
conv/norm/act leaves, never a container), by module-path glob, class name or output stride; each scope is
traced (:mod:`.trace`) and analysed (:mod:`.analyze`) once, and the rule keeps the candidates of the kinds
it asks for (``after``, ``shortcut``). A point chosen by several rules takes the last rule's settings.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..ops import _DropBlockNd
from ..recipe import Recipe, RecipeError, RecipeLike, Rule, load_recipe
from .analyze import Candidate, Scope, analyze
from .forward import check_not_injected
from .kinds import module_kind
from .shapes import ShapeLog, call_log
from .trace import SurgeryError, trace_scope, wants_call
from .wrappers import unwrap


@dataclass(frozen=True)
class InsertionPoint:
    """Where one DropBlock goes.

    Attributes:
        module: path of the traced scope (e.g. ``"layer3.0"``).
        after: the fx node after which DropBlock is inserted (for a shortcut, the addition's shortcut
            operand, e.g. ``"x"`` for an identity shortcut or ``"downsample_1"`` for a projection).
        kind: ``"branch"`` or ``"shortcut"``.
        block_size: DropBlock's block size.
        shape: feature shape at that point for the example input, ``None`` when it was not computed.
        keep_prob: final keep_prob of this point (the schedule's target).
        drop_rate_scale: this point's drop rate relative to the recipe's.
        per_channel: independent masks per channel.
        rule: name of the recipe rule that selected it.
    """

    module: str
    after: str
    kind: str
    block_size: int
    shape: tuple[int, ...] | None
    keep_prob: float
    drop_rate_scale: float = 1.0
    per_channel: bool = True
    rule: str = ""


def _is_container(m: nn.Module) -> bool:
    return isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def _owner(path: str, model: nn.Module) -> str:
    """The module whose own forward calls the module at ``path``: its nearest ancestor that is not a
    container (Sequential, ModuleList, ModuleDict), the model itself ("") if there is none. Containers are
    never rewritten: their forward may iterate over their children, which must not gain a new one."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        anc = ".".join(parts[:i])
        if not _is_container(model.get_submodule(anc)):
            return anc
    return ""


def _inside_layer(path: str, kinds: dict[str, str | None]) -> bool:
    """Whether the module at ``path`` lies inside a conv / norm / act / unit module (the conv of a
    ConvNormAct, the activation of a BatchNormAct2d): its owner treats that module as one layer and places
    DropBlock after it, so the module's own graph must not get a DropBlock too."""
    parts = path.split(".")
    return any(kinds.get(".".join(parts[:i])) is not None for i in range(1, len(parts)))


def _rule_scopes(model: nn.Module, rule: Rule, modules: dict[str, nn.Module], shapes: ShapeLog | None) -> list[str]:
    if rule.modules is not None:
        chosen = [p for p in modules if p and rule.matches_path(p) and module_kind(modules[p]) is None
                  and not isinstance(modules[p], _DropBlockNd) and not _is_container(modules[p])]
        # a glob such as "layer3.**" also matches modules inside a block: keep the outermost match
        outer = set(chosen)
        chosen = [p for p in chosen if not any(p.startswith(q + ".") for q in outer)]
    else:
        owners = {}
        kinds = {p: module_kind(m) for p, m in modules.items() if p}
        for p, kind in kinds.items():
            if kind is not None and not _inside_layer(p, kinds):
                owners.setdefault(_owner(p, model), []).append(p)
        chosen = []
        for owner, leaves in owners.items():
            if rule.stride is not None and shapes is not None:
                strides = {shapes.stride(shapes.module_output(p)) for p in leaves}
                strides.add(shapes.stride(shapes.module_output(owner)))
                if not strides & set(rule.stride):
                    continue
            chosen.append(owner)
    if rule.types is not None:
        chosen = [p for p in chosen if type(modules[p]).__name__ in rule.types
                  or f"{type(modules[p]).__module__}.{type(modules[p]).__qualname__}" in rule.types]
    return chosen


def _select(scope: Scope, rule: Rule, shapes: ShapeLog | None) -> list[Candidate]:
    wanted = set(rule.after)
    out_stride = shapes.stride(scope.output_shape) if shapes else None
    selected = []
    for c in scope.candidates:
        if c.kind == "shortcut":
            if not rule.shortcut:
                continue
        elif not ("any" in wanted or c.kinds & wanted):
            continue
        if c.shape is not None and (len(c.shape) != scope.spatial_dims + 2 or math.prod(c.shape[2:]) <= 1):
            continue  # not a feature map (e.g. a 1x1 squeeze map, or a channels-last tensor)
        if rule.stride is not None:
            stride = shapes.stride(c.shape) if shapes else None
            in_stage = scope.residual and out_stride in rule.stride
            if c.kind == "shortcut":
                if not (in_stage or stride in rule.stride):
                    continue
            elif not (stride in rule.stride or in_stage):
                continue
        selected.append(c)
    return selected


@dataclass
class Plan:
    scopes: dict[str, Scope]
    points: dict[str, list[tuple[Candidate, InsertionPoint]]]


def _needs_shapes(recipe: Recipe) -> bool:
    return any(r.stride is not None for r in recipe.rules)


def build_plan(model: nn.Module, recipe: Recipe, example_input: Any, with_shapes: bool) -> Plan:
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"expected a torch.nn.Module, got {type(model).__name__}")
    shapes = None
    if with_shapes or _needs_shapes(recipe):
        if example_input is None:
            example_input = torch.randn(1, 3, 224, 224)
        shapes = ShapeLog(model, example_input)
    modules = dict(model.named_modules())
    scopes: dict[str, Scope] = {}
    untraceable: dict[str, SurgeryError] = {}
    calls: list[ShapeLog | None] = [shapes] if shapes is not None else []
    chosen: dict[str, dict[tuple[str, str], tuple[Candidate, InsertionPoint]]] = defaultdict(dict)
    total = 0
    for rule in recipe.rules:
        count = 0
        named = rule.modules is not None or rule.types is not None
        skipped: list[str] = []
        for path in _rule_scopes(model, rule, modules, shapes):
            if path in untraceable:
                if named:
                    raise untraceable[path]
                skipped.append(str(untraceable[path]))
                continue
            if path not in scopes:
                if not calls and wants_call(modules[path]):
                    calls.append(call_log(model, example_input))  # the call pattern, once
                call = calls[0].call(path) if calls and calls[0] is not None else None
                try:
                    traced = trace_scope(modules[path], path, call)
                except SurgeryError as e:
                    if named:  # the user named this module: an error
                        raise
                    untraceable[path] = e
                    skipped.append(str(e))
                    warnings.warn(f"{e}; rule {rule.name!r} selects by output stride, so this module is left "
                                  f"without DropBlock", stacklevel=3)
                    continue
                scopes[path] = analyze(path, modules[path], traced, shapes)
            for c in _select(scopes[path], rule, shapes):
                point = InsertionPoint(
                    module=path, after=c.node.name, kind=c.kind,
                    block_size=rule.block_size or recipe.dropblock.block_size, shape=c.shape,
                    keep_prob=recipe.keep_prob(rule), drop_rate_scale=recipe.drop_rate_scale(rule),
                    per_channel=recipe.dropblock.per_channel if rule.per_channel is None else rule.per_channel,
                    rule=rule.name)
                key = (c.kind, c.node.name if c.kind == "branch" else c.add.name)  # type: ignore[union-attr]
                chosen[path][key] = (c, point)  # a later rule overrides an earlier one
                count += 1
        total += count
        if count == 0 and not rule.optional:
            raise RecipeError(f"rule {rule.name!r} of recipe {recipe.name!r} matches no insertion point in "
                              f"{type(model).__name__} (modules={list(rule.modules) if rule.modules else None}, "
                              f"types={list(rule.types) if rule.types else None}, "
                              f"stride={list(rule.stride) if rule.stride else None}, after={list(rule.after)}, "
                              f"shortcut={rule.shortcut})" + "".join(f"; skipped: {e}" for e in skipped))
    if total == 0:
        raise RecipeError(f"recipe {recipe.name!r} matches no insertion point in {type(model).__name__}"
                          + "".join(f"; skipped: {e}" for e in untraceable.values()))
    order = {name: i for i, name in enumerate(modules)}
    points = {p: sorted(chosen[p].values(), key=lambda cp: _node_order(scopes[p].graph, cp[0]))
              for p in sorted(chosen, key=order.__getitem__)}
    return Plan(scopes, points)


def _node_order(graph: fx.Graph, c: Candidate) -> int:
    target = c.add if c.kind == "shortcut" else c.node
    return next(i for i, n in enumerate(graph.nodes) if n is target)


def plan(model: nn.Module, recipe: RecipeLike, *, example_input: Any = None) -> list[InsertionPoint]:
    """List where ``recipe`` would insert DropBlock in ``model``, changing nothing.

    Args:
        model: the network.
        recipe: a recipe name, path, dict or :class:`~dropblock_inject.recipe.Recipe`.
        example_input: input used to compute feature shapes and strides (default ``1x3x224x224``).

    Returns:
        The insertion points, in module order then graph order. ``format_plan`` prints them as a table.

    Raises:
        RecipeError: a bad recipe, or a rule that selects nothing.
        SurgeryError: a selected module that torch.fx cannot trace.
    """
    model = unwrap(model)  # DataParallel, DDP, torch.compile, EMA copies: the network inside
    recipe = load_recipe(recipe)
    check_not_injected(model)
    built = build_plan(model, recipe, example_input, with_shapes=True)
    return [p for pts in built.points.values() for _, p in pts]


def format_plan(points: Sequence[InsertionPoint]) -> str:
    """A plain-text table of insertion points with totals."""
    header = ("module", "after", "kind", "block", "keep_prob", "shape", "rule")
    rows = [(p.module, p.after, p.kind, str(p.block_size), f"{p.keep_prob:.4g}",
             "x".join(map(str, p.shape)) if p.shape else "-", p.rule) for p in points]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    branch = sum(p.kind == "branch" for p in points)
    lines.append(f"{len(points)} DropBlocks: {branch} branch, {len(points) - branch} shortcut, "
                 f"in {len({p.module for p in points})} modules")
    return "\n".join(lines)

