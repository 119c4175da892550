"""Statistical helpers shared by the op's tests: the analytic drop fraction and mask shape checks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TOL = 0.015  # ±1.5 percentage points on drop fractions


def expected_drop_fraction(keep_prob: float, block_size: int, spatial: tuple[int, ...]) -> float:
    """The exact expected fraction of dropped cells.

    Cell ``p`` is dropped with probability ``1 - (1 - gamma) ** c(p)``, ``c(p)`` being the number of valid
    seed positions whose (clipped) block covers it: per axis, the anchors ``i`` in ``[0, size - b]`` with
    ``i <= p <= i + b - 1``, multiplied over the axes.
    """
    block = [min(block_size, s) for s in spatial]
    valid = [s - b + 1 for s, b in zip(spatial, block)]
    gamma = (1 - keep_prob) / math.prod(block) * math.prod(spatial) / math.prod(valid)
    counts = torch.ones((), dtype=torch.float64)
    for s, b in zip(spatial, block):
        axis = torch.tensor([min(p, s - b) - max(0, p - b + 1) + 1 for p in range(s)], dtype=torch.float64)
        counts = counts.unsqueeze(-1) * axis
    return float((1 - (1 - gamma) ** counts).mean())


def block_union(zero: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
    """Union of the ``block`` windows lying entirely inside the map and entirely within ``zero``."""
    pool_avg = F.avg_pool2d if len(block) == 2 else F.avg_pool3d
    pool_max = F.max_pool2d if len(block) == 2 else F.max_pool3d
    z = zero.to(torch.float64).flatten(0, 1).unsqueeze(1)
    full = (pool_avg(z, block, stride=1) > 1 - 1e-9).to(torch.float64)  # window anchored at p all zero
    pad: list[int] = []
    for b in reversed(block):
        pad += [b - 1, b - 1]
    grown = pool_max(F.pad(full, pad), block, stride=1) > 0
    return grown.squeeze(1).unflatten(0, zero.shape[:2])


def clipped(block_size: int, spatial: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(min(block_size, s) for s in spatial)


def assert_whole_blocks(y: torch.Tensor, block_size: int) -> None:
    """For an input of ones: the zeros are exactly a union of whole in-map blocks."""
    zero = y == 0
    assert torch.equal(block_union(zero, clipped(block_size, tuple(y.shape[2:]))), zero)


def assert_scaled_mask(y: torch.Tensor, scale: bool = True) -> None:
    """For an input of ones: every value is 0 or numel / kept (or 1 without scaling); all finite."""
    assert torch.isfinite(y).all()
    kept = int((y != 0).sum())
    if kept == 0:
        return
    value = y.numel() / kept if scale else 1.0
    rtol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(y.dtype, 1e-6)
    nz = y[y != 0].to(torch.float64)
    torch.testing.assert_close(nz, torch.full_like(nz, value), rtol=rtol, atol=0)


def drop_fraction(fn, shape, draws: int) -> float:
    x = torch.ones(shape)
    return sum(float((fn(x) == 0).to(torch.float64).mean()) for _ in range(draws)) / draws


def stat_shape(spatial: tuple[int, ...], channels: int, shared: bool = False) -> tuple[int, ...]:
    """A batch of >= 4096 independent maps (more for small maps, ~2**19 cells), as (N, channels, *spatial).

    With ``shared`` masks, the maps are the samples: N is the number of maps.
    """
    maps = max(4096, 2**19 // math.prod(spatial))
    return (maps if shared else maps // channels, channels, *spatial)
