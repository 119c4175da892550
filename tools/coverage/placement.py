"""The sweep's placement check from the recorded dataflow: no point on attention, on a dead map, or between a
conv and its norm (norms by behaviour, whatever their class)."""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from dropblock_inject.surgery.dataflow import record
from dropblock_inject.surgery.points import InsertionPoint
from dropblock_inject.surgery.roles import Roles


def _layer(model_paths: set[str], point: InsertionPoint) -> str | None:
    """The module path a branch point's node calls (fx names a call of ``a.b`` ``a_b``, ``a_b_1`` if repeated)."""
    prefix = f"{point.module}." if point.module else ""
    for path in model_paths:
        if path.startswith(prefix) and path[len(prefix):].replace(".", "_") in (
                point.after, point.after.rsplit("_", 1)[0]):
            return path
    return None


def misplaced(model: nn.Module, points: Sequence[InsertionPoint], example_input: Any) -> str:
    """Why some of ``points`` are misplaced, or ``""``.

    Args:
        model: the plain model (not injected).
        points: the plan's insertion points.
        example_input: the input its dataflow is recorded on.

    Returns:
        The first few misplaced points, each with its reason: on a tensor that feeds attention or comes from
        it, on a map that never reaches the model's outputs, or after a conv whose output goes into a norm.
    """
    roles = Roles(record(model, example_input), model)
    paths = {p for p, _ in model.named_modules() if p}
    bad = []
    for point in points:
        layer = _layer(paths, point) if point.kind == "branch" else None
        where = layer or point.module
        if roles.ran(where) and roles.in_attention(where):
            bad.append(f"{point.module}:{point.after} on attention")
        elif roles.ran(where) and not roles.is_live(where):
            bad.append(f"{point.module}:{point.after} on a dead map")
        elif layer is not None and _feeds_norm(roles, layer):
            bad.append(f"{point.module}:{point.after} before a norm")
    return "; ".join(bad[:3]) + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else "")


def _feeds_norm(roles: Roles, path: str) -> bool:
    """Whether the module at ``path`` is not a norm and all it returned is read by norms alone."""
    if roles.is_norm(path):
        return False
    outs = {v for c in roles.flow.calls_of(path) for v in c.outputs}
    readers = [c for c in roles.flow.calls if set(c.inputs) & outs and not c.path.startswith(path)]
    direct = [c for c in readers if not any(c is not d and c.start <= d.start and d.end <= c.end for d in readers)]
    return bool(direct) and all(roles.is_norm(c.path) for c in direct)
