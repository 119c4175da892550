"""The dense kernels: block counts by running sums, the generic per-channel mask and broadcast masks.

The per-channel dense kernel is the fallback for devices with no fused kernel (and CUDA without Triton): a
Bernoulli seed map grown into blocks, applied with a ``bool`` mask that backward keeps. Masks broadcast over
the input (shared across channels with ``per_channel=False``, or one value per channel when the block covers
the whole map) are small: they are built on every device as the scaled multiplier itself, and backward keeps
only that small multiplier.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def _dense_block_counts(mask_shape: Sequence[int], block: tuple[int, ...], valid: tuple[int, ...],
                        gamma: Tensor | float, device: torch.device) -> Tensor:
    """Per position of ``mask_shape``, the number of Bernoulli(``gamma``) valid seeds whose block covers it.

    Blocks are grown with running sums: the seeds are drawn straight into a zero buffer padded on each axis
    with ``b`` zeros in front and ``b - 1`` behind, and ``csum[p + b] - csum[p]`` counts the seeds whose
    block covers position ``p``. This is exact (small integers in fp32) and far cheaper than the usual
    stride-1 max-pool of the seed map (a 7x7 max-pool costs ~100x more on CPU). Returns fp32 counts.
    """
    spatial = tuple(mask_shape[2:])
    counts = torch.zeros((*mask_shape[:2], *(s + b for s, b in zip(spatial, block))), device=device)
    seeds = counts
    for dim, (size, length) in enumerate(zip(block, valid), start=2):
        seeds = seeds.narrow(dim, size, length)
    seeds.bernoulli_(gamma)  # in place on the view: 1.0 for a seed, 0.0 elsewhere
    for dim, (size, length) in enumerate(zip(block, spatial), start=2):
        csum = counts.cumsum(dim)
        counts = csum.narrow(dim, size, length) - csum.narrow(dim, 0, length)
    return counts


def _normalizer(kept: Tensor, numel: int) -> Tensor:
    """``numel / kept`` in fp32, and 0 when nothing is kept (a zero mask must not meet an inf scale)."""
    # a true division: ``numel / tensor`` would multiply by a rounded reciprocal (1 ulp off at kept == numel)
    return torch.where(kept > 0, torch.full_like(kept, numel).div_(kept.clamp_min(1.0)), 0.0)


def dense_keep_mask(x: Tensor, gamma: Tensor | float, block: tuple[int, ...], valid: tuple[int, ...],
                    normalize: bool) -> tuple[Tensor, Tensor]:
    """A per-channel ``bool`` keep mask built densely (no host sync), and its scale.

    Args:
        x: the input ``(N, C, *spatial)`` (only its shape and device are read).
        gamma: the seed rate, a float or a 0-d tensor on x's device.
        block: the clipped block.
        valid: the valid seed region.
        normalize: scale by ``numel / kept``; otherwise the scale is 1.

    Returns:
        The contiguous ``bool`` mask of x's shape and the fp32 0-d scale, both on x's device.
    """
    keep = _dense_block_counts(x.shape, block, valid, gamma, x.device) == 0
    return keep, keep_scale(keep, normalize)


def keep_scale(keep: Tensor, normalize: bool) -> Tensor:
    """The fp32 0-d scale of a keep mask (``bool`` or ``uint8``): ``numel / kept``, 0 when nothing is kept, or
    1 when not ``normalize``; on the mask's device, with no host sync. The count is exact (an int64 sum)."""
    if not normalize:
        return torch.ones((), dtype=torch.float32, device=keep.device)
    return _normalizer(keep.sum(dtype=torch.int64).to(torch.float32), keep.numel())


def dense_forward(x: Tensor, gamma: Tensor | float, block: tuple[int, ...], valid: tuple[int, ...],
                  normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``x * keep * scale`` with the mask of :func:`dense_keep_mask`.

    Returns:
        The output (laid out as ``torch.empty_like(x)``), the ``bool`` keep mask and the fp32 0-d scale.
    """
    keep, scale = dense_keep_mask(x, gamma, block, valid, normalize)
    return apply_keep_mask(x, keep, scale), keep, scale


def apply_keep_mask(x: Tensor, keep: Tensor, scale: Tensor) -> Tensor:
    """``x * keep * scale`` written into ``torch.empty_like(x)`` (so its layout is known in advance)."""
    out = torch.empty_like(x)
    torch.mul(x, keep, out=out)
    return out.mul_(scale.to(x.dtype))


def multiplier_shape(x: Tensor, valid: tuple[int, ...], per_channel: bool) -> tuple[int, ...]:
    """The shape of :func:`broadcast_multiplier`'s result: ``(N, C or 1, *spatial)``, or ``(N, C or 1, 1...)``
    when every block covers the whole map."""
    whole = all(v == 1 for v in valid)
    return (x.shape[0], x.shape[1] if per_channel else 1, *(valid if whole else x.shape[2:]))


def broadcast_multiplier(x: Tensor, gamma: Tensor | float, block: tuple[int, ...], valid: tuple[int, ...],
                         per_channel: bool, normalize: bool) -> Tensor:
    """The scaled multiplier of a mask broadcast over ``x``, in x's dtype.

    One mask per sample (``per_channel=False``), or one value per channel when every block covers the whole
    map. ``numel(mask) / sum(mask)`` over the small mask equals the ratio over the broadcast one.

    Args:
        x: the input ``(N, C, *spatial)``.
        gamma: the seed rate, a float or a 0-d tensor on x's device.
        block: the clipped block.
        valid: the valid seed region.
        per_channel: one mask per channel (only in the whole-map case) or one per sample.
        normalize: scale by ``numel / kept``.

    Returns:
        ``(N, C or 1, *spatial or 1s)``: 0 where dropped, the scale where kept.
    """
    if isinstance(gamma, float) and gamma <= 0.0:  # keep_prob 1: nothing to drop, no random numbers drawn
        return torch.ones(multiplier_shape(x, valid, per_channel), dtype=x.dtype, device=x.device)
    mask_shape = (x.shape[0], x.shape[1] if per_channel else 1, *x.shape[2:])
    if valid == (1,) * len(valid):
        multiplier = torch.rand((*mask_shape[:2], *valid), device=x.device).ge_(gamma)
    else:
        multiplier = _dense_block_counts(mask_shape, block, valid, gamma, x.device).eq_(0)
    if normalize:
        if isinstance(gamma, Tensor) or x.device.type != "cpu":  # on a device: no host sync
            multiplier.mul_(_normalizer(multiplier.sum(), multiplier.numel()))
        else:  # eager CPU: a Python scalar is several times cheaper than the tensor arithmetic
            kept = multiplier.sum().item()
            multiplier.mul_(multiplier.numel() / kept if kept else 0.0)
    return multiplier.to(x.dtype)


class _ApplyKeepMask(torch.autograd.Function):
    """``x * keep * scale`` for a ``bool`` mask of x's shape; saves the mask, not a float copy."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(keep, scale)
        return apply_keep_mask(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        keep, scale = ctx.saved_tensors
        return apply_keep_mask(grad, keep, scale), None, None
