"""DropBlock under ``torch.compile``: the mask is a registered op, the multiply is left to the compiler.

``torch.ops.dropblock_inject.drop_block`` is opaque to inductor: a compiled graph must write the
activation out before it, and the op reads it and writes a new one, in forward and again in backward. At
ResNet-50 scale that alone costs ~5% of a compiled train step, whatever the op computes. So a compiled
graph (``torch.compile``, not ``torch.export``, which keeps the one op) calls ``drop_block_mask`` instead,
which only draws the mask, and multiplies by it in plain arithmetic, ``x * keep * scale``. Inductor fuses that
product into the kernel that produces ``x`` (a BatchNorm's normalisation, the ReLU after it) and into the
backward kernels, and autograd saves the ``bool`` mask for backward: 1 byte per element. Traced where the
DropBlock runs, the extern mask call would still split a BatchNorm's kernel in two: an inductor pass moves
it up to the graph's inputs (``_hoist``).

The mask is the one the fused op would apply: the same kernel picks the same seeds from the same random
numbers (the sparse CPU kernel from a private generator seeded by torch's; on CUDA with Triton the fused
kernel's philox seeds and keep map, without its product launch), so eager, fx-traced, exported and compiled
models drop the same blocks under the same ``torch.manual_seed``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._check import _layout_strides
from ._dense import broadcast_multiplier, dense_keep_mask, multiplier_shape
from ._library import BROADCAST, SPARSE, TRITON, _clipped_geometry, dense_seed_rate, keep_out_of_cse, kernel_mode
from ._sparse import draw_seed, seeded_generator, sparse_keep_mask
from ._triton import keep_shape, triton_mask


def _like(shape: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A stand-in for the input, with its shape, dtype and device and no memory (what the kernels read)."""
    return torch.empty((), dtype=dtype, device=device).expand(shape)


def follows_stride(shape: list[int], dtype: torch.dtype, device: torch.device, block_size: int,
                   per_channel: bool) -> bool:
    """Whether the mask op lays its mask out with the ``stride`` argument (the sparse CPU kernel does; the
    Triton, dense and broadcast masks are contiguous)."""
    return kernel_mode(_like(shape, dtype, device), block_size, per_channel) == SPARSE


# The op does not take the input itself: an input would make inductor write the activation out before the
# call, and the product could no longer fuse with the kernel that computes the activation.
# nondeterministic_seeded: two calls with the same arguments are two masks (no CSE, no recompute).
@torch.library.custom_op("dropblock_inject::drop_block_mask", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def drop_block_mask(shape: list[int], stride: list[int], dtype: torch.dtype, device: torch.device,
                    keep_prob: Tensor, block_size: int, per_channel: bool, scale: bool) -> tuple[Tensor, Tensor]:
    """The mask and scale of DropBlock for an input of ``shape``, whose product with it is DropBlock's output.

    Args:
        shape: the input's shape, ``(N, C, H, W)`` or ``(N, C, T, H, W)``.
        stride: the input's strides (a CPU per-channel mask is laid out with them).
        dtype: the input's dtype (that of a broadcast multiplier).
        device: the input's device.
        keep_prob: a one-element tensor, in [0, 1].
        block_size: the requested block size (clipped to the map).
        per_channel: a mask per channel, or one per sample.
        scale: scale by ``numel(mask) / sum(mask)``; otherwise the scale is 1.

    Returns:
        ``(keep, scale)``, with ``x * keep * scale`` the output, ``scale`` an fp32 0-d tensor. On CUDA with
        Triton (the fused op's seeds, rows, mask and scale kernels): ``keep`` is a contiguous ``bool`` tensor of
        x's shape, or ``(N, 1, *spatial)`` when shared. Elsewhere, per-channel masks: ``keep`` is ``bool`` of x's shape (with
        ``stride`` on CPU, contiguous elsewhere); broadcast masks (shared across channels, or a block covering
        the whole map): ``keep`` is the small scaled multiplier in ``dtype`` and ``scale`` is 1.
    """
    like = _like(shape, dtype, device)
    block, valid, factor = _clipped_geometry(tuple(shape[2:]), block_size)
    mode = kernel_mode(like, block_size, per_channel)
    if mode == TRITON:  # the fused kernel's seeds and mask, from the same philox seed
        return triton_mask(shape, keep_prob, block_size, per_channel, scale, like.device)
    if mode == SPARSE:
        gamma = (1.0 - float(keep_prob)) * factor
        keep, applied = sparse_keep_mask(tuple(shape), tuple(stride), gamma, block, valid, scale,
                                         seeded_generator(draw_seed(gamma)))  # as the fused op draws
        return keep, torch.tensor(applied, dtype=torch.float32)
    gamma_t = dense_seed_rate(keep_prob, factor, like.device)
    if mode == BROADCAST:
        multiplier = broadcast_multiplier(like, gamma_t, block, valid, per_channel, scale)
        return multiplier, torch.ones((), dtype=torch.float32, device=like.device)
    return dense_keep_mask(like, gamma_t, block, valid, scale)


@drop_block_mask.register_fake
def _drop_block_mask_fake(shape: list[int], stride: list[int], dtype: torch.dtype, device: torch.device,
                          keep_prob: Tensor, block_size: int, per_channel: bool,
                          scale: bool) -> tuple[Tensor, Tensor]:
    from . import _hoist  # torch._inductor, imported only once something traces the op

    _hoist.install()  # every compile runs this fake kernel first: inductor will move the op up (see _hoist)
    keep_out_of_cse()
    like = _like(shape, dtype, device)
    mode = kernel_mode(like, block_size, per_channel)
    scale_t = torch.empty((), dtype=torch.float32, device=device)
    if mode == TRITON:
        return torch.empty(keep_shape(shape, per_channel), dtype=torch.bool, device=device), scale_t
    if mode == SPARSE:
        return torch.empty_strided(shape, stride, dtype=torch.bool, device=device), scale_t
    if mode == BROADCAST:
        _, valid, _ = _clipped_geometry(tuple(shape[2:]), block_size)
        return torch.empty(multiplier_shape(like, valid, per_channel), dtype=dtype, device=device), scale_t
    return torch.empty(shape, dtype=torch.bool, device=device), scale_t


def masked(x: Tensor, keep_prob: Tensor, block_size: int, per_channel: bool, scale: bool) -> Tensor:
    """DropBlock as ``x * keep * scale`` with the mask of :func:`drop_block_mask` (what compiled graphs run).

    Args:
        x: the input.
        keep_prob: a one-element tensor, in [0, 1].
        block_size: the requested block size.
        per_channel: a mask per channel, or one per sample.
        scale: scale by ``numel(mask) / sum(mask)``.

    Returns:
        The output, in x's dtype; its gradient is ``grad * keep * scale`` by autograd.
    """
    keep, factor = drop_block_mask(list(x.shape), list(_layout_strides(x)), x.dtype, x.device, keep_prob, block_size,
                                   per_channel, scale)
    return x * keep * factor

