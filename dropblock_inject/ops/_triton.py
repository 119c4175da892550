"""The fused accelerator kernel's launchers: five launches of the programs in ``_triton_kernels`` (seeds, rows,
mask and count, scale, apply), none of which syncs with the host; ``gamma`` is computed on the device from the
``keep_prob`` tensor, so a new keep_prob is a new value, not a new kernel (nor a recompile).

Backward keeps only the philox seed, the threshold and the scale (20 bytes) and redraws the keep map from them
(philox is counter-based); the seed, row and keep maps are temporaries of one launch sequence. Compiled graphs
run launches 1 to 4 only (:meth:`TritonKernel.mask`, through the mask op) and leave the product to inductor.
"""

import math
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch import Tensor

from ._check import geometry
from ._kernel import Kernel
from ._triton_kernels import AVAILABLE, CHANNELS_LAST, CONTIGUOUS, STRIDED, kernels, triton


def _dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(T, H, W)`` of a 2-D or 3-D map (T = 1 for 2-D)."""
    return (1, *shape) if len(shape) == 2 else shape  # type: ignore[return-value]


def _strides5(t: Tensor) -> tuple[int, ...]:
    """``t``'s strides as ``(N, C, T, H, W)`` ones (T's 0 for 2-D)."""
    n, c, *rest = t.stride()
    return (n, c, 0, *rest) if len(rest) == 2 else (n, c, *rest)


def _tiles(n_rows: int, width: int, lanes: int, wide: bool) -> tuple[tuple[int, int], dict]:
    """Grid and tile of a kernel over an ``(n_rows, width)`` map, ``lanes`` per program: whole rows per program
    where they fit, else a row split over a second grid axis."""
    block_w = min(triton.next_power_of_2(width), lanes)
    block_r = lanes // block_w
    return (triton.cdiv(n_rows, block_r), triton.cdiv(width, block_w)), dict(WIDE=wide, BLOCK_R=block_r,
                                                                             BLOCK_W=block_w)


class _Maps(NamedTuple):
    """The sizes one keep map is built with: map, clipped block, valid region, row and word counts."""

    planes: int
    size: tuple[int, int, int]  # (T, H, W), T = 1 for 2-D
    block: tuple[int, int, int]
    valid: tuple[int, int, int]
    factor: float  # gamma's feature-size factor
    anchor_rows: int  # planes * VT * VH rows of VW anchors, in the seed map and the row map
    seed_words: int  # a seed map row: VW bytes, padded to whole int64 words
    row_words: int  # a row map row: W bytes, likewise
    wide: bool  # some byte index reaches 2**31: 64-bit indices

    @classmethod
    def of(cls, planes: int, spatial: tuple[int, ...], block_size: int) -> "_Maps":
        block, valid, factor = geometry(spatial, block_size)
        if planes * math.prod(valid) >= 2**31:
            raise ValueError(f"the fused DropBlock kernel draws one philox counter per seed position and supports "
                             f"fewer than 2**31 of them, but this input has {planes * math.prod(valid)}")
        size, valid3 = _dims(spatial), _dims(valid)
        anchor_rows, row_words = planes * valid3[0] * valid3[1], triton.cdiv(size[2], 8)
        # the largest byte index of any map, with the 8 cells of a map row's last word
        wide = max(planes * math.prod(spatial), anchor_rows * row_words * 8) + 8 >= 2**31
        return cls(planes, size, _dims(block), valid3, factor, anchor_rows, triton.cdiv(valid3[2], 8), row_words,
                   wide)


def _seed_map(ks: SimpleNamespace, maps: _Maps, state: Tensor, keep_prob: Tensor | None = None,
              count: Tensor | None = None) -> Tensor:
    """Launch 1: the ``uint8`` seed map, ``maps.anchor_rows`` rows of ``seed_words * 8`` bytes (0 past VW).

    In forward (a ``keep_prob`` and a ``count``) the kernel writes the threshold into ``state[1]`` and zeroes
    ``count``; in backward it reads the threshold from ``state[1]``.
    """
    pitch = maps.seed_words * 8
    seeds = torch.empty(maps.anchor_rows * pitch, dtype=torch.uint8, device=state.device)
    grid, tile = _tiles(maps.anchor_rows, pitch, ks.block, maps.wide)
    forward = count is not None
    ks.seeds[grid](state, keep_prob if forward else state, count if forward else state, seeds, maps.anchor_rows,
                   maps.valid[2], pitch, maps.factor, FORWARD=forward, **tile)
    return seeds


def _block_mask(ks: SimpleNamespace, maps: _Maps, seeds: Tensor, count: Tensor | None = None) -> Tensor:
    """Launches 2 and 3: the flat ``uint8`` keep map of a seed map, its stride-1 max-pool by the block, along W
    (into the row map, ``int64`` words of eight 0/1 bytes), then along H and T; the kept cells are added to
    ``count`` where one is given."""
    (t, h, w), (bt, bh, bw), (vt, vh, _) = maps.size, maps.block, maps.valid
    rows = torch.empty(maps.anchor_rows * maps.row_words, dtype=torch.int64, device=seeds.device)
    grid, tile = _tiles(maps.anchor_rows, maps.row_words, ks.words, maps.wide)
    ks.rows[grid](seeds.view(torch.int64), rows, maps.anchor_rows, maps.seed_words, maps.row_words, BW=bw, **tile)
    keep = torch.empty(maps.planes * t * h * w, dtype=torch.uint8, device=seeds.device)
    grid, tile = _tiles(maps.planes * t * h, maps.row_words, ks.words, maps.wide)
    ks.mask[grid](rows, keep, keep if count is None else count, maps.planes * t * h, t, h, w, vt, vh,
                  maps.row_words, BT=bt, BH=bh, COUNT=count is not None, **tile)
    return keep


def _keep_map(ks: SimpleNamespace, state: Tensor, mask_planes: int, spatial: tuple[int, ...], block_size: int,
              keep_prob: Tensor | None = None, count: Tensor | None = None) -> Tensor:
    """Launches 1 to 3: the flat ``uint8`` keep map of ``mask_planes`` planes (in forward, with ``keep_prob``,
    its kept cells counted into ``count``)."""
    maps = _Maps.of(mask_planes, spatial, block_size)
    return _block_mask(ks, maps, _seed_map(ks, maps, state, keep_prob, count), count)


def _layout(x: Tensor, out: Tensor) -> int:
    """How the apply kernel reads ``x`` and writes ``out``: by the flat index when both are contiguous, or
    both channels-last, else through their strides."""
    if x.stride() == out.stride():
        if x.is_contiguous():
            return CONTIGUOUS
        if x.dim() in (4, 5) and x.is_contiguous(memory_format=_CHANNELS_LAST[x.dim()]):
            return CHANNELS_LAST
    return STRIDED


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _launch_apply(ks: SimpleNamespace, x: Tensor, keep: Tensor, scale: Tensor, per_channel: bool) -> Tensor:
    """Launch 5: ``where(keep, x * scale, 0)``, laid out as ``torch.empty_like(x)``."""
    out = torch.empty_like(x)
    _, c, *spatial = x.shape
    t, h, w = _dims(tuple(spatial))
    ks.apply[(triton.cdiv(x.numel(), ks.block),)](x, out, keep, scale, x.numel(), c, t, h, w,
                                                   *_strides5(x), *_strides5(out), PER_CHANNEL=per_channel,
                                                   LAYOUT=_layout(x, out), WIDE=x.numel() >= 2**31,
                                                   BLOCK=ks.block)
    return out


def keep_shape(shape: list[int] | tuple[int, ...], per_channel: bool) -> tuple[int, ...]:
    """The keep map's shape for an input of ``shape``: one plane per channel, or one per sample."""
    n, c, *spatial = shape
    return (n, c if per_channel else 1, *spatial)


