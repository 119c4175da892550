"""DropBlock under ``torch.compile``: a small mask op and a product that inductor fuses with its neighbours.

``torch.ops.dropblock_inject.drop_block`` is opaque to inductor: the activation must be written out before
it and read again after it, so the BatchNorm before a DropBlock can no longer be fused with the ReLU or the
residual add after it, forward and backward. Under ``torch.compile`` the modules call
``torch.ops.dropblock_inject.drop_block_fusible`` instead, one node in dynamo's graph (so compiled graphs
still see one DropBlock call reading the ``keep_prob`` tensor) whose ``CompositeImplicitAutograd`` kernel
AOT autograd decomposes into

* ``torch.ops.dropblock_inject.drop_block_mask``: the keep mask alone (``bool``, 1 byte per cell, or a
  small broadcast mask) and the fp32 0-d scale, from the same kernels as the op (the sparse seed draw on
  CPU, the Triton seeds and mask kernels on CUDA, the dense ones elsewhere). It reads only keep_prob and the
  input's shape, device and layout, never the input itself, so it does not stand between the input's
  producer and its consumers;
* ``torch.where(mask, x * scale, 0)``: plain aten ops, whose forward and backward (``grad * mask *
  scale``) inductor fuses into the kernels around them. Autograd keeps the mask (1 byte per element) for
  backward.

The mask op is tagged ``nondeterministic_seeded``, so AOT autograd's CSE never merges two of its calls
(identical arguments, different masks). torch.export and torch.fx keep calling ``drop_block`` (one opaque
node: its backward state is 24 bytes, and exported programs stay device-agnostic).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _triton
from ._check import _geometry
from ._dense import _dense_block_counts, _normalizer
from ._library import BROADCAST, DENSE, SPARSE, TRITON, _clipped_geometry, mode_for
from ._sparse import sparse_keep_mask


def mask_shape(shape: tuple, mode: str, block_size: int, per_channel: bool) -> tuple:
    """The shape of the mask that :func:`drop_block_mask` returns for an input of ``shape``.

    Args:
        shape: the input's shape ``(N, C, *spatial)``.
        mode: the kernel (:func:`~dropblock_inject.ops._library.mode_for`).
        block_size: the requested block size.
        per_channel: a mask per channel.

    Returns:
        ``shape`` itself for a per-channel mask, ``(N, 1, *spatial)`` for a shared one, and
        ``(N, C, 1, ...)`` for a per-channel block covering the whole map (outside Triton).
    """
    n, c, *spatial = shape
    if mode == BROADCAST:
        _, valid, _ = _clipped_geometry(tuple(spatial), block_size)
        whole = all(v == 1 for v in valid)
        return (n, c if per_channel else 1, *(valid if whole else spatial))
    return (n, c if per_channel else 1, *spatial)


def _memory_format(shape: tuple, mode: str, channels_last: bool) -> torch.memory_format:
    if mode != SPARSE or not channels_last:
        return torch.contiguous_format
    return torch.channels_last if len(shape) == 4 else torch.channels_last_3d


@torch.library.custom_op("dropblock_inject::drop_block_mask", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def drop_block_mask(keep_prob: Tensor, shape: list[int], device: torch.device, block_size: int,
                    per_channel: bool, scale: bool, channels_last: bool) -> tuple[Tensor, Tensor]:
    """DropBlock's keep mask and scale for an input of ``shape`` on ``device`` (not the input itself).

    Args:
        keep_prob: a one-element tensor, in [0, 1].
        shape: the input's shape ``(N, C, *spatial)``.
        device: the input's device.
        block_size: the requested block size (clipped to the map).
        per_channel: a mask per channel, or one per sample.
        scale: compute ``numel(mask) / sum(mask)``; otherwise the scale is 1.
        channels_last: the input is channels-last (a full-size CPU mask then is too).

    Returns:
        The ``bool`` mask (``True`` where kept; shape :func:`mask_shape`) and the fp32 0-d scale on ``device``
        (0 when nothing is kept). On CPU, keep_prob 1 draws no random numbers.
    """
    shape = tuple(shape)
    mode = mode_for(device, shape[2:], block_size, per_channel)
    if mode == TRITON:
        return _triton.triton_keep_mask(keep_prob, shape, device, block_size, per_channel, scale)
    block, valid, factor = _geometry(shape[2:], block_size)
    one = torch.ones((), dtype=torch.float32, device=device)
    small = mask_shape(shape, mode, block_size, per_channel)
    if device.type == "cpu":  # a Python float: reading a CPU tensor is no host sync
        gamma: Tensor | float = (1.0 - float(keep_prob)) * factor
        if gamma <= 0.0 or math.prod(shape) == 0:  # keep_prob 1: nothing to draw
            return torch.ones(small, dtype=torch.bool), one
        if mode == SPARSE:
            keep, factor_f = sparse_keep_mask(shape, gamma, block, valid, scale,
                                              _memory_format(shape, mode, channels_last))
            return keep, torch.tensor(factor_f, dtype=torch.float32)
    else:  # on a device gamma stays there (no host sync), so keep_prob 1 draws like any other value
        gamma = (1.0 - keep_prob.to(device=device, dtype=torch.float32).reshape(())) * factor
    if mode == BROADCAST and all(v == 1 for v in valid):
        keep = torch.rand(small, device=device) >= gamma
    else:
        keep = _dense_block_counts(small, block, valid, gamma, device) == 0
    return keep, _normalizer(keep.sum(dtype=torch.float32), keep.numel()) if scale else one


@drop_block_mask.register_fake
def _drop_block_mask_fake(keep_prob: Tensor, shape: list[int], device: torch.device, block_size: int,
                          per_channel: bool, scale: bool, channels_last: bool) -> tuple[Tensor, Tensor]:
    shape = tuple(shape)
    mode = mode_for(device, shape[2:], block_size, per_channel)
    keep = torch.empty(mask_shape(shape, mode, block_size, per_channel), dtype=torch.bool, device=device,
                       memory_format=_memory_format(shape, mode, channels_last))
    return keep, torch.empty((), dtype=torch.float32, device=device)


def _channels_last_mask(x: Tensor) -> bool:
    """Whether the mask should be channels-last: when x is, and on CPU with oneDNN, where inductor lays out
    every graph that holds a convolution channels-last (``GraphLowering.decide_layout_opt``) after tracing,
    so an activation that is contiguous here is channels-last in the compiled kernels. A mask in the other
    layout makes the fused forward and backward kernels gather it element by element (measured: 3.6x the
    added kernel time of a matching mask in ResNet-50's layer3 and layer4)."""
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if x.is_contiguous(memory_format=fmt) and not x.is_contiguous():
        return True
    return x.device.type == "cpu" and torch.backends.mkldnn.is_available()


def drop_block_fusible(x: Tensor, keep_prob: Tensor, block_size: int, per_channel: bool, scale: bool) -> Tensor:
    """``x * mask * scale`` as the mask op and a product of aten ops (the fusible op's kernel).

    Args:
        x: the input ``(N, C, H, W)`` or ``(N, C, T, H, W)``.
        keep_prob: a one-element tensor, in [0, 1].
        block_size: the requested block size.
        per_channel: a mask per channel, or one per sample.
        scale: scale by ``numel(mask) / sum(mask)``.

    Returns:
        The output, in x's dtype; dropped cells are 0 whatever the input holds there (inf and NaN too).
    """
    keep, factor = torch.ops.dropblock_inject.drop_block_mask(keep_prob, list(x.shape), x.device, block_size,
                                                              per_channel, scale, _channels_last_mask(x))
    return torch.where(keep, x * factor, 0.0)


_lib = torch.library.Library("dropblock_inject", "FRAGMENT")
_lib.define("drop_block_fusible(Tensor x, Tensor keep_prob, int block_size, bool per_channel, bool scale) "
            "-> Tensor", tags=(torch.Tag.nondeterministic_seeded,))
_lib.impl("drop_block_fusible", drop_block_fusible, "CompositeImplicitAutograd")
