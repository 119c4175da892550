"""Argument checks and the geometry of DropBlock: clipped block, valid seed region, seed rate ``gamma``."""

from __future__ import annotations

import functools
import math
import struct
from typing import Sequence

import torch
from torch import Tensor


def _brief(value: object) -> str:
    """``repr(value)`` cut to 60 characters, for error messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_block_size(block_size: object) -> int:
    """``block_size`` as an int in ``[1, 2**31)`` (the largest any kernel and traced graph can carry)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, but got {_brief(block_size)} ({type(block_size).__name__})")
    if not 1 <= block_size < 2**31:
        raise ValueError(f"block_size must be in [1, 2**31), but got {_brief(block_size)}")
    return int(block_size)


def _check_keep_prob(keep_prob: object) -> float:
    """``keep_prob`` as a float in ``[0, 1]`` (a one-element tensor is read)."""
    if isinstance(keep_prob, Tensor) and keep_prob.numel() == 1:
        keep_prob = keep_prob.item()
    if isinstance(keep_prob, bool) or not isinstance(keep_prob, (int, float)):
        raise TypeError(f"keep_prob must be a float, but got {_brief(keep_prob)} ({type(keep_prob).__name__})")
    if not 0.0 <= keep_prob <= 1.0:  # also rejects NaN and inf
        raise ValueError(f"keep_prob must be a finite number in [0, 1], but got {_brief(keep_prob)}")
    return float(keep_prob)


def _check_flag(name: str, value: object) -> bool:
    """``value`` as a bool; anything else (a string such as ``"false"``, an int) is a ``TypeError``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, but got {_brief(value)} ({type(value).__name__})")
    return value


def _check_input(x: Tensor, spatial_dims: int, name: str) -> None:
    """Raises the ``TypeError`` or ``ValueError`` of an input that is no floating point tensor of the rank."""
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
    block = tuple(min(block_size, s) for s in spatial)
    valid = tuple(s - b + 1 for s, b in zip(spatial, block))
    factor = math.prod(spatial) / (math.prod(block) * math.prod(valid))
    return block, valid, factor


def gamma_of(keep_prob: float | Tensor, factor: float) -> float | Tensor:
    """``gamma = (1 - keep_prob) * factor``, ``factor`` the geometry's (see :func:`geometry`): a float for a
    float ``keep_prob``, an fp32 0-d tensor on keep_prob's device for a tensor one (no host sync)."""
    if isinstance(keep_prob, Tensor):
        return (1.0 - keep_prob.to(torch.float32).reshape(())) * factor
    return (1.0 - keep_prob) * factor


def seed_rate(keep_prob: float, spatial: Sequence[int], block_size: int) -> float:
    """The per-position seed probability ``gamma`` of DropBlock on a map of size ``spatial``.

    Args:
        keep_prob: target fraction of kept activations.
        spatial: the spatial size, ``(H, W)`` or ``(T, H, W)``.
        block_size: the requested block size, clipped to each axis of the map.

    Returns:
        ``gamma = (1 - keep_prob) / prod(block) * prod(spatial) / prod(spatial - block + 1)``.
    """
    return gamma_of(keep_prob, geometry(tuple(spatial), block_size)[2])


def geometry(spatial: tuple, block_size: int) -> tuple[tuple, tuple, float]:
    """Clipped block, valid seed region and gamma's feature-size factor for a map of size ``spatial``, cached
    unless the sizes are symbolic (traced with dynamic shapes: not hashable)."""
    if all(isinstance(s, int) for s in spatial):
        return _geometry(tuple(spatial), block_size)
    return _geometry.__wrapped__(tuple(spatial), block_size)


def fp32_ratio(numel: int, kept: int) -> float:
    """``numel / kept`` rounded as an fp32 division of fp32 operands (what the tensor kernels compute), 0 when
    nothing is kept; a double division of two fp32 values rounded once to fp32 is the correctly rounded one."""
    if kept <= 0:
        return 0.0
    numel32, kept32 = struct.unpack("2f", struct.pack("2f", numel, kept))
    return struct.unpack("f", struct.pack("f", numel32 / kept32))[0]


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
