"""The example forward's machinery (used by :mod:`.s12_shapes`): how it runs cheaply and leaves no trace.

* :func:`attempts` -- the ways to run it, cheapest first: an empty batch, the meta device
  (:class:`.s09_metaforward.MetaForward`, which :mod:`.s12_shapes` enters), a real forward;
* :class:`Snapshot` -- the model's forward run without the user's hooks (per module and global: by calling
  each module through a function of its own, never by clearing a registry), and every attribute, parameter,
  buffer and child a forward assigned undone afterwards;
* :class:`Flow` -- which layer last produced each tensor (to find predictions) and which maps are
  adaptively pooled.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .s01_registry import CALL_IMPL_SLOT, global_hooks_present

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
_KEY = "dropblock_inject"  # our hooks' key in the hook dicts (never an int, so never a user's hook id)


def leaves(value: Any) -> list[Tensor]:
    """The tensors in ``value`` (nested lists, tuples, dicts, pytree nodes such as Hugging Face outputs)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return [t for v in value for t in leaves(v)]
    if type(value) is dict:
        return [t for v in value.values() for t in leaves(v)]
    if value is None or isinstance(value, (int, float, bool, str, torch.dtype, torch.device)):
        return []
    return [t for t in pytree.tree_leaves(value) if isinstance(t, Tensor)]


def _leaves_in(args: Any, kwargs: Any, info: WeakIdKeyDictionary) -> list[Tensor]:
    return [t for t in leaves((args, kwargs)) if t in info]


_T = Tensor
_METADATA = {_T.dim, _T.size, _T.numel, _T.stride, _T.is_contiguous, _T.is_floating_point, _T.is_complex,
             _T.element_size, _T.data_ptr, _T.__len__, *(getattr(_T, name).__get__ for name in (
                 "shape", "ndim", "dtype", "device", "layout", "is_cuda", "is_meta", "is_sparse",
                 "is_quantized", "requires_grad"))}


class Flow(TorchFunctionMode):
    """Follows each tensor of the example forward back to the last layer that produced it, and whether it
    is an adaptively pooled map (pooled and not upsampled since)."""

    def __init__(self, layers: set[int], names: dict[int, str]) -> None:
        super().__init__()
        self.info: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> (layer paths, pooled)
        self.layers, self.names = layers, names

    def tag_inputs(self, args: Any) -> None:
        for t in leaves(args):
            self.info[t] = (frozenset(), False)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _METADATA:  # most calls: ``x.shape``, ``x.dim()`` (ours in the hooks too) make no tensor
            return out
        tagged = _leaves_in(args, kwargs, self.info)
        ins = [self.info[t] for t in tagged]
        if ins:
            name = getattr(func, "__name__", "")
            # a sum, product or concatenation of several maps is a new feature, not any one layer's output
            layers = ins[0][0] if len({id(t) for t in tagged}) == 1 else frozenset()
            outs = leaves(out)
            if "adaptive" in name and "pool" in name:
                first = leaves(args)[0]
                pooled = bool(outs) and outs[0].shape[2:] != first.shape[2:]  # fixed-size bins, not a strided map
            else:
                pooled = "interpolate" not in name and "upsample" not in name and all(i[1] for i in ins)
            for t in outs:
                self.info[t] = (layers, pooled)
        return out

    def post_hook(self, record: Any) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            outs = leaves(output)
            pooled = any(self.info.get(t, ((), False))[1] for t in outs)
            if id(module) in self.layers:
                for t in outs:
                    self.info[t] = (frozenset({self.names[id(module)]}), self.info.get(t, ((), False))[1])
            record(module, output, pooled)
        return hook

    def layers_of(self, out: Any) -> set[str]:
        return set().union(*(self.info.get(t, ((), False))[0] for t in leaves(out)))


def attempts(args: tuple[Any, ...], hooked: bool) -> list[tuple[str, tuple[Any, ...], bool]]:
    """The ways to run the example forward, cheapest first: an empty batch (a batch of tensors whose first
    dimension is sliced to 0), the meta device, a real forward."""
    out = []
    if args and all(isinstance(a, Tensor) and a.dim() >= 4 and a.shape[0] >= 1 for a in args):
        out.append(("empty batch", tuple(a[:0] for a in args)))
    cheap = [*out, ("meta", args)]
    if not hooked:
        return [(how, a, False) for how, a in [*cheap, ("real", args)]]
    # a model that may need its own hooks: each way without them, then with them
    return [(how, a, False) for how, a in cheap] + [(how, a, True) for how, a in cheap] + [
        ("real", args, False), ("real", args, True)]


class Snapshot:
    """Every module's attributes (and the user's forward hooks) before the example forward: :meth:`restore`
    undoes whatever the forward assigned (a cache, a meta tensor, our call functions), and
    :meth:`restore_hooks` puts the module's hook dicts back. Nothing outside the model is touched: the
    process's global hooks are read, never cleared; a forward run without hooks skips them per module
    (:meth:`install`)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [m for m in model.modules() if not isinstance(m, torch.jit.ScriptModule)]
        self.attrs = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
                      for m in self.modules]
        self.own = {m: {key: m.__dict__[key] for key in _HOOK_DICTS} for m in self.modules}

    @property
    def hooked(self) -> bool:
        """Whether the model or the process holds forward hooks of its own (some models need theirs, e.g.
        Hugging Face's output recorders)."""
        return global_hooks_present("forward", "forward_pre") or any(
            any(h[key] for key in _HOOK_DICTS) for h in self.own.values())

    def install(self, m: nn.Module, pre: Any, post: Any, keep: bool) -> None:
        """Our recording hooks on ``m``: around the module's own ones and the process's global ones
        (``keep``), or alone: ``m`` is then called through a function of its own (see
        :data:`.s01_registry.CALL_IMPL_SLOT`) that runs ``pre``, its forward and ``post``, and no other hook."""
        d = m.__dict__
        if not keep:
            def call(*args: Any, **kwargs: Any) -> Any:
                pre(m, args, kwargs)
                out = m.forward(*args, **kwargs)
                post(m, args, out)
                return out

            d[CALL_IMPL_SLOT] = call
            return
        own = self.own[m]
        d["_forward_pre_hooks"] = OrderedDict([(_KEY, pre), *own["_forward_pre_hooks"].items()])
        d["_forward_pre_hooks_with_kwargs"] = {_KEY: True, **own["_forward_pre_hooks_with_kwargs"]}
        d["_forward_hooks"] = OrderedDict([*own["_forward_hooks"].items(), (_KEY, post)])
        d["_forward_hooks_with_kwargs"] = dict(own["_forward_hooks_with_kwargs"])
        d["_forward_hooks_always_called"] = dict(own["_forward_hooks_always_called"])

    def restore(self) -> None:
        for m, attrs, params, buffers, children in self.attrs:
            for key in [k for k in m.__dict__ if k not in attrs]:
                del m.__dict__[key]
            for key, value in attrs.items():
                if key not in _HOOK_DICTS and m.__dict__.get(key, attrs) is not value:
                    m.__dict__[key] = value
            for mine, saved in ((m._parameters, params), (m._buffers, buffers), (m._modules, children)):
                if mine.keys() != saved.keys() or any(mine[k] is not v for k, v in saved.items()):
                    mine.clear()
                    mine.update(saved)

    def restore_hooks(self) -> None:
        for m, attrs, *_ in self.attrs:
            for key in _HOOK_DICTS:
                m.__dict__[key] = attrs[key]
