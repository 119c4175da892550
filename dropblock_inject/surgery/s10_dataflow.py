"""The example forward's dataflow: what actually ran, recorded once (facts derived from it: :mod:`.s16_roles`).

:func:`record` runs one forward of the model on its example input and records every module call (path,
input and output tensors) and every functional op on tensors (convolutions, additions, concatenations,
resampling, matrix products, softmax, attention, pooling, norms, reshaping...), each tensor as a
:class:`Value` with its shape, the op that produced it and its spatial stride relative to the input of the
model's first convolution.

It costs at most one forward: on an empty batch, else on the meta device (no compute), else a real forward
of the example as given (a detector's post-processing may need real values; see :mod:`.s09_metaforward`). It
leaves nothing behind: its hooks sit on this model's modules only and are removed when it ends, training
flags and any attribute the forward assigned (a cache of meta tensors) are restored, no random number is
drawn on meta, and the interception modes are per thread, so two threads can record two models at once.
User hooks registered on the model do fire; callers that must hide them set them aside first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .s09_metaforward import ModuleState, attempts, leaves, run

Shape = tuple[int, ...]

# op kinds by the function's name (torch.*, F.*, Tensor methods and operators)
_KINDS = {
    "conv": {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"},
    "add": {"add", "add_", "__add__", "__radd__", "__iadd__"},
    "cat": {"cat", "concat", "concatenate", "stack"},
    "matmul": {"matmul", "__matmul__", "__rmatmul__", "bmm", "baddbmm", "mm", "einsum"},
    "attention": {"scaled_dot_product_attention", "multi_head_attention_forward"},
    "softmax": {"softmax", "log_softmax", "_softmax"},
    "norm": {"batch_norm", "group_norm", "layer_norm", "instance_norm"},
    "linear": {"linear"},
    "pool": {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "lp_pool2d"},
    "adaptive_pool": {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
                      "adaptive_max_pool2d", "adaptive_max_pool3d"},
    "resample": {"interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "pixel_shuffle",
                 "pixel_unshuffle", "grid_sample"},
    "reshape": {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "contiguous", "squeeze",
                "unsqueeze", "split", "chunk", "unbind", "__getitem__", "expand", "movedim", "t", "view_as",
                "reshape_as", "tensor_split", "narrow", "select", "repeat"},
}
KIND_OF = {name: kind for kind, names in _KINDS.items() for name in names}

_T = Tensor
_METADATA = {_T.dim, _T.size, _T.numel, _T.stride, _T.is_contiguous, _T.is_floating_point, _T.is_complex,
             _T.element_size, _T.data_ptr, _T.__len__, _T.__format__, _T.__repr__, _T.tolist, _T.item,
             *(getattr(_T, name).__get__ for name in ("shape", "ndim", "dtype", "device", "layout", "is_cuda",
                                                       "is_meta", "is_sparse", "is_quantized", "requires_grad"))}


@dataclass(frozen=True)
class Value:
    """One tensor of the forward (an in-place op makes a new value of the same tensor).

    Attributes:
        id: index in :attr:`Dataflow.values`.
        shape: its shape (batch 0 when recorded on an empty batch).
        producer: index of the :class:`Op` that made it, ``None`` for the model's inputs.
        stride: spatial stride relative to the input of the first convolution, rounded to a power of two;
            ``None`` before that convolution or for tensors that are not (N, C, *spatial) maps.
    """

    id: int
    shape: Shape
    producer: int | None
    stride: int | None = None


@dataclass(frozen=True)
class Op:
    """One functional op on tensors.

    Attributes:
        index: index in :attr:`Dataflow.ops` (execution order).
        name: the function's name (``conv2d``, ``add``, ``__iadd__``, ``interpolate``...).
        kind: its kind (keys of ``_KINDS``: ``conv``, ``add``, ``cat``, ``matmul``, ...; ``other``).
        scope: path of the innermost module whose call ran it (``""``: the model's own forward).
        inputs: ids of the tensor values it read, in argument order (parameters and buffers are not values).
        outputs: ids of the values it made.
        dilation: a convolution's largest spatial dilation (1 otherwise).
        kernel: a convolution's largest kernel size (0 otherwise).
    """

    index: int
    name: str
    kind: str
    scope: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    dilation: int = 1
    kernel: int = 0


@dataclass(frozen=True)
class ModuleCall:
    """One call of a module: its path, the values it read and returned, and the ops it ran
    (``ops[start:end]``)."""

    path: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    start: int
    end: int


@dataclass
class Dataflow:
    """What one example forward ran (see :func:`record`).

    Attributes:
        values, ops, calls: every tensor value, functional op and module call, in execution order.
        inputs, outputs: ids of the model's input and output values.
        reference: spatial size of the first convolution's input (what strides are relative to).
        how: ``"meta"``, ``"empty batch"`` or ``"real"``: how the forward ran.
    """

    values: list[Value] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    calls: list[ModuleCall] = field(default_factory=list)
    inputs: tuple[int, ...] = ()
    outputs: tuple[int, ...] = ()
    reference: Shape = ()
    how: str = ""

    def calls_of(self, path: str) -> list[ModuleCall]:
        """The calls of the module at ``path``, in the order they ended (empty if it never ran)."""
        index = self.__dict__.get("_by_path")
        if index is None or index[0] != len(self.calls):
            by_path: dict[str, list[ModuleCall]] = {}
            for c in self.calls:
                by_path.setdefault(c.path, []).append(c)
            index = self.__dict__["_by_path"] = (len(self.calls), by_path)
        return index[1].get(path, [])

    def calls_reading(self, value: int) -> list[ModuleCall]:
        """The module calls that took ``value`` as an input, in the order they ended."""
        index = self.__dict__.get("_by_input")
        if index is None or index[0] != len(self.calls):
            by_input: dict[int, list[ModuleCall]] = {}
            for c in self.calls:
                for v in dict.fromkeys(c.inputs):
                    by_input.setdefault(v, []).append(c)
            index = self.__dict__["_by_input"] = (len(self.calls), by_input)
        return index[1].get(value, [])

    def ancestors(self, seeds: Iterable[int]) -> set[int]:
        """``seeds`` and every value they were computed from."""
        seen = set(seeds)
        todo = list(seen)
        while todo:
            p = self.values[todo.pop()].producer
            if p is not None:
                for w in self.ops[p].inputs:
                    if w not in seen:
                        seen.add(w)
                        todo.append(w)
        return seen

    def consumers(self) -> list[list[int]]:
        """For each value, the indices of the ops that read it."""
        out: list[list[int]] = [[] for _ in self.values]
        for op in self.ops:
            for v in op.inputs:
                out[v].append(op.index)
        return out


class _Recorder(TorchFunctionMode):
    """Gives every tensor a value id and records each op on tracked tensors; module hooks push the path of
    the module being called."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.ids: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.flow = Dataflow()
        self.names = names
        self.stack: list[tuple[str, tuple[int, ...], int]] = []
        self.ref_channels = 0

    def new_value(self, t: Tensor, producer: int | None) -> int:
        vid = len(self.flow.values)
        self.flow.values.append(Value(vid, tuple(t.shape), producer))
        self.ids[t] = vid
        return vid

    def tracked(self, value: Any) -> tuple[int, ...]:
        return tuple(dict.fromkeys(self.ids[t] for t in leaves(value) if t in self.ids))

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _METADATA:
            return out
        name = getattr(func, "__name__", "") or str(func)
        ins = self.tracked((args, kwargs))
        index = len(self.flow.ops)
        inplace = (name.endswith("_") and not name.endswith("__") or name.startswith("__i")
                   or kwargs.get("inplace") is True or any(a is True for a in args[1:]))  # F.relu(x, True)
        given = {id(t) for t in leaves((args, kwargs))} if not inplace else set()
        # an op that hands back its input (dropout in eval, ``contiguous()``) makes no new value; an in-place
        # op (``add_``, ``+=``, ``relu_``) makes a new value of the same tensor
        outs = tuple(self.ids[t] if id(t) in given and t in self.ids else self.new_value(t, index)
                     for t in leaves(out))
        if not outs:
            return out
        dilation, kernel = 1, 0
        kind = KIND_OF.get(name, "other")
        if kind == "conv" and len(args) > 1 and isinstance(args[1], Tensor):
            kernel = max(args[1].shape[2:], default=1)
            at = 7 if name.startswith("conv_transpose") else 5  # (input, weight, bias, stride, padding, ...)
            d = kwargs.get("dilation", args[at] if len(args) > at else 1)
            dilation = max(d) if isinstance(d, (tuple, list)) else int(d)
        scope = self.stack[-1][0] if self.stack else ""
        self.flow.ops.append(Op(index, name, kind, scope, ins, outs, dilation, kernel))
        if kind == "conv" and not self.flow.reference and args and isinstance(args[0], Tensor):
            self.flow.reference = tuple(args[0].shape[2:])
            self.ref_channels = args[0].shape[1] if args[0].dim() > 1 else 0
        return out

    def pre_hook(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self.stack.append((self.names[id(module)], self.tracked((args, kwargs)), len(self.flow.ops)))

    def post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        path, ins, start = self.stack.pop()
        outs = tuple(self.ids[t] if t in self.ids else self.new_value(t, None) for t in leaves(output))
        self.flow.calls.append(ModuleCall(path, ins, outs, start, len(self.flow.ops)))


def _run(model: nn.Module, args: tuple[Any, ...], how: str) -> Dataflow:
    names = {id(m): path for path, m in model.named_modules()}
    rec = _Recorder(names)
    handles = []
    try:
        for m in model.modules():
            if not isinstance(m, torch.jit.ScriptModule):
                handles.append(m.register_forward_pre_hook(rec.pre_hook, with_kwargs=True))
                handles.append(m.register_forward_hook(rec.post_hook))
        model.eval()
        with torch.no_grad(), rec:
            rec.flow.inputs = tuple(rec.new_value(t, None) for t in leaves(args))
            out = run(model, args, how)
    finally:
        for h in handles:
            h.remove()
    return _finish(rec, out, how)


class Recording:
    """:func:`record`'s machinery for a forward that another pass runs (the surgery's example forward,
    :class:`.s12_shapes.ShapeLog`, which calls each module without the user's hooks): enter :attr:`mode` around
    the forward, call :meth:`pre_hook` / :meth:`post_hook` around each module call, then :meth:`finish`.

    Args:
        model: the network whose modules the calls are named after.
    """

    def __init__(self, model: nn.Module) -> None:
        self.mode = _Recorder({id(m): path for path, m in model.named_modules()})
        self.pre_hook, self.post_hook = self.mode.pre_hook, self.mode.post_hook

    def inputs(self, args: Any) -> None:
        """Registers the model's input tensors (call inside :attr:`mode`, before the forward)."""
        self.mode.flow.inputs = tuple(self.mode.new_value(t, None) for t in leaves(args))

    def finish(self, out: Any, how: str) -> Dataflow:
        """The recorded :class:`Dataflow`, ``out`` being what the forward returned."""
        return _finish(self.mode, out, how)


def _finish(rec: _Recorder, out: Any, how: str) -> Dataflow:
    flow = rec.flow
    flow.outputs = tuple(rec.ids[t] for t in leaves(out) if t in rec.ids)
    flow.how = how
    flow.reference = _unfolded(flow, rec.ref_channels)
    flow.values = [Value(v.id, v.shape, v.producer, _stride(v.shape, flow.reference)) for v in flow.values]
    return flow


def _unfolded(flow: Dataflow, channels: int) -> Shape:
    """The first convolution's input size, or the model input's when a space-to-depth stem (TResNet's, a
    ``PixelUnshuffle``) folded f x f pixels into channels before it: strides count from the image."""
    ref = flow.reference
    first = flow.values[flow.inputs[0]].shape if flow.inputs else ()
    if len(ref) != 2 or len(first) not in (3, 4) or not first[-3]:
        return ref
    f = math.isqrt(channels // first[-3]) if channels % first[-3] == 0 else 1
    if f > 1 and f * f * first[-3] == channels and tuple(first[-2:]) == tuple(r * f for r in ref):
        return tuple(r * f for r in ref)
    return ref


def _stride(shape: Shape, reference: Shape) -> int | None:
    """The power of two that every spatial side of ``shape`` is ``reference``'s divided by (rounded: unpadded
    convs and floor-mode pools give e.g. 224 / 13); None for tensors that are no (N, C, *spatial) map at or
    below the reference's resolution (tokens, channels-last maps, whose sides disagree)."""
    if not reference or len(shape) != len(reference) + 2 or min(shape[2:]) <= 0:
        return None
    exps = {round(math.log2(r / s)) for r, s in zip(reference, shape[2:])}
    return 2 ** exps.pop() if len(exps) == 1 and min(exps) >= 0 else None


class RecordError(RuntimeError):
    """The example input does not run through the model in any way."""


def record(model: nn.Module, example_input: Any) -> Dataflow:
    """Record what one forward of ``model`` on ``example_input`` computes.

    Args:
        model: the network (any ``nn.Module``); it runs in eval mode without gradients and is left exactly
            as it was (training flags, attributes, parameters, buffers, children, hooks).
        example_input: a tensor, a tuple of positional arguments, or any other single argument (e.g. a list
            of image tensors for a torchvision detector).

    Returns:
        The :class:`Dataflow` of the first way that ran: on an empty batch (when every argument is a batched
        tensor), on the meta device, or for real.

    Raises:
        RecordError: no way ran; it names each way's error.
    """
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    state = ModuleState(model)
    errors = []
    for how, run_args in attempts(args):
        try:
            return _run(model, run_args, how)
        except Exception as e:  # noqa: BLE001 - try the next, more expensive way
            errors.append(f"{how}: {type(e).__name__}: {str(e)[:300]}")
        finally:
            state.restore()
    shapes = [tuple(t.shape) for t in leaves(args)][:8]
    raise RecordError(f"the example input (tensors of shapes {shapes}) does not run through "
                      f"{type(model).__name__}: " + "; ".join(errors))
