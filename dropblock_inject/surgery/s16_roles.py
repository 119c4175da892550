"""What each module of a recorded forward is for in placement, derived from its dataflow (:mod:`.s10_dataflow`;
live maps, gates and attention: :mod:`.s15_tensors`).

:class:`Roles` answers, per module path (or value), the questions placement asks:

* **backbone or not** (:meth:`Roles.is_backbone`): the backbone is what runs from the first convolution,
  before any upsampling or fusion of maps of different strides (an op or a module call reading them: FPN,
  PAN, BiFPN, U-Net decoders, detection heads) and not after the last map of the deepest stride (DeepLab's
  ASPP, classifier heads); a fusion followed by residual stages deeper than any map before it is part of a
  multi-resolution backbone (HRNet), see :attr:`Roles.backbone_end`;
* **live, gates, attention**: see :class:`.s15_tensors.TensorRoles`;
* **residual additions** (:attr:`Roles.residual_adds`): see :func:`.s13_residuals.residual_adds`;
* **stride** (:meth:`Roles.stride`): measured stride times the dilation a backbone stage traded for it;
* **CNN or not** (:attr:`Roles.not_a_cnn`);
* **norms by behaviour** (:func:`.s14_normprobe.is_stat_norm`, :attr:`Roles.norms`).
"""
from __future__ import annotations

from functools import cached_property

from torch import nn

from .s10_dataflow import Dataflow, Value
from .s14_normprobe import is_stat_norm
from .s13_residuals import ResidualAdd, residual_adds
from .s15_tensors import TensorRoles

_ELEMENTWISE = {"mul", "mul_", "__mul__", "__rmul__", "sub", "__sub__", "__rsub__", "maximum", "where"}


