"""Argument checks and the geometry of DropBlock: clipped block, valid seed region, seed rate ``gamma``."""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import Tensor


def _check_block_size(block_size: object) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, but got {block_size!r} ({type(block_size).__name__})")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, but got {block_size}")
    return block_size


def _check_keep_prob(keep_prob: object) -> float:
    if isinstance(keep_prob, Tensor) and keep_prob.numel() == 1:
        keep_prob = keep_prob.item()
    if isinstance(keep_prob, bool) or not isinstance(keep_prob, (int, float)):
        raise TypeError(f"keep_prob must be a float, but got {keep_prob!r} ({type(keep_prob).__name__})")
    if not 0.0 <= keep_prob <= 1.0:  # also rejects NaN
        raise ValueError(f"keep_prob has to be between 0 and 1, but got {keep_prob}")
    return float(keep_prob)


def _check_input(x: Tensor, spatial_dims: int, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a Tensor input, but got {type(x).__name__}")
    rank = spatial_dims + 2
    if x.dim() != rank:
        layout = "(N, C, H, W)" if spatial_dims == 2 else "(N, C, T, H, W)"
        raise ValueError(f"{name} expects a {rank}-D input {layout}, but got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating point input, but got dtype {x.dtype}")


@functools.lru_cache(maxsize=512)
def _geometry(spatial: tuple[int, ...], block_size: int) -> tuple[tuple[int, ...], tuple[int, ...], float]:
    """Clipped block, valid seed region, and gamma's feature-size factor for a map of size ``spatial``."""
    block = tuple(min(block_size, s) for s in spatial)
    valid = tuple(s - b + 1 for s, b in zip(spatial, block))
    factor = math.prod(spatial) / (math.prod(block) * math.prod(valid))
    return block, valid, factor


def seed_rate(keep_prob: float, spatial: Sequence[int], block_size: int) -> float:
    """The per-position seed probability ``gamma`` of DropBlock on a map of size ``spatial``.

    Args:
        keep_prob: target fraction of kept activations.
        spatial: the spatial size, ``(H, W)`` or ``(T, H, W)``.
        block_size: the requested block size, clipped to each axis of the map.

    Returns:
        ``gamma = (1 - keep_prob) / prod(block) * prod(spatial) / prod(spatial - block + 1)``.
    """
    _, _, factor = _geometry(tuple(spatial), block_size)
    return (1.0 - keep_prob) * factor


@functools.lru_cache(maxsize=512)
def _contiguous_strides(spatial: tuple[int, ...]) -> tuple[int, ...]:
    """Strides of a contiguous map of size ``spatial`` (looked up twice per sparse call, computed once)."""
    return tuple(math.prod(spatial[i + 1:]) for i in range(len(spatial)))


def _fills_its_memory(x: Tensor) -> bool:
    """Whether x's elements fill its memory exactly (any permutation of the dimensions)."""
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last if x.dim() == 4
                                                   else torch.channels_last_3d)


def _layout_strides(x: Tensor) -> tuple[int, ...]:
    """x's strides where its elements fill its memory, else contiguous ones (``torch.empty_like``'s rule)."""
    if _fills_its_memory(x):
        return tuple(x.stride())
    return _contiguous_strides.__wrapped__(tuple(x.shape))  # traced by dynamo, which ignores lru_cache
