"""The modules, ``DropBlock2d`` and ``DropBlock3d``, and their single source of truth for keep_prob."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ._check import _check_block_size, _check_flag, _check_input, _check_keep_prob
from ._functional import drop_block_nd


class _DropBlockNd(nn.Module):
    """The common module. ``_keep_prob`` (a float) is the truth; ``keep_prob_tensor`` is derived from it.

    The tensor is what compiled graphs, exported programs and fx graphs read, so a new keep_prob never
    recompiles. It is a plain tensor attribute, not a buffer: nothing that walks ``buffers()`` sees it, so
    ``state_dict`` keys are those of the model without DropBlock, and neither ``AveragedModel(use_buffers=True)``
    nor DDP's buffer broadcast can overwrite it. It is refilled from the float whenever it could disagree:
    after every ``_apply`` (``.to``, ``.half()``, ``to_empty`` from the meta device...) it is an fp32 tensor
    on the module's device holding the float, and so after unpickling (also of modules saved by earlier
    versions, which held it as a non-persistent buffer). ``copy.deepcopy`` copies it with the float.
    """

    _spatial_dims: int = 2

    def __init__(self, block_size: int = 7, keep_prob: float = 1.0, *, per_channel: bool = True,
                 scale: bool = True, inplace: bool = False) -> None:
        super().__init__()
        self.block_size = _check_block_size(block_size)
        self.per_channel = _check_flag("per_channel", per_channel)
        self.scale = _check_flag("scale", scale)
        self.inplace = _check_flag("inplace", inplace)
        keep_prob = _check_keep_prob(keep_prob)
        self._keep_prob = keep_prob
        self.keep_prob_tensor = torch.tensor(keep_prob, dtype=torch.float32)
        # not a buffer; but torch.fx copies a traced tensor attribute into its GraphModule as a buffer, persistent
        # unless named here, and the GraphModule's state_dict must keep the model's keys
        self._non_persistent_buffers_set.add("keep_prob_tensor")

    @property
    def keep_prob(self) -> float:
        """The current keep probability; setting it updates ``keep_prob_tensor`` in place (no allocation)."""
        return self._keep_prob

    @keep_prob.setter
    def keep_prob(self, value: float) -> None:
        value = _check_keep_prob(value)
        self._keep_prob = value
        self._sync_tensor()

    def _sync_tensor(self, tensor: Tensor | None = None) -> None:
        """Makes ``keep_prob_tensor`` an fp32 scalar holding ``_keep_prob``, on ``tensor``'s device if given.

        In place when the tensor already is one (so graphs holding it see the new value), else a new one.
        """
        tensor = self.__dict__.get("keep_prob_tensor") if tensor is None else tensor
        if tensor is None or tensor.dtype != torch.float32 or tensor.dim() != 0:
            device = tensor.device if tensor is not None else torch.device("cpu")
            self.__dict__["keep_prob_tensor"] = torch.tensor(self._keep_prob, dtype=torch.float32, device=device)
            return
        self.__dict__["keep_prob_tensor"] = tensor
        if not tensor.is_meta:  # a meta tensor holds no value; to_empty comes back here
            with torch.no_grad():
                tensor.fill_(self._keep_prob)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        super()._apply(fn, recurse)
        # not a buffer, so moved here: fn gives the device (.to, .cuda, to_empty...), the float the value
        # (.half() must not round it, to_empty must not leave it uninitialised)
        self._sync_tensor(fn(self.keep_prob_tensor))
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        old = self._buffers.pop("keep_prob_tensor", None)  # earlier versions: a non-persistent buffer
        self._non_persistent_buffers_set.add("keep_prob_tensor")  # see __init__
        tensor = self.__dict__.get("keep_prob_tensor", old)
        if "_keep_prob" not in self.__dict__:  # a module pickled with the tensor only
            self._keep_prob = _check_keep_prob(tensor.float())
        self._sync_tensor(tensor)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        keep_prob = 0.0  # traced: the graph reads the tensor, never the float (a new value does not recompile)
        if not isinstance(x, torch.fx.Proxy):
            _check_input(x, self._spatial_dims, type(self).__name__)
            if not torch.compiler.is_compiling():
                keep_prob = self._keep_prob
                if keep_prob < 1.0 and not self.__dict__.get("_warned"):
                    self._warn_whole_map(tuple(x.shape[2:]))
        return drop_block_nd(x, keep_prob, self.keep_prob_tensor, self.block_size, self.per_channel, self.scale,
                             self.inplace)

    def _warn_whole_map(self, spatial: tuple[int, ...]) -> None:
        """Warns once (eager only) when the block, clipped to a smaller map, covers all of it: every block then
        drops whole planes. A map exactly the block's size (the paper's 7x7 group 4 at 224 px) is the paper's own
        design, not a small input, and does not warn."""
        if not spatial or min(spatial) == 0 or max(spatial) > self.block_size or min(spatial) == self.block_size:
            return
        self.__dict__["_warned"] = True
        size = "x".join(map(str, spatial))
        hint = (f"use block_size <= {max(spatial) - 1} at this resolution" if max(spatial) > 1
                else "no block size drops less at this resolution")
        warnings.warn(f"{type(self).__name__}: block_size {self.block_size} covers the whole {size} map: every "
                      f"block drops whole channels; {hint}", UserWarning, stacklevel=3)

    def extra_repr(self) -> str:
        return (f"block_size={self.block_size}, keep_prob={self._keep_prob}, per_channel={self.per_channel}, "
                f"scale={self.scale}" + (", inplace=True" if self.inplace else ""))


class DropBlock2d(_DropBlockNd):
    """DropBlock on 2-D feature maps, as a module; see :func:`drop_block2d`.

    Args:
        block_size (int): side of the square block, clipped to the feature map. Default: 7.
        keep_prob (float): expected fraction of kept activations; 1 disables the op. Schedulers set it
            through the :attr:`keep_prob` property. Default: 1.0.
        per_channel (bool): independent masks per channel (the reference); ``False`` shares one mask.
        scale (bool): rescale kept activations by ``numel(mask) / sum(mask)``. Default: ``True``.
        inplace (bool): write into the input (CPU, eager), as ``nn.ReLU(inplace=True)`` does; ``inject``
            sets it where the input is a BatchNorm or convolution output read by nothing else.
            Default: ``False``.

    Shape:
        Input ``(N, C, H, W)``, output the same. Identity in eval mode.
    """

    _spatial_dims = 2


class DropBlock3d(_DropBlockNd):
    """DropBlock on 3-D feature maps ``(N, C, T, H, W)``, as a module; see :func:`drop_block3d`.

    Args:
        block_size (int): side of the cubic block, clipped to the feature map. Default: 7.
        keep_prob (float): expected fraction of kept activations; 1 disables the op. Default: 1.0.
        per_channel (bool): independent masks per channel; ``False`` shares one mask per sample.
        scale (bool): rescale kept activations by ``numel(mask) / sum(mask)``. Default: ``True``.
        inplace (bool): write into the input (CPU, eager); see :class:`DropBlock2d`. Default: ``False``.
    """

    _spatial_dims = 3
