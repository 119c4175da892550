"""Selection: recipe rules -> scopes -> insertion points.

Each rule picks *scopes* (the smallest modules whose own forward calls the chosen layers: the owners of
conv/norm/act leaves, never a container), by module-path glob, class name or output stride; each scope is
traced (:mod:`.s18_trace`) and analysed (:mod:`.s19_analyze`) once, and the rule keeps the candidates of the kinds
it asks for (``after``, ``shortcut``). A point chosen by several rules takes the last rule's settings.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..recipe import Recipe, RecipeError, Rule
from .s19_analyze import Candidate, Scope, analyze
from .s20_explain import explain, not_a_cnn, not_a_residual_cnn
from .s03_points import InsertionPoint
from .s07_kinds import CONV_TYPES, inside_layer, module_kind, owner, usable_scopes
from .s12_shapes import ShapeLog, call_log, default_input
from .s16_roles import Roles
from .s21_groups import block_group, in_backbone, left_out
from .s11_calls import wants_call
from ..errors import SurgeryError
from .s18_trace import trace_scope
from .s06_tracer import TRACING


def _rule_scopes(model: nn.Module, rule: Rule, modules: dict[str, nn.Module], shapes: ShapeLog | None,
                 wrappers: set[str], focus: dict[str, set[str]], roles: Roles | None = None) -> list[str]:
    """The scopes ``rule`` selects; residual wrappers tried for their addition only are added to ``wrappers``,
    and the owners of layers the globs name themselves to ``focus`` (owner -> layer paths): no point goes
    there, but an error can say why (a prediction, a pooled map) or name the module to write instead."""
    usable = usable_scopes(modules)
    if rule.modules is not None:
        # every matching block, also those nested in another match ("model.**" reaches the bottlenecks of
        # an Ultralytics C2f as well as the C2f): each is a scope of its own, calling its own layers
        chosen = [p for p in usable if p and rule.matches_path(p)]
        outer = set(chosen)
        # a glob naming layers themselves (``classifier.4``): their owner, restricted to those layers
        for p, m in modules.items():
            if p and module_kind(m) is not None and rule.matches_path(p) and not any(
                    p.startswith(q + ".") for q in outer):
                focus.setdefault(owner(p, model), set()).add(p)
    elif rule.types is not None:
        chosen = list(usable)  # any module of those classes, e.g. a wrapper holding the residual addition
    else:
        owners: dict[str, list[str]] = {}
        kinds = {p: module_kind(m) for p, m in modules.items() if p}
        for p, kind in kinds.items():
            if kind is not None and not inside_layer(p, kinds):
                owners.setdefault(owner(p, model), []).append(p)
        # residual wrappers ``x + self.fn(x)`` and blocks made of conv modules (HF MobileNetV2's InvertedResidual):
        # a module whose children hold convolutions but that calls no layer of its own
        for p, m in usable.items():
            if p not in owners and m._modules and any(
                    isinstance(c, CONV_TYPES) for child in m.children() for c in child.modules()):
                owners[p] = []
                wrappers.add(p)
        chosen = []
        for path, leaves in owners.items():
            if path not in usable:
                continue
            if rule.stride is not None and roles is not None:
                # the backbone's live feature maps at the rule's stride (a step of a residual branch: its
                # block's), none feeding attention
                group = block_group(roles, modules, path)
                if not any(roles.ran(p) and in_backbone(roles, shapes, p) and roles.is_live(p)
                           and not roles.in_attention(p) and not roles.is_gate(p)
                           and (roles.stride(p) if group is None else group) in rule.stride for p in [*leaves, path]):
                    continue
            elif rule.stride is not None and shapes is not None:
                if path in shapes.heads:
                    continue
                strides = {shapes.nominal_stride(shapes.module_output(p), path) for p in [*leaves, path]
                           if p not in shapes.heads}
                if not strides & set(rule.stride):
                    continue
            chosen.append(path)
    if rule.types is not None:
        chosen = [p for p in chosen if type(modules[p]).__name__ in rule.types
                  or f"{type(modules[p]).__module__}.{type(modules[p]).__qualname__}" in rule.types]
    return chosen


def _reached(path: str, paths: list[str], rule: Rule) -> bool:
    """Whether an untraceable ``path`` was matched by a wildcard glob that also selects blocks inside it: the
    glob reaches those, so the module is skipped with a warning instead of failing the plan."""
    wild = any(c in g for g in rule.modules or () for c in "*?")
    return wild and any(q.startswith(path + ".") for q in paths)


def _select(scope: Scope, rule: Rule, shapes: ShapeLog | None, why: dict[str, list[str]],
            focus: set[str] | None = None, roles: Roles | None = None,
            modules: dict[str, nn.Module] | None = None) -> list[Candidate]:
    """The candidates of ``scope`` that ``rule`` asks for; those it asks for but that may never get a
    DropBlock are counted in ``why`` (reason -> points). With the dataflow's ``roles``, a stride rule keeps
    backbone maps only and takes each module's stride from it (with ``modules``, a step of a residual branch
    takes its block's: see :func:`.s21_groups.block_group`)."""
    wanted = set(rule.after)
    own = roles is not None and roles.ran(scope.path)
    out_stride = roles.stride(scope.path) if own else shapes.nominal_stride(scope.output_shape, scope.path) \
        if shapes else None
    group = block_group(roles, modules, scope.path) if own and modules is not None and rule.stride else None
    selected = []
    for c in scope.candidates:
        if c.kind == "shortcut":
            if not rule.shortcut:
                continue
        elif not ("any" in wanted or c.kinds & wanted):
            continue
        if focus is not None and not (c.node.op == "call_module" and (
                f"{scope.path}.{c.node.target}" if scope.path else str(c.node.target)) in focus):
            continue
        if c.shape is not None and len(c.shape) != scope.spatial_dims + 2:
            continue  # not a feature map (e.g. a channels-last tensor or tokens)
        if rule.stride is not None:
            at = c.module if c.module is not None and roles is not None and roles.ran(c.module) else \
                scope.path if own and scope.path else None
            if at is not None:  # roles: a module of the backbone, else the (non-root) scope
                if not in_backbone(roles, shapes, at):  # type: ignore[arg-type]
                    continue
                if scope.path and shapes is not None and scope.path in shapes.heads and \
                        not roles.is_backbone(scope.path):  # type: ignore[union-attr]
                    continue  # a layer of a module fusing maps of several sizes that computes no backbone map
            elif shapes is not None and shapes.in_head(c.node, scope.path):
                continue
            stride = roles.stride(c.module) if c.module is not None and at == c.module else \
                shapes.nominal_stride(c.shape, scope.path) if shapes else None  # type: ignore[union-attr]
            in_stage = scope.residual and out_stride in rule.stride
            if not (stride in rule.stride or in_stage) if group is None else group not in rule.stride:
                continue
        reason = c.banned
        if not reason and c.shape is not None:
            if math.prod(c.shape[2:]) <= 1:  # at the stage's stride: the input is too small for it
                own = shapes.nominal_stride(c.shape, scope.path) if shapes else None
                reason = "a 1x1 map" if own is None or rule.stride is None or own in rule.stride else \
                    "a globally pooled 1x1 map"
            elif c.shape[1] == 1:
                reason = "a single-channel map"
        if reason:
            why.setdefault(reason, []).append(f"{scope.path or '<root>'}:{c.node.name} {_shape(c.shape)}")
            continue
        selected.append(c)
    return selected


