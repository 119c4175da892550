"""Shapes: one example forward recording every module call's output shape, the arguments of each
module's first call, and where each map comes from.

Strides (``stride: [16, 32]`` rules) are measured on the network's own maps, relative to the input of its
first convolution, so models that resize their input (detection transforms) and lists of images work; a
stage that traded its stride for dilation (DeepLab, FCN) counts as the stride it replaced (see
:meth:`ShapeLog.nominal_stride`). The forward also finds what must never get a DropBlock: *predictions*
(maps that reach the model output with no further layer), adaptively pooled maps, and in dense-prediction
models the *heads* (modules that take maps of several sizes, such as an FPN or a detection head, and what
runs after the backbone's deepest map).

The pass is cheap: it runs on an empty batch, or on the meta device, and only falls back to a real forward
where both fail. User hooks (per module and global) are set aside while it runs, and anything the forward
assigned to a module is undone, so a failure leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import Tensor, nn

from .s08_example import Flow, Snapshot, attempts, leaves
from .s09_metaforward import run
from .s10_dataflow import Dataflow, Recording
from .s07_kinds import ACT_FUNCTIONS, ACT_METHODS, CONV_TYPES, add_operands, is_container, is_layer, module_kind, owner
from .s11_calls import Call, describe
from ..errors import SurgeryError

Shape = tuple[int, ...]


def default_input() -> Tensor:
    """The default example input, ``1x3x224x224``, drawn from a generator of its own (seed 0): the same values
    every time, and no draw from torch's global random state."""
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def _pow2(d: int) -> bool:
    return d > 1 and d & (d - 1) == 0


def own_dilation(m: nn.Module) -> int:
    """The largest power-of-two dilation of ``m``'s spatial (kernel > 1) convolutions (1 if none): a stage
    that replaced a stride-2 by dilation 2 (4, ...) works on maps of that many times the stride. Rates that
    are not powers of two (DeepLab's ASPP: 6, 12, 18, 24, 36) are context branches, not traded strides."""
    found = [d for c in _own_layers(m) if isinstance(c, CONV_TYPES) and max(c.kernel_size) > 1
             for d in c.dilation if _pow2(d)]
    return max(found, default=1)


def _own_layers(m: nn.Module) -> list[nn.Module]:
    """The modules ``m``'s own forward calls: its children, looking through containers (a conv inside a
    child block belongs to that block)."""
    out = []
    for c in m.children():
        out += _own_layers(c) if is_container(c) else [c] if isinstance(c, CONV_TYPES) else [
            x for x in c.modules() if isinstance(x, CONV_TYPES)] if module_kind(c) is not None else []
    return out


