"""Stage 3, shapes: one example forward that records every module call's output shape and the arguments of
each module's first call.

Strides (``stride: [16, 32]`` rules) are read from these shapes, and the recorded calls tell the tracer
(:mod:`.trace`) how each scope is called.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from .kinds import ACT_FUNCTIONS, ACT_METHODS, add_operands
from .trace import Call, SurgeryError, describe


class ShapeLog:
    """Output shapes of every module call and the arguments of each module's first call, from one eval
    forward."""

    def __init__(self, model: nn.Module, example_input: Any) -> None:
        self.calls: dict[str, list[tuple[int, ...] | None]] = defaultdict(list)
        self.inputs: dict[str, Call] = {}
        handles = []
        for name, m in model.named_modules():
            handles.append(m.register_forward_hook(functools.partial(self._hook, name)))
            handles.append(m.register_forward_pre_hook(functools.partial(self._pre_hook, name), with_kwargs=True))
        modes = {m: m.training for m in model.modules()}
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        tensors = [a for a in args if isinstance(a, Tensor)]
        self.input_spatial = tuple(tensors[0].shape[2:]) if tensors else ()
        try:
            model.eval()
            with torch.no_grad():
                model(*args)
        except Exception as e:
            raise SurgeryError(f"the example input of shape {[tuple(t.shape) for t in tensors]} failed to run "
                               f"through the model: {type(e).__name__}: {e}") from e
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes.items():
                m.training = mode

    @staticmethod
    def _shape(value: Any) -> tuple[int, ...] | None:
        return tuple(value.shape) if isinstance(value, Tensor) else None

    def _hook(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        self.calls[name].append(self._shape(output))

    def _pre_hook(self, name: str, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if name not in self.inputs:
            self.inputs[name] = Call(tuple(map(describe, args)), {k: describe(v) for k, v in kwargs.items()})

    def call(self, path: str) -> Call | None:
        return self.inputs.get(path)

    def module_output(self, path: str) -> tuple[int, ...] | None:
        calls = self.calls.get(path)
        return calls[0] if calls else None

    def stride(self, shape: tuple[int, ...] | None) -> int | None:
        if not shape or len(shape) != len(self.input_spatial) + 2 or not self.input_spatial:
            return None
        if shape[-1] <= 0:
            return None
        # nearest power of two: unpadded convs and floor-mode pools give e.g. 224 / 13 or 299 / 17
        return 2 ** round(math.log2(self.input_spatial[-1] / shape[-1]))

    def node_shapes(self, path: str, graph: fx.Graph,
                    inputs: list[tuple[int, ...] | None]) -> dict[str, tuple[int, ...] | None]:
        """Shapes of the graph's nodes: placeholders from ``inputs``, module calls from the log, elementwise
        ops from their first input."""
        shapes: dict[str, tuple[int, ...] | None] = {}
        seen: dict[str, int] = defaultdict(int)
        placeholder = 0
        for n in graph.nodes:
            shape = None
            if n.op == "placeholder":
                shape = inputs[placeholder] if placeholder < len(inputs) else None
                placeholder += 1
            elif n.op == "call_module":
                full = f"{path}.{n.target}" if path else str(n.target)
                calls = self.calls.get(full, [])
                shape = calls[seen[full]] if seen[full] < len(calls) else None
                seen[full] += 1
            elif n.op in ("call_function", "call_method") and (
                    n.target in ACT_FUNCTIONS or n.target in ACT_METHODS or add_operands(n) is not None):
                first = n.args[0] if n.args else None
                shape = shapes.get(first.name) if isinstance(first, fx.Node) else None
            shapes[n.name] = shape
        return shapes


def call_log(model: nn.Module, example_input: Any) -> ShapeLog | None:
    """The calls of one example forward (default ``1x3x224x224``), or None if the model does not take it:
    scopes are then traced with their parameters' defaults."""
    try:
        return ShapeLog(model, torch.randn(1, 3, 224, 224) if example_input is None else example_input)
    except SurgeryError:
        if example_input is not None:
            raise
        return None
