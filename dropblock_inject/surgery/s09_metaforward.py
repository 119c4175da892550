"""How the example forward (:mod:`.s10_dataflow`) runs cheaply and leaves nothing behind.

* :func:`attempts` -- the ways to run it, cheapest first: an empty batch, the meta device, a real forward;
* :class:`MetaForward` -- the meta device, keeping small constants real so that code reading them runs;
* :func:`run` -- one call of the model the way an attempt says;
* :class:`ModuleState` -- every module's attributes, put back after the forward (a cache of meta tensors).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from .s01_registry import dispatch_mode_base


def leaves(value: Any) -> list[Tensor]:
    """The tensors in ``value`` (nested lists, tuples, dicts and pytree nodes such as Hugging Face outputs)."""
    if isinstance(value, Tensor):
        return [value]
    if type(value) in (list, tuple):
        return [t for v in value for t in leaves(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in leaves(v)]
    if value is None or isinstance(value, (int, float, bool, str, torch.dtype, torch.device)):
        return []
    return [t for t in pytree.tree_leaves(value) if isinstance(t, Tensor)]



_aten = torch.ops.aten
_FOLD = 1 << 16  # an op reading only real tensors computes for real up to this many input elements,
_FOLD_CHEAP = 1 << 21  # and up to this many when it is no product (a padding mask made in the forward)
_SHAPE_ONLY = {_aten.native_batch_norm.default, _aten._native_batch_norm_legit_no_training.default}
_SAME_SHAPE = {_aten.relu.default, _aten.gelu.default, _aten.silu.default, _aten.sigmoid.default,
               _aten.tanh.default, _aten._safe_softmax.default, _aten._softmax.default, _aten.hardswish.default}
_GRID_SAMPLERS = {_aten.grid_sampler_2d.default, _aten.grid_sampler_3d.default, _aten.grid_sampler.default}
_PRODUCTS = {_aten.convolution.default, _aten.mm.default, _aten.bmm.default, _aten.addmm.default,
             _aten.baddbmm.default, _aten._scaled_dot_product_flash_attention_for_cpu.default}


class MetaForward(dispatch_mode_base()):  # type: ignore[misc]
    """Runs the forward on the meta device: real tensors (parameters, buffers) are viewed as meta tensors of
    the same shape, but small constants stay real, so that code reading their values runs (a stride table,
    a frozen norm's scale, a padding mask the forward made and tests with ``.all()``). Random ops always run
    on meta: nothing draws from the global generator."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: dict[int, tuple[Tensor, Tensor]] = {}

    def _map(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            if value.device.type == "meta":
                return value
            hit = self.cache.get(id(value))
            if hit is None or hit[0] is not value:
                hit = self.cache[id(value)] = (value, value.to("meta"))
            return hit[1]
        if type(value) in (list, tuple):
            return type(value)(self._map(v) for v in value)
        return value

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tensors = leaves((args, kwargs))
        seeded = torch.Tag.nondeterministic_seeded in func.tags
        if not tensors and not seeded and "device" in kwargs:  # a factory: real if small
            shaped = func(*args, **{**kwargs, "device": torch.device("meta")})
            if not isinstance(shaped, Tensor) or shaped.numel() > _FOLD_CHEAP:
                return shaped
            return func(*args, **{**kwargs, "device": torch.device("cpu")}) if kwargs["device"] == torch.device(
                "meta") else func(*args, **kwargs)
        if tensors and not seeded and all(t.device.type != "meta" for t in tensors):
            if sum(t.numel() for t in tensors) <= (_FOLD if func in _PRODUCTS else _FOLD_CHEAP):
                if func is _aten._to_copy.default and kwargs.get("device") == torch.device("meta"):
                    kwargs = {**kwargs, "device": tensors[0].device}  # ``mask.to(x.device)``: stays real
                return func(*args, **kwargs)
        args = tuple(self._map(a) for a in args)
        kwargs = {k: self._map(v) for k, v in kwargs.items()}
        if (seeded or "device" in kwargs) and any(a.name == "device" for a in func._schema.arguments):
            kwargs["device"] = torch.device("meta")  # a random factory (not an op on tensors, SDPA's kernel)
        if func in _SHAPE_ONLY:  # slow Python meta kernels; only the shape matters
            return torch.empty_like(args[0]), args[0].new_empty(0), args[0].new_empty(0)
        if func in _SAME_SHAPE:  # activations and softmax: the input's shape (and dtype, unless given)
            given = args[2] if len(args) > 2 and isinstance(args[2], torch.dtype) else kwargs.get("dtype")
            return torch.empty_like(args[0], dtype=given or args[0].dtype)
        if func is _aten.addmm.default:  # a linear layer: (n, k) @ (k, m) + bias
            return args[1].new_empty((args[1].shape[0], args[2].shape[1]))
        if func is _aten.native_layer_norm.default:  # normalised over the trailing dims: (y, mean, rstd)
            x, axis = args[0], args[0].dim() - len(args[1])
            stats = (*x.shape[:axis], *([1] * len(args[1])))
            return torch.empty_like(x), x.new_empty(stats), x.new_empty(stats)
        if func in _GRID_SAMPLERS:  # (N, C, H, W) sampled at a (N, Hg, Wg, 2) grid: (N, C, Hg, Wg)
            x, grid = args[0], args[1]
            return x.new_empty((*x.shape[:2], *grid.shape[1:-1]))
        return func(*args, **kwargs)


class ModuleState:
    """Every module's attributes, parameters, buffers, children and training flag, put back by
    :meth:`restore` (a forward may cache tensors on the module, meta ones included)."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
                      for m in model.modules()]

    def restore(self) -> None:
        for m, attrs, params, buffers, children in self.saved:
            for key in [k for k in m.__dict__ if k not in attrs]:
                del m.__dict__[key]
            for key, value in attrs.items():
                if m.__dict__.get(key, attrs) is not value:
                    m.__dict__[key] = value
            for mine, theirs in ((m._parameters, params), (m._buffers, buffers), (m._modules, children)):
                if mine.keys() != theirs.keys() or any(mine[k] is not v for k, v in theirs.items()):
                    mine.clear()
                    mine.update(theirs)


def attempts(args: tuple[Any, ...]) -> list[tuple[str, tuple[Any, ...]]]:
    """The ways to run the forward, cheapest first."""
    ways = []
    if args and all(isinstance(a, Tensor) and a.dim() >= 3 and a.shape[0] >= 1 for a in args):
        ways.append(("empty batch", tuple(a[:0] for a in args)))
    return [*ways, ("meta", pytree.tree_map_only(Tensor, lambda t: t.to("meta"), args)), ("real", args)]


def run(model: Any, args: tuple[Any, ...], how: str) -> Any:
    """``model(*args)``, under :class:`MetaForward` when ``how`` is ``"meta"`` (the args already on meta)."""
    if how == "meta":
        with MetaForward():
            return model(*args)
    return model(*args)