def _shape(shape: tuple[int, ...] | None) -> str:
    return "x".join(map(str, shape)) if shape else "-"


@dataclass
class Selection:
    """What the rules select: the traced and analysed scopes by path, and the chosen points of those that get
    any (module order; candidates with their points, in graph order)."""

    scopes: dict[str, Scope]
    points: dict[str, list[tuple[Candidate, InsertionPoint]]]


def _needs_shapes(recipe: Recipe) -> bool:
    return any(r.stride is not None for r in recipe.rules)


def build_plan(model: nn.Module, recipe: Recipe, example_input: Any, with_shapes: bool) -> Selection:
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"expected a torch.nn.Module, got {type(model).__name__}")
    _check_not_lazy(model)
    not_a_cnn(model, recipe)
    with TRACING:
        shapes = roles = None
        # one example forward (without the user's hooks) records the shapes and the dataflow, which placement
        # is decided from; plan and inject run it alike. Only a stride rule or a given input requires it.
        try:
            shapes = ShapeLog(model, default_input() if example_input is None else example_input, dataflow=True)
        except SurgeryError:
            if with_shapes or _needs_shapes(recipe):
                raise
        if shapes is not None and shapes.flow is not None and not shapes.partial:
            roles = Roles(shapes.flow, model)
            not_a_residual_cnn(model, recipe, roles)
        return _build_plan(model, recipe, example_input, shapes, roles)


