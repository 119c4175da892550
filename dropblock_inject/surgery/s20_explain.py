"""Explanations: why a rule selects nothing, and whether a model is a CNN at all.

Used by :mod:`.s22_select` when a rule or a recipe matches no insertion point: module paths or classes that do
not exist (with the closest ones that do), maps too small for the stride asked for, a model with no
stride-16/32 stage in its backbone (naming the largest stride found and the path rule to write instead,
and where the maps at the rule's strides are: a neck or head, thrown away, attention), or points that may
never get a DropBlock (predictions, pooled, single-channel or 1x1 maps).
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from ..recipe import Recipe, RecipeError, Rule
from .s07_kinds import CONV_TYPES, owner, usable_scopes
from .s12_shapes import ShapeLog
from .s16_roles import Roles


def not_a_cnn(model: nn.Module, recipe: Recipe) -> None:
    """RecipeError if a recipe selecting by stride only meets a model with at most one convolution (a
    vision transformer's patch embedding): it has no convolutional stage for DropBlock."""
    if any(r.modules is not None or r.types is not None or r.stride is None for r in recipe.rules):
        return
    convs = [p for p, m in model.named_modules() if isinstance(m, CONV_TYPES)]
    if len(convs) <= 1:
        raise RecipeError(f"recipe {recipe.name!r}: {type(model).__name__} is not a CNN: it has "
                          f"{len(convs)} convolution{'' if len(convs) == 1 else 's'}"
                          f"{f' ({convs[0]!r}, a patch embedding?)' if convs else ''} and no convolutional stage "
                          f"for DropBlock; name modules by path (modules: [...]) to place it anyway")


def not_a_residual_cnn(model: nn.Module, recipe: Recipe, roles: Roles) -> None:
    """RecipeError if a recipe selecting by stride only meets a model that computes attention and whose
    backbone has no residual conv stage at stride 16 or 32 (a transformer with a conv stem or decoder, as
    the recorded dataflow shows): stride rules would give it a stray DropBlock. Plain CNNs without residual
    additions (VGG, DenseNet) compute no attention and still get their stages."""
    if any(r.modules is not None or r.types is not None or r.stride is None for r in recipe.rules):
        return
    if roles.not_a_cnn is not None and roles.attention_inputs:
        raise RecipeError(f"recipe {recipe.name!r}: {type(model).__name__} is not a CNN the recipe fits: "
                          f"{roles.not_a_cnn}, and it computes attention; DropBlock belongs in a CNN backbone's "
                          f"residual stages: name modules by path (modules: [...]) to place it anyway")


def _literal(glob: str) -> str:
    return re.split(r"[*?]", glob)[0].rstrip(".")


def explain(model: nn.Module, rule: Rule, modules: dict[str, nn.Module], paths: list[str],
            why: dict[str, list[str]], shapes: ShapeLog | None, example_input: Any, untraceable: int = 0,
            roles: Roles | None = None) -> str:
    """Why ``rule`` selected no insertion point, in one sentence the user can act on (``untraceable``: how
    many of the selected modules torch.fx could not trace; ``roles``: the dataflow's facts, so that the
    deepest stage named is one whose maps reach the model's outputs)."""
    if rule.modules is not None and not any(rule.matches_path(p) for p in modules if p):
        names = [p for p in modules if p]
        close = [c for g in rule.modules for c in difflib.get_close_matches(_literal(g), names, n=3, cutoff=0.5)]
        return (f"no module path matches {list(rule.modules)}"
                + (f"; the closest existing paths are {list(dict.fromkeys(close))}" if close else
                   f"; top-level modules are {[n for n in names if '.' not in n][:8]}"))
    if rule.types is not None and not paths:
        classes = sorted({type(m).__name__ for m in modules.values()})
        close = [c for t in rule.types for c in difflib.get_close_matches(t.rsplit(".", 1)[-1], classes, n=3)]
        return (f"no module of class {list(rule.types)} holds an insertion point"
                + (f"; similar classes in the model: {close}" if close else ""))
    if why:
        parts = [f"{len(v)} on {reason} (e.g. {v[0]})" for reason, v in why.items()]
        text = "the points it asks for may never get a DropBlock: " + ", ".join(parts)
        if "a 1x1 map" in why:
            text += f"; the example input {_input(example_input)} is too small for these strides, use a larger one"
        return text
    if rule.stride is not None and roles is not None:
        reason = _stride_reason(rule, roles, example_input)
        if reason:
            return reason
    elif rule.stride is not None and shapes is not None:
        found = {}
        for p, calls in shapes.calls.items():
            shape = calls[0] if calls else None
            s = shapes.nominal_stride(shape, p) if shape and shape[1] > 1 and p not in shapes.heads else None
            if roles is not None and roles.ran(p) and not roles.is_live(p):
                s = None  # a stage the model computes and throws away (smp's encoders beyond their depth)
            if s is not None and shape is not None and len(shape) >= 4:
                found.setdefault(s, p)
        if not found:
            return "the example forward produced no feature map"
        largest = max(found)
        tiny = shapes.calls[found[largest]][0]
        if largest < min(rule.stride) and tiny is not None and math.prod(tiny[2:]) <= 1:
            return (f"the maps are 1x1 from stride {largest} on: the example input {_input(example_input)} is too "
                    f"small for stride {'/'.join(map(str, rule.stride))}, use a larger one")
        if largest < min(rule.stride):
            return (f"no map reaches stride {'/'.join(map(str, rule.stride))}: the largest stride found is "
                    f"{largest} (in {found[largest]!r}); select the deepest stage by path instead, e.g. "
                    f"modules: [{found[largest].rsplit('.', 1)[0] + '.*'!r}]")
    if not paths:
        return _scripted(rule, modules) or _containers(model, rule, modules) or _no_stride_module(rule, roles) or \
            "it selects no module"
    if untraceable >= len(paths):
        return f"torch.fx cannot trace the {len(paths)} module(s) it selects (e.g. {paths[0]!r}), see below"
    what = "layer" if "any" in rule.after else f"{'/'.join(rule.after)} node" if rule.after else "branch node"
    return (f"the {len(paths)} module(s) it selects ({paths[:3]}) hold no {what}"
            f"{' or residual shortcut' if rule.shortcut else ''}")


def _stride_reason(rule: Rule, roles: Roles, example_input: Any) -> str | None:
    """Why a stride rule found no module, from the recorded dataflow, or None when its maps are there: the
    backbone's live feature maps (two cells or more, not pooled, no attention or gate) stop below the rule's
    strides (a CIFAR-style net, an encoder cut short, an input too small), or the maps at those strides are
    all outside the backbone (after maps of different strides are fused or upsampled), thrown away, or
    attention."""
    found: dict[int, str] = {}  # stride -> the first (outermost) module returning a backbone map at it
    tiny: dict[int, str] = {}  # stride -> a module returning a map of one cell at it
    other: dict[str, list[tuple[int, str]]] = {}  # why maps are no backbone feature map -> (stride, module)
    first = {}  # path -> its first call, outer modules before the modules they call
    for c in sorted(roles.flow.calls, key=lambda c: (c.start, -c.end)):
        if c.path:
            first.setdefault(c.path, c)
    for path in first:
        val = roles.feature_map(path)
        if val is None or val.shape[1] <= 1 or val.id in roles.pooled:
            continue
        stride = roles.nominal[val.id] or 0
        if math.prod(val.shape[2:]) <= 1:
            tiny.setdefault(stride, path)
            continue
        why = ("never reach the model's outputs" if not roles.is_live(path) else
               "feed attention or come from it" if roles.in_attention(path) or roles.is_gate(path) else
               "come after maps of different strides are fused or upsampled (a neck, decoder or head)"
               if not roles.is_backbone(path) else "")
        if not why:
            found.setdefault(stride, path)
        else:
            other.setdefault(why, []).append((stride, path))
    if not found:
        return "the example forward produced no feature map"
    largest = max(found)
    if largest >= min(rule.stride):  # type: ignore[arg-type]
        return None
    small = [s for s in tiny if s > largest]
    if small:
        return (f"the maps are 1x1 from stride {min(small)} on: the example input {_input(example_input)} is too "
                f"small for stride {'/'.join(map(str, rule.stride))}, use a larger one")  # type: ignore[arg-type]
    stage = found[largest]
    text = (f"no map of its backbone reaches the stride it selects: the largest stride found is {largest} (in "
            f"{stage!r}); write a path rule for the deepest stage instead, such as modules: [{stage + '.*'!r}]")
    for why, maps in other.items():
        deeper = [p for s, p in maps if s > largest]
        if deeper:
            text += f"; its maps at larger strides {why} (e.g. {deeper[0]!r})"
    return text


def _containers(model: nn.Module, rule: Rule, modules: dict[str, nn.Module]) -> str | None:
    """Why a rule whose globs name only containers (``layer3``, a Sequential) or layers selects no module: the
    blocks inside a container are what is rewritten, a layer's owner calls it; None if it names neither."""
    if rule.modules is None:
        return None
    named = [p for p in modules if p and rule.matches_path(p)]
    usable = usable_scopes(modules)
    if not named or any(p in usable for p in named):
        return None
    p = named[0]
    inner = [q for q in usable if q.startswith(p + ".")]
    if inner:
        glob = f"{p}.*" if any(q.count(".") == p.count(".") + 1 for q in inner) else f"{p}.**"
        return (f"{p!r} is a {type(modules[p]).__name__}, which is never rewritten (its forward may iterate over "
                f"its children): name the blocks inside it instead, e.g. modules: [{glob!r}]")
    calling = owner(p, model)
    return (f"{p!r} ({type(modules[p]).__name__}) holds layers that {calling or '<root>'!r} calls: name that module "
            f"(modules: [{calling!r}]) and choose its layers with 'after'" if calling else
            f"{p!r} ({type(modules[p]).__name__}) holds layers that the model's own forward calls: select them with "
            f"'after' and no 'modules', or a stride")


def _no_stride_module(rule: Rule, roles: Roles | None) -> str | None:
    """Why a stride rule whose strides the backbone reaches selects no module: its maps at those strides are
    computed by modules that call no layer of their own, or by functional ops of the model's own forward."""
    if rule.stride is None or roles is None:
        return None
    for c in sorted(roles.flow.calls, key=lambda c: (c.start, -c.end)):
        val = roles.feature_map(c.path) if c.path else None
        if val is not None and roles.nominal[val.id] in rule.stride and roles.is_backbone(c.path):
            return (f"its backbone's stride-{roles.nominal[val.id]} maps (e.g. from {c.path!r}) are computed by no "
                    f"module that calls a conv, norm or activation layer DropBlock can follow (functional ops?); "
                    f"name modules by path (modules: [...]) with after: [any]")
    return None


def _scripted(rule: Rule, modules: dict[str, nn.Module]) -> str | None:
    """Why a rule whose globs name modules inside a TorchScript module selects none of them, or None."""
    if rule.modules is None:
        return None
    scripted = [p for p, m in modules.items() if p and isinstance(m, torch.jit.ScriptModule)]
    named = [q for q in scripted if any(p == q or p.startswith(q + ".") for p in modules if rule.matches_path(p))]
    if not named:
        return None
    outer = [q for q in named if not any(q.startswith(r + ".") for r in named)]
    return (f"the modules it names are TorchScript, or inside TorchScript module(s) {outer[:3]}, which torch.fx "
            f"can neither trace nor rewrite; inject into the plain model, then script it")


def _input(example_input: Any) -> str:
    if example_input is None:
        return "1x3x224x224"
    ts = [t for t in torch.utils._pytree.tree_leaves(example_input) if isinstance(t, Tensor)]
    return ", ".join("x".join(map(str, t.shape)) for t in ts[:2]) or type(example_input).__name__
