"""Residual additions found by dataflow: every addition of a branch to a skip path, wherever it runs in the
forward (chained in a loop, after a transition, the skip first or second), with which operand is the skip.
"""

from __future__ import annotations

from dataclasses import dataclass

from .s10_dataflow import Dataflow, ModuleCall, Op

_LAYERS = ("conv", "linear")


@dataclass(frozen=True)
class ResidualAdd:
    """An addition of a branch to a skip path.

    Attributes:
        op: index of the addition in :attr:`Dataflow.ops`.
        scope: path of the module whose own forward runs it (``""``: the model's).
        position: how many additions that module's call ran before this one (its order among the scope's
            traced additions).
        operands: the two added values, in argument order.
        skip: argument position of the skip path (0 or 1); ``None`` when neither operand is one (the sum of
            parallel conv branches of a re-parameterisable block).
        branch_convs: convolutions (or linear layers) in series on the longest path from the common source
            to each operand.
        dilation: the largest power-of-two dilation of a spatial convolution in the branch (1 if none).
    """

    op: int
    scope: str
    position: int
    operands: tuple[int, int]
    skip: int | None
    branch_convs: tuple[int, int]
    dilation: int = 1


def residual_adds(flow: Dataflow, data: set[int]) -> list[ResidualAdd]:
    """Every addition of two data tensors of one shape that share a source, wherever it runs (chained in a
    loop, after a transition). The operand that *is* the source is the skip (``x + f(x)``); when both
    were computed from it, the skip is the operand with fewer layers in series, if it has at most one: a
    projection beside a deeper branch (``conv3(...) + downsample(x)``), a parameter-free transform of the
    source beside a conv branch (MONAI VNet's ``conv(x) + x.repeat(...)``). Two branches of equal depth
    (``bn(conv3x3(x)) + bn(conv1x1(x))``, re-parameterisable blocks) have no skip.

    Args:
        flow: the recorded forward.
        data: ids of the values computed from the model's inputs (parameters alone are no operand).

    Returns:
        The additions with a common source, in execution order.
    """
    out: list[ResidualAdd] = []
    positions: dict[tuple[int, str], int] = {}
    calls = sorted(flow.calls, key=lambda c: (c.start, -c.end))
    for op in flow.ops:
        if op.kind != "add":
            continue
        call = _enclosing(calls, op)
        key = (call.start if call else -1, op.scope)
        position = positions[key] = positions.get(key, -1) + 1
        ins = [v for v in op.inputs if v in data]
        if len(ins) != 2 or flow.values[ins[0]].shape != flow.values[ins[1]].shape:
            continue
        anc = [flow.ancestors((v,)) for v in ins]
        common = anc[0] & anc[1]
        if not common:
            continue
        source = max(common)
        depth, dil = zip(*(_branch(flow, source, v, a) for v, a in zip(ins, anc)))
        if source in ins:
            skip: int | None = ins.index(source)
        elif min(depth) <= 1 and min(depth) < max(depth):
            skip = depth.index(min(depth))
        else:
            skip = None
        branch_dil = max(dil) if skip is None else dil[1 - skip]
        out.append(ResidualAdd(op.index, op.scope, position, (ins[0], ins[1]), skip, tuple(depth), branch_dil))
    return out


def source_outside(flow: Dataflow, add: ResidualAdd) -> bool:
    """Whether the latest common source of ``add``'s operands was computed before the module call that ran
    the addition and is none of its inputs: two maps that call was handed (HRNet's branches, fused), not a
    branch and a skip of its own input."""
    anc = [flow.ancestors((v,)) for v in add.operands]
    common = anc[0] & anc[1]
    if not common:
        return True
    source = max(common)
    calls = [c for c in flow.calls_of(add.scope) if c.start <= add.op < c.end]
    if not calls:
        return False
    call = calls[-1]
    producer = flow.values[source].producer
    return source not in call.inputs and not (producer is not None and call.start <= producer < call.end)


def _enclosing(calls: list[ModuleCall], op: Op) -> ModuleCall | None:
    inside = [c for c in calls if c.path == op.scope and c.start <= op.index < c.end]
    return inside[-1] if inside else None


def _branch(flow: Dataflow, source: int, v: int, anc: set[int]) -> tuple[int, int]:
    """Convolutions in series on the longest path from ``source`` to ``v``, and the largest power-of-two
    dilation of a spatial convolution among them."""
    depth = {source: 0}
    dilation = 1
    for u in sorted(w for w in anc if w > source):
        p = flow.values[u].producer
        if p is None:
            continue
        op = flow.ops[p]
        before = [depth[w] for w in op.inputs if w in depth]
        if before:
            depth[u] = max(before) + (op.kind in _LAYERS)
            if op.kind == "conv" and op.kernel > 1 and op.dilation > 1 and op.dilation & (op.dilation - 1) == 0:
                dilation = max(dilation, op.dilation)
    return depth.get(v, 0), dilation