class Roles(TensorRoles):
    """The facts placement needs, derived from one recorded forward (see the module docstring).

    Args:
        flow: the record of :func:`.s10_dataflow.record`.
        model: the recorded model (needed only for :attr:`norms`).
    """

    def __init__(self, flow: Dataflow, model: nn.Module | None = None) -> None:
        super().__init__(flow, model)
        self.first_conv = next((op.index for op in flow.ops if op.kind == "conv"), len(flow.ops))
        self.residual_adds: list[ResidualAdd] = residual_adds(flow, self.data)

    # -- value-level facts ---------------------------------------------------------------------------

    def _map(self, v: int, cells: int = 2) -> bool:
        """A feature map: (N, C, *spatial) with a stride, C > 1 and at least ``cells`` spatial cells."""
        val = self.flow.values[v]
        return val.stride is not None and val.shape[1] > 1 and _cells(val) >= cells

    @cached_property
    def fusion_ops(self) -> list[int]:
        """Op indices (after the first convolution) where maps are upsampled or maps of different strides are
        combined."""
        found = []
        for op in self.flow.ops[self.first_conv:]:
            ins = [self.flow.values[v] for v in op.inputs if self._map(v)]
            outs = [self.flow.values[v] for v in op.outputs if self._map(v)]
            if op.kind in ("add", "cat") or op.name in _ELEMENTWISE:
                if len({v.stride for v in ins}) > 1:
                    found.append(op.index)
            elif op.kind in ("resample", "conv") and ins and outs and len(outs[0].shape) == len(ins[0].shape) and all(
                    o > i for o, i in zip(outs[0].shape[2:], ins[0].shape[2:])):
                found.append(op.index)
        return sorted({*found, *self._stage_fusions()})

    def _fusing_call(self, op: int) -> int | None:
        """The start of the earliest module call that reads maps of different strides and runs fusion op
        ``op`` (an FPN: its first lateral conv runs before its first upsampling), or None."""
        starts = [c.start for c in self.flow.calls if c.start >= self.first_conv and c.start <= op < c.end and len(
            {self.flow.values[v].stride for v in c.inputs if self._map(v)}) > 1]
        return min(starts) if starts else None

    @cached_property
    def fusions(self) -> list[int]:
        """:attr:`fusion_ops`, and the start of each module call that reads maps of different strides and runs
        one (a block that is passed its shortcut, as DLA's, combines nothing)."""
        found = set(self.fusion_ops)
        for op in self.fusion_ops:
            start = self._fusing_call(op)
            if start is not None:
                found.add(start)
        return sorted(found)

    @cached_property
    def backbone_end(self) -> int:
        """The op index where the backbone ends: at the first fusion op (:attr:`fusion_ops`) after which no
        residual stage runs deeper than every map made before it, or at the start of the module call that
        reads maps of different strides and runs it, unless residual additions run in that call before it. A
        multi-resolution backbone (HRNet) fuses its branches in each stage and then opens a deeper branch of
        residual blocks, its last stage running its branches' blocks before fusing them: all backbone. A neck
        or decoder (FPN, PAN, U-Net) goes no deeper in residual stages than the backbone it reads (an FPN's
        extra P6 level is a plain conv or pool), and its first lateral convs run before its first upsampling."""
        adds = [r.op for r in self.residual_adds
                if r.skip is not None and max(r.branch_convs) >= 1 and self._map(self._out(r.op))]
        values = self.flow.values
        deepest, k = 0, 0  # the deepest measured stride of the maps made before each fusion op
        for f in self.fusion_ops:
            while k < len(values) and (values[k].producer is None or values[k].producer < f):  # type: ignore[operator]
                if values[k].producer is not None and self._map(k):
                    deepest = max(deepest, values[k].stride or 0)
                k += 1
            if any(op > f and (values[self._out(op)].stride or 0) > deepest for op in adds):
                continue  # a multi-resolution backbone's fusion
            start = self._fusing_call(f)
            if start is not None and not any(start <= op < f for op in adds):
                return start
            return f
        return len(self.flow.ops)

    @cached_property
    def pooled(self) -> set[int]:
        """Adaptively pooled maps (fixed-size bins, not a strided map) and what is computed from them alone,
        not upsampled since (a pyramid pooling branch, an SE gate; not the map an SE gate scales)."""
        pooled: set[int] = set()
        for op in self.flow.ops:
            ins = [v for v in op.inputs if v in self.data]
            if op.kind == "adaptive_pool":
                first = self.flow.values[op.inputs[0]].shape[2:] if op.inputs else None
                pooled.update(v for v in op.outputs if self.flow.values[v].shape[2:] != first)
            elif op.kind != "resample" and ins and all(v in pooled for v in ins):
                pooled.update(op.outputs)
        return pooled

    @cached_property
    def nominal(self) -> list[int | None]:
        """Each value's stride times the stride its backbone stage traded for dilation: the residual
        additions of one (stride, channels) run form a stage; a stage that keeps the previous stage's measured
        stride and dilates its branches' convolutions (a dilated side path, such as an attention gate, is no
        branch) stands for twice the previous stage's stride. A stage that downsamples keeps the factor of
        the stages before it: a dilated conv beside a strided stage (Selective Kernel's dilated path) widens
        the receptive field and replaces no stride. A value belongs to the
        stage of the last addition before it when it has that addition's stride and channels, else to the
        next addition's stage when it has that stride, else to none; values made after the first fusion
        (necks, decoders, heads) keep their measured stride."""
        end = self.backbone_end
        anchors = self._anchors(end)
        dil = _factors(anchors)
        out: list[int | None] = []
        k = 0  # anchors[:k] ran before the current value
        for val in self.flow.values:
            at = val.producer if val.producer is not None else -1
            while k < len(anchors) and anchors[k][0] <= at:
                k += 1
            factor = 1
            if val.stride is not None and len(val.shape) > 1 and at < end:
                if k and anchors[k - 1][1] == (val.stride, val.shape[1]):
                    factor = dil[k - 1]
                elif k < len(anchors) and anchors[k][1][0] == val.stride:
                    factor = dil[k]
            out.append(None if val.stride is None else val.stride * factor)
        return out

    def _anchors(self, end: int) -> list[tuple[int, tuple[int | None, int], int]]:
        """The residual additions before op ``end`` that make maps: (op index, (stride, channels), dilation)."""
        return [(r.op, self._key(r.op), r.dilation) for r in self.residual_adds
                if r.skip is not None and self.first_conv <= r.op < end and self._map(self._out(r.op))]

    def _stage_fusions(self) -> list[int]:
        """Ops combining maps of one measured stride from stages of different dilation (a dilated backbone's
        last stage and the stage before it, at the same resolution: smp PAN's attention upsampling fuses
        them without resampling); each value is counted in the stage of the last residual addition its maps are
        computed from."""
        anchors = self._anchors(len(self.flow.ops))
        factor = dict(zip((a[0] for a in anchors), _factors(anchors)))
        if len(set(factor.values())) < 2:
            return []
        last: list[int] = [-1] * len(self.flow.values)  # the latest anchor each value is computed from
        found = []
        for op in self.flow.ops:
            ins = [v for v in op.inputs if self._map(v)]
            before = max((last[v] for v in ins or op.inputs), default=-1)  # a map scaled by a gate: the map's
            if (op.kind in ("add", "cat") or op.name in _ELEMENTWISE) and len(ins) > 1 and len(
                    {self.flow.values[v].stride for v in ins}) == 1 and len(
                    {factor.get(last[v], 1) for v in ins}) > 1:
                found.append(op.index)
            for v in op.outputs:
                last[v] = op.index if op.index in factor else before
        return found

    def _out(self, op: int) -> int:
        return self.flow.ops[op].outputs[0]

    def _key(self, op: int) -> tuple[int | None, int]:
        val = self.flow.values[self._out(op)]
        return val.stride, val.shape[1]

    @cached_property
    def backbone(self) -> set[int]:
        """Values of the backbone: made from the first convolution on, before the first fusion, and not
        after the last map of the deepest (nominal) stride that is computed from the input, not pooled and
        feeds no attention (DETR's projection into its transformer and its positional maps are not backbone)."""
        end = self.backbone_end
        best, last = 0, -1
        for val in self.flow.values:
            p = val.producer
            if (p is None or not self.first_conv <= p < end or not self._map(val.id) or val.id in self.pooled
                    or val.id in self.attention_inputs or val.id not in self.data):
                continue
            s = self.nominal[val.id] or 0
            if s >= best:
                best, last = s, p
        return {v.id for v in self.flow.values if v.producer is not None and self.first_conv <= v.producer <= last}

    # -- module-level facts --------------------------------------------------------------------------

    def is_backbone(self, path: str) -> bool:
        """Whether every tensor the module at ``path`` returned is a backbone value (False if it never ran)."""
        outs = self._outputs(path)
        return bool(outs) and all(v in self.backbone for v in outs)

    def feature_map(self, path: str) -> Value | None:
        """The first (N, C, *spatial) map with a stride that the module at ``path`` returned, or None."""
        for v in self._outputs(path):
            val = self.flow.values[v]
            if val.stride is not None and len(val.shape) >= 4:
                return val
        return None

    def is_one_cell(self, path: str) -> bool:
        """Whether the module at ``path`` returned maps of one spatial cell only (an input too small for the
        deepest stages: no backbone map, see :attr:`backbone`, is that small)."""
        outs = [self.flow.values[v] for v in self._outputs(path)]
        return bool(outs) and all(v.stride is not None and _cells(v) == 1 for v in outs)

    def is_norm(self, path: str) -> bool:
        """Whether the module at ``path`` is a norm by behaviour (see :attr:`norms`)."""
        return path in self.norms

    def adds_in(self, scope: str) -> list[ResidualAdd]:
        """The residual additions the first call of the module at ``scope`` ran itself (not in a submodule),
        in order; each one's :attr:`~.s13_residuals.ResidualAdd.position` is its index among all the additions
        (``+``, ``+=``, ``torch.add``, ``Tensor.add``/``add_`` on tensors) that call ran."""
        calls = self.flow.calls_of(scope)
        if not calls:
            return []
        first = min(calls, key=lambda c: c.start)
        return [a for a in self.residual_adds if a.scope == scope and first.start <= a.op < first.end]

    def stride(self, path: str) -> int | None:
        """The nominal stride (see :attr:`nominal`) of the first map the module at ``path`` returned."""
        outs = [v for v in self._outputs(path) if self.flow.values[v].stride is not None]
        return self.nominal[outs[0]] if outs else None

    @cached_property
    def not_a_cnn(self) -> str | None:
        """Why the recipe does not fit, or None: a CNN's backbone has a residual conv stage (an addition to a
        skip path whose branch has a convolution) at nominal stride 16 or 32."""
        for r in self.residual_adds:
            out = self._out(r.op)
            if (r.skip is not None and out in self.backbone and self.nominal[out] in (16, 32)
                    and r.branch_convs[1 - r.skip] >= 1 and self._map(out)):
                return None
        found = sorted({self.nominal[self._out(r.op)] or 0 for r in self.residual_adds
                        if r.skip is not None and self._out(r.op) in self.backbone and self._map(self._out(r.op))})
        return ("its backbone has no residual convolution stage at stride 16 or 32 (residual stages at strides "
                f"{found or 'none'})")

    @cached_property
    def norms(self) -> set[str]:
        """Paths of the modules that normalise per channel with statistics held in buffers (see
        :func:`.s14_normprobe.is_stat_norm`), among those called on one map and returning a map of its shape."""
        if self.model is None:
            raise ValueError("Roles.norms needs the model: pass it to Roles(flow, model)")
        modules = dict(self.model.named_modules())
        out = set()
        for path in dict.fromkeys(c.path for c in self.flow.calls):
            calls = self.flow.calls_of(path)
            shapes = {(tuple(self.flow.values[v].shape for v in c.inputs),
                       tuple(self.flow.values[v].shape for v in c.outputs)) for c in calls}
            if all(len(i) == 1 and i == o and len(i[0]) >= 3 for i, o in shapes) and is_stat_norm(modules[path]):
                out.add(path)
        return out


def _factors(anchors: list[tuple[int, tuple[int | None, int], int]]) -> list[int]:
    """Per anchor (a residual addition: op, (stride, channels), branch dilation), the stride factor its stage
    traded for dilation: the additions of one (stride, channels) run form a stage; a stage that keeps the
    previous stage's stride and dilates its branches stands for twice its stride; a downsampling stage keeps
    the factor of the stages before it."""
    stages: list[list[int]] = []  # per stage: its anchors' indices
    for i, (_, key, _) in enumerate(anchors):
        if i and anchors[i - 1][1] == key:
            stages[-1].append(i)
        else:
            stages.append([i])
    dil = [1] * len(anchors)
    prev_stride, factor = None, 1
    for stage in stages:
        stride = anchors[stage[0]][1][0]
        if stride == prev_stride and max(anchors[j][2] for j in stage) > 1:
            factor *= 2  # it kept the previous stage's stride and dilates instead: the stride it replaced
        prev_stride = stride
        for i in stage:
            dil[i] = factor
    return dil


def _cells(val: Value) -> int:
    n = 1
    for s in val.shape[2:]:
        n *= s
    return n