class ShapeLog:
    """Output shapes and origins of every module call, and the arguments of each module's first call, from
    one eval forward of ``model`` on ``example_input`` (a tensor, a tuple of arguments, or e.g. a list of
    image tensors for a detector). With ``dataflow``, the same forward also records its dataflow
    (:attr:`flow`, see :mod:`.s10_dataflow`; None when the forward stopped in a detector's post-processing)."""

    def __init__(self, model: nn.Module, example_input: Any, dataflow: bool = False) -> None:
        self.model = model
        self._dataflow = dataflow
        self.modules = dict(model.named_modules())
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        tensors = leaves(args)
        snapshot = Snapshot(model)
        errors: list[str] = []
        self.how = ""
        try:
            for how, run_args, keep in attempts(args, snapshot.hooked):
                self._reset()
                try:
                    self._run(model, run_args, how, snapshot, keep)
                    self.how = how
                    break
                except Exception as e:  # noqa: BLE001 - try the next, more expensive way
                    if how == "meta" and self.multiscale:  # failed in a detector's post-processing: the
                        self.partial = True  # backbone, neck and heads ran; the rest comes after the neck
                        self.how = how
                        break
                    errors.append(f"{type(e).__name__}: {e}")
                    if how == "real" and (keep or not snapshot.hooked):
                        raise SurgeryError(f"the example input of shape {[tuple(t.shape) for t in tensors]} failed "
                                           f"to run through the model: {errors[-1]}") from e
                finally:
                    snapshot.restore()
        finally:
            snapshot.restore_hooks()
        self._batch = tensors[0].shape[0] if tensors and tensors[0].dim() >= 4 else None
        if self.reference is None:
            self.reference = tuple(tensors[0].shape[2:]) if tensors and tensors[0].dim() >= 3 else ()
        elif tensors and tensors[0].dim() in (3, 4) and len(self.reference) == 2:
            # a space-to-depth stem (TResNet) folds f x f pixels into channels before the first convolution
            c = tensors[0].shape[-3]
            f = math.isqrt(self._ref_channels // c) if c and self._ref_channels % c == 0 else 1
            if f > 1 and f * f * c == self._ref_channels:
                self.reference = tuple(r * f for r in self.reference)
        self._dilation: dict[str, int] = {}
        self.heads = self._heads()

    def _reset(self) -> None:
        self.calls: dict[str, list[Shape | None]] = defaultdict(list)
        self.pooled: dict[str, list[bool]] = defaultdict(list)
        self.inputs: dict[str, Call] = {}
        self.start: dict[str, int] = {}
        self.end: dict[str, int] = {}
        self.multiscale: set[str] = set()
        self.predictions: set[str] = set()
        self.reference: Shape | None = None
        self._ref_channels = 0
        self.partial = False
        self.classifier = False
        self._events = 0
        self.flow: Dataflow | None = None

    def _run(self, model: nn.Module, args: tuple[Any, ...], how: str, snapshot: Snapshot, keep: bool) -> None:
        """One forward with our recording hooks (``keep``: with the model's own hooks too, for models that
        need them, e.g. Hugging Face's output recorders)."""
        names = self._names = {id(m): name for name, m in self.modules.items()}
        flow = Flow({id(m) for m in self.modules.values() if is_layer(m)}, names)
        post = flow.post_hook(self._hook)
        pre = self._pre_hook
        observer = Recording(model) if self._dataflow else None
        if observer is not None:
            ours_pre, ours_post = pre, post

            def pre(module: nn.Module, args: Any, kwargs: Any) -> None:
                observer.pre_hook(module, args, kwargs)
                ours_pre(module, args, kwargs)

            def post(module: nn.Module, args: Any, output: Any) -> None:
                ours_post(module, args, output)
                observer.post_hook(module, args, output)

        for m in self.modules.values():
            if not isinstance(m, torch.jit.ScriptModule):  # a leaf that is never hooked
                snapshot.install(m, pre, post, keep)
        if how == "meta":
            args = pytree.tree_map_only(Tensor, lambda t: t.to("meta"), args)
        flow.tag_inputs(args)
        modes = {m: m.training for m in self.modules.values()}
        inner = observer.mode if observer is not None else contextlib.nullcontext()
        try:
            model.eval()
            with torch.no_grad(), flow, inner:
                if observer is not None:
                    observer.inputs(args)
                out = run(model, args, how)
        finally:
            for m, mode in modes.items():
                m.training = mode
        if observer is not None:
            self.flow = observer.finish(out, how)
        outs = leaves(out)
        if len(outs) <= 2:  # dense logits (and an auxiliary head's), not a list of feature levels
            self.predictions = {p for p in flow.layers_of(out) if isinstance(self.modules[p], CONV_TYPES)}
        self.classifier = bool(outs) and not isinstance(out, list) and all(t.dim() <= 2 for t in outs)

    def _pre_hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        name = self._name(module)
        if name not in self.inputs:
            self.inputs[name] = Call(tuple(map(describe, args)), {k: describe(v) for k, v in kwargs.items()})
            self.start[name] = self._events
            self._events += 1
            maps = {tuple(t.shape[2:]) for t in leaves((args, kwargs)) if t.dim() >= 4}
            grouped = any(isinstance(a, (list, tuple, dict)) and sum(t.dim() >= 4 for t in leaves(a)) > 1
                          for a in (*args, *kwargs.values()))
            if name and (len(maps) > 1 or grouped):  # maps of several sizes, or several maps in one argument
                self.multiscale.add(name)
        if self.reference is None and isinstance(module, CONV_TYPES) and args and isinstance(args[0], Tensor):
            self.reference = tuple(args[0].shape[2:])
            self._ref_channels = args[0].shape[1]

    def _hook(self, module: nn.Module, output: Any, pooled: bool) -> None:
        name = self._name(module)
        self.calls[name].append(tuple(output.shape) if isinstance(output, Tensor) else None)
        self.pooled[name].append(pooled)
        if name not in self.end:
            self.end[name] = self._events
            self._events += 1

    def _name(self, module: nn.Module) -> str:
        return self._names[id(module)]

    # -- queries ---------------------------------------------------------------------------------------

    def call(self, path: str) -> Call | None:
        return self.inputs.get(path)

    def module_output(self, path: str) -> Shape | None:
        calls = self.calls.get(path)
        return self._batched(calls[0]) if calls else None

    def is_pooled(self, path: str) -> bool:
        return any(self.pooled.get(path, ()))

    def _batched(self, shape: Shape | None) -> Shape | None:
        """A shape recorded on the empty batch, with the example's batch size back in."""
        if shape and self.how == "empty batch" and shape[0] == 0 and self._batch is not None:
            return (self._batch, *shape[1:])
        return shape

    def stride(self, shape: Shape | None) -> int | None:
        """The stride of a map of ``shape`` relative to the input of the network's first convolution,
        rounded to a power of two (unpadded convs and floor-mode pools give e.g. 224 / 13 or 299 / 17)."""
        if not shape or not self.reference or len(shape) != len(self.reference) + 2 or shape[-1] <= 0:
            return None
        return 2 ** round(math.log2(self.reference[-1] / shape[-1]))

    def dilation(self, path: str) -> int:
        """The dilation a scope's maps are computed with: its own, or that of the next block of its stage
        (the first block of a dilated stage keeps the previous dilation but starts the stage)."""
        if path not in self._dilation:
            m = self.modules[path]
            d = own_dilation(m)
            parent, _, name = path.rpartition(".")
            container = self.modules.get(parent) if path else None
            if container is not None and is_container(container):
                children = list(container.named_children())
                i = [n for n, _ in children].index(name)
                if i + 1 < len(children) and type(children[i + 1][1]) is type(m):
                    d = max(d, own_dilation(children[i + 1][1]))
            self._dilation[path] = d
        return self._dilation[path]

    def nominal_stride(self, shape: Shape | None, scope: str) -> int | None:
        """:meth:`stride` times the dilation of ``scope``: the stride the map would have without dilation."""
        s = self.stride(shape)
        return None if s is None else s * self.dilation(scope)

    def _heads(self) -> set[str]:
        """Modules that are not the backbone of a dense-prediction model (none in a classifier): those taking
        maps of several sizes (FPN, detection and decoder heads) with their submodules, and those that start
        after the last map of the deepest stride (e.g. DeepLab's ASPP after a dilated backbone)."""
        if self.classifier and not self.partial:
            return set()
        heads = {p for p in self.calls if any(p == q or p.startswith(q + ".") for q in self.multiscale)}
        deepest, end = 0, -1
        for p, calls in self.calls.items():
            shape = calls[0] if calls else None
            if p in heads or p not in self.end or not shape or len(shape) != len(self.reference) + 2:
                continue
            if shape[1] <= 1 or math.prod(shape[2:]) <= 1 or self.is_pooled(p):
                continue
            s = self.nominal_stride(shape, p if not is_layer(self.modules[p]) else owner(p, self.model))
            if s is not None and (s > deepest or (s == deepest and self.end[p] > end)):
                deepest, end = s, self.end[p]
        return heads | {p for p, t in self.start.items() if t > end >= 0}

    def in_head(self, node: fx.Node, path: str) -> bool:
        """Whether ``node`` is (or directly follows) a call of a head module (see ``heads``)."""
        while node.op != "call_module" and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        return node.op == "call_module" and (f"{path}.{node.target}" if path else str(node.target)) in self.heads

    def node_shapes(self, path: str, graph: fx.Graph, inputs: list[Shape | None]
                    ) -> tuple[dict[str, Shape | None], dict[str, str]]:
        """Shapes of the graph's nodes (placeholders from ``inputs``, module calls from the log, elementwise
        ops from their first input), and the nodes that must not get a DropBlock, with the reason."""
        shapes: dict[str, Shape | None] = {}
        banned: dict[str, str] = {}
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
                shape = self._batched(calls[seen[full]]) if seen[full] < len(calls) else None
                pooled = self.pooled.get(full, [])
                if seen[full] < len(pooled) and pooled[seen[full]]:
                    banned[n.name] = "an adaptively pooled map"
                if full in self.predictions:
                    banned[n.name] = "a prediction (it reaches the model output with no further layer)"
                seen[full] += 1
            elif n.op in ("call_function", "call_method") and (
                    n.target in ACT_FUNCTIONS or n.target in ACT_METHODS or add_operands(n) is not None):
                first = n.args[0] if n.args else None
                if isinstance(first, fx.Node):
                    shape = shapes.get(first.name)
                    if first.name in banned and add_operands(n) is None:
                        banned[n.name] = banned[first.name]
            shapes[n.name] = shape
        return shapes, banned


def call_log(model: nn.Module, example_input: Any) -> ShapeLog | None:
    """The calls of one example forward (default ``1x3x224x224``), or None if the model does not take it:
    scopes are then traced with their parameters' defaults."""
    try:
        return ShapeLog(model, default_input() if example_input is None else example_input)
    except SurgeryError:
        if example_input is not None:
            raise
        return None
