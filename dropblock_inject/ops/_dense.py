"""The dense kernel: a Bernoulli seed map grown into blocks by running sums, applied as a ``bool`` mask.

It runs on any device: the fallback where there is no fused kernel (CUDA without Triton, or a Triton kernel
that failed its first-call check), and the kernel of masks shared across channels on CPU. The mask has the
input's shape, or a smaller one broadcast over it (one plane per sample with ``per_channel=False``, one value
per plane when the block covers the whole map); backward keeps the mask and the scale.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._check import _fills_its_memory, fp32_ratio, gamma_of, geometry
from ._kernel import Kernel, apply_keep


def dense_keep_mask(shape: Sequence[int], gamma: Tensor | float, block: tuple[int, ...], valid: tuple[int, ...],
                    device: torch.device) -> Tensor:
    """A contiguous ``bool`` keep mask of ``shape`` from Bernoulli(``gamma``) seeds, or, when every block covers
    the whole map (``valid`` all 1), of one draw per plane (size 1 on every spatial axis).

    Blocks are grown by running sums, exact and far cheaper on CPU than a stride-1 max-pool: the seeds are drawn
    into a zero buffer padded with ``b`` zeros in front and ``b - 1`` behind, and ``csum[p + b] - csum[p]``
    counts the seeds whose block covers ``p``.
    """
    if all(v == 1 for v in valid):
        return torch.rand((*shape[:2], *valid), device=device) >= gamma
    spatial = tuple(shape[2:])
    counts = torch.zeros((*shape[:2], *(s + b for s, b in zip(spatial, block))), device=device)
    seeds = counts
    for dim, (size, length) in enumerate(zip(block, valid), start=2):
        seeds = seeds.narrow(dim, size, length)
    seeds.bernoulli_(gamma)  # in place on the view: 1.0 for a seed, 0.0 elsewhere
    for dim, (size, length) in enumerate(zip(block, spatial), start=2):
        csum = counts.cumsum(dim)
        counts = csum.narrow(dim, size, length) - csum.narrow(dim, 0, length)
    return counts == 0


def _normalizer(kept: Tensor, numel: int) -> Tensor:
    """``numel / kept`` in fp32, 0 when nothing is kept; a true division (``numel / tensor`` would multiply by a
    rounded reciprocal, 1 ulp off at kept == numel)."""
    return torch.where(kept > 0, torch.full_like(kept, numel).div_(kept.clamp_min(1.0)), 0.0)


def keep_scale(keep: Tensor, normalize: bool) -> Tensor:
    """The fp32 0-d scale of a keep mask (``bool`` or ``uint8``): ``numel / kept``, 0 when nothing is kept, or
    1 when not ``normalize``; on the mask's device, with no host sync. The count is exact (an int64 sum)."""
    if not normalize:
        return torch.ones((), dtype=torch.float32, device=keep.device)
    if keep.device.type == "cpu":  # no sync to avoid: Python scalars are several times cheaper than tensor ops
        return torch.tensor(fp32_ratio(keep.numel(), int(keep.sum())), dtype=torch.float32)
    return _normalizer(keep.sum(dtype=torch.int64).to(torch.float32), keep.numel())


def mask_shape(shape: Sequence[int], valid: Sequence[int], per_channel: bool) -> tuple[int, ...]:
    """The keep mask's shape: ``(N, C or 1, *spatial)``, with 1s for the map when the block covers it."""
    whole = all(v == 1 for v in valid)
    return (shape[0], shape[1] if per_channel else 1, *(valid if whole else shape[2:]))


class DenseKernel(Kernel):
    """The dense kernel: a ``bool`` mask of :func:`mask_shape`, broadcast over the input."""

    name = "dense"

    def mask(self, like: Tensor, stride: list[int], keep_prob: Tensor | float, block_size: int,
             per_channel: bool, normalize: bool) -> tuple[Tensor, Tensor]:
        block, valid, factor = geometry(tuple(like.shape[2:]), block_size)
        shape = mask_shape(like.shape, valid, per_channel)
        if isinstance(keep_prob, Tensor) and like.device.type == "cpu":
            keep_prob = float(keep_prob)  # bernoulli_(float) is much faster there, and there is no sync to avoid
        elif isinstance(keep_prob, Tensor):
            keep_prob = keep_prob.to(like.device)
        if isinstance(keep_prob, float) and keep_prob >= 1.0:  # nothing to drop: no random numbers drawn
            return (torch.ones(shape, dtype=torch.bool, device=like.device),
                    torch.ones((), dtype=torch.float32, device=like.device))
        keep = dense_keep_mask((*shape[:2], *like.shape[2:]), gamma_of(keep_prob, factor), block, valid,
                               like.device)
        return keep, keep_scale(keep, normalize)

    def forward(self, x: Tensor, keep_prob: Tensor, block_size: int, per_channel: bool,
                normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
        keep, scale = self.mask(x, list(x.stride()), keep_prob, block_size, per_channel, normalize)
        return apply_keep(x, keep, scale, torch.empty_like(x)), keep, scale

    def backward(self, grad: Tensor, state: Tensor, scale: Tensor, block_size: int, per_channel: bool,
                 stride: list[int]) -> Tensor:
        return apply_keep(grad, state, scale, torch.empty_like(grad))

    def fake_mask(self, like: Tensor, stride: list[int], block_size: int,
                  per_channel: bool) -> tuple[Tensor, Tensor]:
        _, valid, _ = geometry(tuple(like.shape[2:]), block_size)
        keep = torch.empty(mask_shape(like.shape, valid, per_channel), dtype=torch.bool, device=like.device)
        return keep, torch.empty((), dtype=torch.float32, device=like.device)

    def fake_forward(self, x: Tensor, block_size: int, per_channel: bool) -> tuple[Tensor, Tensor, Tensor]:
        keep, scale = self.fake_mask(x, list(x.stride()), block_size, per_channel)
        return torch.empty_like(x), keep, scale

    def eager(self, x: Tensor, keep_prob: float, keep_prob_tensor: Tensor | None, block_size: int,
              per_channel: bool, normalize: bool, inplace: bool) -> Tensor:
        keep, scale = self.mask(x, list(x.stride()), keep_prob, block_size, per_channel, normalize)
        return apply_keep(x, keep, scale, x if inplace and _fills_its_memory(x) else None)


DENSE = DenseKernel()