def _draw(ks: SimpleNamespace, shape: tuple[int, ...], keep_prob: Tensor, block_size: int, per_channel: bool,
          normalize: bool, device: torch.device, state: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """One call's draws: the state (the philox seed, from torch's generator on ``device`` unless a ``state`` is
    given, and the threshold the seeds kernel sets), the flat ``uint8`` keep map (None for an empty input) and
    the scale."""
    if state is None:
        state = torch.randint(2**62, (2,), dtype=torch.int64, device=device)
    if math.prod(shape) == 0:
        return state, None, torch.ones((), device=device)
    planes = keep_shape(shape, per_channel)
    keep_prob = keep_prob.to(device=device, dtype=torch.float32).reshape(1)
    count = torch.empty(1, dtype=torch.int64, device=device)  # zeroed by the seeds kernel
    keep = _keep_map(ks, state, planes[0] * planes[1], tuple(shape[2:]), block_size, keep_prob, count)
    scale = torch.empty((), dtype=torch.float32, device=device)
    ks.scale[(1,)](count, scale, float(keep.numel()), NORMALIZE=normalize)  # as _dense.keep_scale computes it
    return state, keep, scale


def _forward(ks: SimpleNamespace, x: Tensor, keep_prob: Tensor, block_size: int, per_channel: bool,
             normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Forward with the kernels ``ks`` (compiled, interpreted, or ``tools/_triton_aot.py``'s recorder): the
    output, the state (the philox seed and threshold) and the scale."""
    state, keep, scale = _draw(ks, tuple(x.shape), keep_prob, block_size, per_channel, normalize, x.device)
    if keep is None:
        return torch.empty_like(x), state, scale
    return _launch_apply(ks, x, keep, scale, per_channel), state, scale


def _backward(ks: SimpleNamespace, grad: Tensor, state: Tensor, scale: Tensor, block_size: int,
              per_channel: bool) -> Tensor:
    """Backward with the kernels ``ks``: the keep map redrawn from the forward's philox seed and threshold."""
    n, c, *spatial = grad.shape
    if grad.numel() == 0:
        return torch.empty_like(grad)
    keep = _keep_map(ks, state, n * (c if per_channel else 1), tuple(spatial), block_size)
    return _launch_apply(ks, grad, keep, scale, per_channel)


class TritonKernel(Kernel):
    """The fused kernel: on CUDA, compiled; on CPU tensors, run by Triton's interpreter. Forward's state is the
    philox seed (drawn from torch's generator on the input's device) and the threshold (int64, 2 values):
    backward redraws the keep map from them."""

    name = "triton"

    def forward(self, x: Tensor, keep_prob: Tensor, block_size: int, per_channel: bool,
                normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
        return _forward(kernels(x.device.type == "cpu"), x, keep_prob, block_size, per_channel, normalize)

    def backward(self, grad: Tensor, state: Tensor, scale: Tensor, block_size: int, per_channel: bool,
                 stride: list[int]) -> Tensor:
        return _backward(kernels(grad.device.type == "cpu"), grad, state, scale, block_size, per_channel)

    def mask(self, like: Tensor, stride: list[int], keep_prob: Tensor, block_size: int, per_channel: bool,
             normalize: bool) -> tuple[Tensor, Tensor]:
        """Launches 1 to 4 of forward, from the same philox seed drawn the same way (so under one
        ``torch.manual_seed`` the product is forward's output): a contiguous ``bool`` keep map ``(N, C or 1,
        *spatial)`` and the scale."""
        shape, device = tuple(like.shape), like.device
        _, keep, scale = _draw(kernels(device.type == "cpu"), shape, keep_prob, block_size, per_channel,
                               normalize, device)
        if keep is None:
            return torch.ones(keep_shape(shape, per_channel), dtype=torch.bool, device=device), scale
        return keep.view(torch.bool).view(keep_shape(shape, per_channel)), scale

    def fake_forward(self, x: Tensor, block_size: int, per_channel: bool) -> tuple[Tensor, Tensor, Tensor]:
        return torch.empty_like(x), x.new_empty((2,), dtype=torch.int64), x.new_empty((), dtype=torch.float32)

    def fake_mask(self, like: Tensor, stride: list[int], block_size: int,
                  per_channel: bool) -> tuple[Tensor, Tensor]:
        keep = torch.empty(keep_shape(like.shape, per_channel), dtype=torch.bool, device=like.device)
        return keep, torch.empty((), dtype=torch.float32, device=like.device)


TRITON = TritonKernel()