def _check_not_lazy(model: nn.Module) -> None:
    """SurgeryError if a lazy module (``LazyConv2d``) has not been initialised: tracing and the example forward
    would initialise it (changing its class and parameters), and inject leaves lazy modules as they are."""
    lazy = [p or "<root>" for p, m in model.named_modules()
            if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise SurgeryError(f"{len(lazy)} lazy module(s) of {type(model).__name__} are not initialised yet (e.g. "
                           f"{lazy[0]!r}, {type(model.get_submodule('' if lazy[0] == '<root>' else lazy[0])).__name__});"
                           f" run one forward pass of the model (model(example)) so that they take their shapes, "
                           f"then inject")


def _build_plan(model: nn.Module, recipe: Recipe, example_input: Any, shapes: ShapeLog | None,
                roles: Roles | None = None) -> Selection:
    modules = dict(model.named_modules())
    scopes: dict[str, Scope] = {}
    untraceable: dict[str, SurgeryError] = {}
    calls: list[ShapeLog | None] = [shapes] if shapes is not None else []
    chosen: dict[str, dict[tuple[str, str], tuple[Candidate, InsertionPoint]]] = defaultdict(dict)
    total = 0
    reasons: list[str] = []
    small: list[str] = []
    wrappers: set[str] = set()
    graphs: dict[Any, Any] = {}  # traced graphs shared by identical scopes, for this plan only
    for rule in recipe.rules:
        count = 0
        named = rule.modules is not None or rule.types is not None
        skipped: list[str] = []
        why: dict[str, list[str]] = {}
        focus: dict[str, set[str]] = {}
        paths = _rule_scopes(model, rule, modules, shapes, wrappers, focus, roles)
        for path in paths:
            if path in untraceable:
                if named and not _reached(path, paths, rule):
                    raise untraceable[path]
                skipped.append(str(untraceable[path]))
                continue
            if path not in scopes:
                if not calls and wants_call(modules[path]):
                    calls.append(call_log(model, example_input))  # the call pattern, once
                call = calls[0].call(path) if calls and calls[0] is not None else None
                try:
                    traced = trace_scope(modules[path], path, call, graphs)
                except SurgeryError as e:
                    if named and not _reached(path, paths, rule):  # the user named this module: an error
                        raise
                    untraceable[path] = e
                    skipped.append(str(e))
                    if path in wrappers:
                        continue  # tried for its residual addition only
                    warnings.warn(f"{e}; rule {rule.name!r} selects by output stride, so this module is left "
                                  f"without DropBlock{left_out(model, modules, path, rule, roles)}" if not named else
                                  f"{e}; rule {rule.name!r} reaches the blocks inside it by a glob, which get their "
                                  f"points; this module's own layers are left without DropBlock", stacklevel=5)
                    continue
                scopes[path] = analyze(path, modules[path], traced, shapes, roles)
            for c in _select(scopes[path], rule, shapes, why, roles=roles, modules=modules):
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
        small += why.get("a 1x1 map", []) if rule.stride is not None else []
        if count == 0:
            named_layers = _diagnose_layers(rule, modules, focus, shapes, calls, why, roles)
            reasons.append(explain(model, rule, modules, paths, why, shapes, example_input, len(skipped), roles)
                           if why or not named_layers else named_layers)
        if count == 0 and not rule.optional:
            raise RecipeError(f"rule {rule.name!r} of recipe {recipe.name!r} matches no insertion point in "
                              f"{type(model).__name__} (modules={list(rule.modules) if rule.modules else None}, "
                              f"types={list(rule.types) if rule.types else None}, "
                              f"stride={list(rule.stride) if rule.stride else None}, after={list(rule.after)}, "
                              f"shortcut={rule.shortcut}): {reasons[-1]}" + "".join(f"; skipped: {e}" for e in skipped))
    if total == 0:
        raise RecipeError(f"recipe {recipe.name!r} matches no insertion point in {type(model).__name__}: "
                          + "; ".join(dict.fromkeys(reasons))
                          + "".join(f"; skipped: {e}" for e in untraceable.values()))
    if small:
        warnings.warn(f"{len(small)} insertion points of recipe {recipe.name!r} were dropped because their maps are "
                      f"1x1 at this input size (e.g. {small[0]}); a larger example_input (such as 1x3x224x224) "
                      f"gives the full plan", stacklevel=5)
    _no_series(chosen)
    order = {name: i for i, name in enumerate(modules)}
    points = {p: sorted(chosen[p].values(), key=lambda cp: _node_order(scopes[p].graph, cp[0]))
              for p in sorted(chosen, key=order.__getitem__)}
    return Selection(scopes, points)


def _no_series(chosen: dict[str, dict[tuple[str, str], tuple[Candidate, InsertionPoint]]]) -> None:
    """A shortcut point on the output of a module (a projection shortcut) drops the skip path there: branch
    points inside that module, in it or in scopes nested in it (Hugging Face's ResNet ``shortcut``, conv then
    norm; pytorchcv's depthwise-separable ``identity_conv``), and a branch point on the module whose output (or a
    part of it: DPN's split ``conv_proj``) is the shortcut, would put DropBlocks in series on the skip path, which
    is no residual branch, and are removed."""
    for path, cands in list(chosen.items()):
        for c, _ in list(cands.values()):
            node = c.node
            while node.op in ("call_function", "call_method") and len(node.all_input_nodes) == 1:
                node = node.all_input_nodes[0]  # a part of the module's output (DPN's split projection)
            if c.kind != "shortcut" or node.op != "call_module":
                continue
            cands.pop(("branch", node.name), None)
            inner = f"{path}.{node.target}" if path else str(node.target)
            for sub in [q for q in chosen if q == inner or q.startswith(inner + ".")]:
                for key, (b, _) in list(chosen[sub].items()):
                    if b.kind == "branch":
                        del chosen[sub][key]
                if not chosen[sub]:
                    del chosen[sub]


def _diagnose_layers(rule: Rule, modules: dict[str, nn.Module], focus: dict[str, set[str]], shapes: ShapeLog | None,
                     calls: list[ShapeLog | None], why: dict[str, list[str]], roles: Roles | None = None) -> str:
    """For a rule whose globs name layers (``classifier.4``): adds to ``why`` the reasons those layers may never
    get a DropBlock; returns what to write instead when they could."""
    found = []
    for path, layers in focus.items():
        call = calls[0].call(path) if calls and calls[0] is not None else None
        try:
            scope = analyze(path, modules[path], trace_scope(modules[path], path, call), shapes, roles)
        except SurgeryError:
            continue
        found += [c.node.name for c in _select(scope, rule, shapes, why, layers, roles)]
    if not found:
        return ""
    owners = [p or "<root>" for p in focus]
    return (f"its globs name layers ({sorted(set().union(*focus.values()))[:3]}), not the modules that call them; "
            f"select their module instead (modules: {owners[:3]}) and the layers with 'after'")


def _node_order(graph: fx.Graph, c: Candidate) -> int:
    target = c.add if c.kind == "shortcut" else c.node
    return next(i for i, n in enumerate(graph.nodes) if n is target)
