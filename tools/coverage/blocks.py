"""The coverage check's block test: branch and shortcut points present wherever a residual block has them.

A *residual block* is a module whose traced forward adds a map derived from its input to one computed from
it by layers (the planner's own analysis, :func:`~dropblock_inject.surgery.s19_analyze.analyze`, finds the
addition) and the recorded dataflow agrees that one operand is a skip path: the sum of two conv branches
of a re-parameterisable block (RepVGG, MobileOne) has no shortcut and is not expected to get one. In groups 3 and 4 (output stride 16 or 32, outside the heads of a dense model), a block whose
branch got DropBlocks must get a shortcut point too when the recipe asks for shortcuts, and a block whose
shortcut got one must have branch points (in itself or in the modules it calls).
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from dropblock_inject.errors import SurgeryError
from dropblock_inject.recipe import load_recipe
from dropblock_inject.surgery.s19_analyze import analyze
from dropblock_inject.surgery.s07_kinds import is_container
from dropblock_inject.surgery.s03_points import InsertionPoint
from dropblock_inject.surgery.s16_roles import Roles
from dropblock_inject.surgery.s12_shapes import ShapeLog
from dropblock_inject.surgery.s18_trace import trace_scope


def _ancestors(path: str) -> list[str]:
    """``path`` and the modules enclosing it, innermost first (the root, ``""``, last)."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _has_residual_point(path: str, module: nn.Module, log: ShapeLog, roles: Roles | None) -> bool:
    """Whether the block at ``path`` has a residual addition whose shortcut may get a DropBlock (a feature
    map with C > 1, larger than 1x1, no prediction or pooled map) and, where the dataflow was recorded, an
    addition with a skip operand (not only sums of parallel conv branches)."""
    if roles is not None and roles.ran(path) and not any(a.skip is not None for a in roles.adds_in(path)):
        return False
    try:
        scope = analyze(path, module, trace_scope(module, path, log.call(path)), log)
    except SurgeryError:
        return False
    return any(c.kind == "shortcut" and not c.banned and c.shape is not None and len(c.shape) == 4
               and c.shape[1] > 1 and c.shape[2] * c.shape[3] > 1 for c in scope.candidates)


def missing_points(model: nn.Module, points: Sequence[InsertionPoint], recipe: Any, log: ShapeLog) -> str:
    """The first residual block of groups 3/4 that lacks the points it should have, as a sentence naming
    it; empty when every block has them.

    Args:
        model: the planned model (not yet injected).
        points: its plan for ``recipe``.
        recipe: the recipe planned (name, path, dict or Recipe).
        log: the example forward's shapes (strides, heads, call patterns).

    Returns:
        The reason the check fails, or ``""``.
    """
    wants_shortcut = any(r.shortcut for r in load_recipe(recipe).rules)
    branch = {p.module for p in points if p.kind == "branch"}
    shortcut = {p.module for p in points if p.kind == "shortcut"}
    modules = dict(model.named_modules())
    flow = getattr(log, "flow", None)
    roles = Roles(flow, model) if flow is not None and not getattr(log, "partial", False) else None
    for path in sorted(shortcut):
        if not any(b == path or b.startswith(path + ".") for b in branch):
            return f"residual block {path!r} got a shortcut point but no branch point"
    if not wants_shortcut:
        return ""
    seen: set[str] = set()
    for start in sorted(branch):  # (tracing fires no hook: nothing to set aside)
        for path in _ancestors(start):
            if path in seen or path not in modules:
                continue
            seen.add(path)
            m = modules[path]
            if is_container(m) or path in log.heads:
                continue
            stride = log.nominal_stride(log.module_output(path), path)
            if stride not in (16, 32) or path in shortcut:
                continue
            if _has_residual_point(path, m, log, roles):
                return (f"residual block {path!r} ({type(m).__name__}) has branch points but no shortcut "
                        f"point, though the recipe asks for shortcuts")
    return ""
