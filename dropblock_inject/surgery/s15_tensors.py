"""What each tensor of a recorded forward is for, from its dataflow (:mod:`.s10_dataflow`): computed from the
input (data), read by the outputs (live), a gate, or attention. :class:`.s16_roles.Roles` builds on it.

* **live** (:meth:`TensorRoles.is_live`): a tensor the model's outputs are computed from;
* **gates** (:meth:`TensorRoles.is_gate`): maps that reach the outputs only as an attention gate (through a
  sigmoid or softmax whose result scales a trunk map: BAM's and CBAM's spatial attention);
* **attention** (:meth:`TensorRoles.feeds_attention`, :meth:`TensorRoles.in_attention`): a tensor that reaches
  a product of two data tensors (``q @ k``, ``attn @ v``) or an attention op through reshaping and one-input
  ops (a norm, a linear projection, adding a positional code) before any convolution; a module whose input
  is such a tensor or an attention result (a positional conv on ``v``, the output projection).
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from .s10_dataflow import Dataflow, Op

_STOPS = ("conv", "pool", "adaptive_pool", "resample", "attention", "matmul", "cat")
_GATES = {"sigmoid", "sigmoid_", "hardsigmoid", "softmax", "_softmax"}
_PRODUCTS = {"mul", "mul_", "__mul__", "__rmul__", "__imul__"}


class TensorRoles:
    """Live, gate and attention facts of one recorded forward (see the module docstring).

    Args:
        flow: the record of a forward (:class:`.s10_dataflow.Dataflow`).
        model: the recorded model (whether it holds TorchScript modules, whose ops the record does not see).
    """

    def __init__(self, flow: Dataflow, model: nn.Module | None = None) -> None:
        self.flow = flow
        self.model = model
        self.consumers = flow.consumers()
        self.data = self._descendants(set(flow.inputs))

    # -- value-level facts ---------------------------------------------------------------------------

    def _descendants(self, seeds: set[int], stop: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> set[int]:
        """``seeds`` and the values computed from them, not through ops of the kinds ``stop`` (and only
        through ops of the kinds ``only``, if given)."""
        seen, todo = set(seeds), list(seeds)
        while todo:
            for i in self.consumers[todo.pop()]:
                op = self.flow.ops[i]
                if op.kind in stop or (only and op.kind not in only):
                    continue
                for w in op.outputs:
                    if w not in seen:
                        seen.add(w)
                        todo.append(w)
        return seen

    @cached_property
    def live(self) -> set[int]:
        """Values the model's outputs are computed from (the outputs included)."""
        return self.flow.ancestors(self.flow.outputs)

    @cached_property
    def ungated(self) -> set[int]:
        """Values the outputs are computed from other than as a gate: :attr:`live`, walked back from the
        outputs but not into an operand of an elementwise product of two data tensors that comes from a
        sigmoid or softmax (``x * (1 + sigmoid(att))``: ``x`` is the trunk, ``att`` an attention map)."""
        seen, todo = set(self.flow.outputs), list(self.flow.outputs)
        while todo:
            p = self.flow.values[todo.pop()].producer
            if p is None:
                continue
            op = self.flow.ops[p]
            ins = list(op.inputs)
            if op.name in _PRODUCTS and sum(v in self.data for v in ins) == 2:
                ins = [v for v in ins if not self._from_gate(v)]
            for w in ins:
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        return seen

    def _from_gate(self, v: int) -> bool:
        """Whether ``v`` is a sigmoid's or softmax's result, through ops of one data input (``1 + g``,
        reshapes, expand)."""
        while True:
            p = self.flow.values[v].producer
            if p is None:
                return False
            op = self.flow.ops[p]
            if op.name in _GATES:
                return True
            ins = [w for w in op.inputs if w in self.data]
            if len(ins) != 1 or op.kind in _STOPS or op.kind == "linear":
                return False
            v = ins[0]

    def is_gate(self, path: str) -> bool:
        """Whether the module at ``path`` returned maps that reach the outputs only as an attention gate
        (see :attr:`ungated`): live, yet none of them an ungated value."""
        outs = [v for v in self._outputs(path) if v in self.data]
        return bool(outs) and not self.opaque and any(v in self.live for v in outs) and not any(
            v in self.ungated for v in outs)

    def _attention_ops(self) -> list[Op]:
        return [op for op in self.flow.ops if (op.kind == "attention" and any(v in self.data for v in op.inputs))
                or (op.kind == "matmul" and sum(v in self.data for v in op.inputs) >= 2)]

    @cached_property
    def attention_inputs(self) -> set[int]:
        """Values that reach an attention op (or a product of two data tensors) through ops of one data
        input (reshapes, norms, linear projections, adding a positional code) before any convolution."""
        seen = {v for op in self._attention_ops() for v in op.inputs if v in self.data}
        todo = list(seen)
        while todo:
            p = self.flow.values[todo.pop()].producer
            if p is None or self.flow.ops[p].kind in _STOPS:
                continue
            ins = [w for w in self.flow.ops[p].inputs if w in self.data]
            if len(ins) == 1 and ins[0] not in seen:
                seen.add(ins[0])
                todo.append(ins[0])
        return seen

    @cached_property
    def attention_results(self) -> set[int]:
        """Values computed from an attention op's result before any convolution."""
        seeds = {w for op in self._attention_ops() for w in op.outputs}
        return self._descendants(seeds, stop=("conv",))

    @cached_property
    def attention_region(self) -> set[int]:
        """:attr:`attention_results` and the values reshaped from :attr:`attention_inputs` (``v`` viewed
        back as a map)."""
        return self.attention_results | self._descendants(self.attention_inputs, only=("reshape",))

    # -- module-level facts --------------------------------------------------------------------------

    def ran(self, path: str) -> bool:
        """Whether the module at ``path`` was called in the recorded forward."""
        return bool(self.flow.calls_of(path))

    def _outputs(self, path: str) -> list[int]:
        return [v for c in self.flow.calls_of(path) for v in c.outputs]

    def is_live(self, path: str) -> bool:
        """Whether some tensor the module at ``path`` returned reaches the model's outputs (True when that
        cannot be known: the model holds a TorchScript module, whose ops the record does not see)."""
        return self.opaque or any(v in self.live for v in self._outputs(path))

    @cached_property
    def opaque(self) -> bool:
        """Whether the model holds a ScriptModule: its calls run unrecorded, so what reads a map is unknown."""
        return self.model is not None and any(isinstance(m, torch.jit.ScriptModule) for m in self.model.modules())

    def feeds_attention(self, path: str) -> bool:
        """Whether a tensor the module at ``path`` returned reaches attention (see :attr:`attention_inputs`)."""
        return any(v in self.attention_inputs for v in self._outputs(path))

    def in_attention(self, path: str) -> bool:
        """Whether the module at ``path`` feeds attention or reads a tensor that feeds attention or comes from
        it (q, k, v projections, a positional conv on v, the output projection), or belongs to a module that
        reads only such tensors (the output projection's norm)."""
        region = self.attention_region
        parts = path.split(".") if path else []
        for i in range(len(parts), 0, -1):
            p = ".".join(parts[:i])
            ins = [v for c in self.flow.calls_of(p) for v in c.inputs if v in self.data]
            if p == path and (self.feeds_attention(p) or any(v in region for v in ins)):
                return True
            if p != path and ins and all(v in region for v in ins):  # inside an attention projection
                return True
        return False
