"""The sweep's placement check from the recorded dataflow (:class:`~dropblock_inject.surgery.s16_roles.Roles`): no
point on attention (q, k, v, positional codes, projections), on a sigmoid gate multiplied into the trunk, on a
dead map, in a neck or head (after an upsampling or a fusion of maps of different strides), or between a conv
and its norm (norms by behaviour, whatever their class)."""

from __future__ import annotations

import re

from typing import Any, Iterable, Sequence

from torch import nn

from dropblock_inject.surgery.s10_dataflow import record
from dropblock_inject.surgery.s03_points import InsertionPoint
from dropblock_inject.surgery.s16_roles import Roles

_GATES = {"sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_"}
_PRODUCTS = {"mul", "mul_", "__mul__", "__rmul__", "__imul__"}
_SHAPED = {"expand_as", "view_as", "reshape_as", "broadcast_to", "expand"}


def _layer(model_paths: Iterable[str], point: InsertionPoint) -> str | None:
    """The module path a point's node calls (fx names a call of ``a.b`` ``a_b``, ``a_b_1`` if repeated)."""
    prefix = f"{point.module}." if point.module else ""
    names = {_node_name(path[len(prefix):]): path for path in sorted(model_paths) if path.startswith(prefix)}
    base, _, count = point.after.rpartition("_")
    # ``features_transition3_conv`` is ``features.transition3.conv``, never ``features.transition3``
    return names.get(point.after) or (names.get(base) if count.isdigit() else None)


def _node_name(target: str) -> str:
    """The name fx gives a call of the module at ``target``: snake case, dots as underscores (``adn.N`` ->
    ``adn_n``, ``convBlock`` -> ``conv_block``)."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", target).lower().replace(".", "_")


def misplaced(model: nn.Module, points: Sequence[InsertionPoint], example_input: Any) -> str:
    """Why some of ``points`` are misplaced, or ``""``.

    Args:
        model: the plain model (not injected).
        points: the plan's insertion points.
        example_input: the input its dataflow is recorded on.

    Returns:
        The first few misplaced points, each with its reason: on a tensor that feeds attention or comes from
        it, on a map that reaches the outputs only through a sigmoid gate, on a map that never reaches the
        outputs, on a map that is not the backbone's (a neck, decoder or head), or after a conv whose output
        goes into a norm.
    """
    roles = Roles(record(model, example_input), model)
    ungated = _ungated(roles)
    paths = {p for p, _ in model.named_modules() if p}
    bad = []
    for point in points:
        layer = _layer(paths, point)
        where = layer or point.module
        outs = {v for c in roles.flow.calls_of(where) for v in c.outputs}
        if not roles.ran(where):
            continue
        if roles.in_attention(where):
            bad.append(f"{point.module}:{point.after} on attention")
        elif not roles.is_live(where):
            bad.append(f"{point.module}:{point.after} on a dead map")
        elif not roles.opaque and not outs & ungated:
            bad.append(f"{point.module}:{point.after} on a sigmoid gate (its map reaches the outputs only as a "
                       f"gate multiplied into another map)")
        elif not roles.is_backbone(where):
            bad.append(f"{point.module}:{point.after} in a neck or head (after an upsampling or a fusion of "
                       f"strides, or after the backbone's last map)")
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


def _ungated(roles: Roles) -> set[int]:
    """Values the model's outputs are computed from other than as a gate: walking back from the outputs, a
    product of a map and a sigmoid gate (``x * sigmoid(...)``, ``x * (1 + sigmoid(...))``, reshaped or expanded)
    is followed into the map only, so an SE/CBAM/BAM/attention-U-Net gate's own maps are left out (a swish
    ``x * sigmoid(x)`` keeps x)."""
    flow = roles.flow
    gate: set[int] = set()
    for op in flow.ops:  # a gate, and what is computed from gates alone (``1 + sigmoid(a)``) or shaped like a map
        ins = [v for v in op.inputs if v in roles.data]
        if op.name in _GATES or (ins and all(v in gate for v in ins)) or (op.name in _SHAPED and ins[:1] and ins[0] in gate):
            gate.update(op.outputs)
    seen, todo = set(flow.outputs), list(flow.outputs)
    while todo:
        p = flow.values[todo.pop()].producer
        if p is None:
            continue
        op = flow.ops[p]
        ins = list(op.inputs)
        if op.name in _PRODUCTS and any(v in gate for v in ins) and not all(v in gate for v in ins):
            ins = [v for v in ins if v not in gate]
        for w in ins:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen
