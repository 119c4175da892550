"""The sparse CPU kernel: per-channel masks drawn as rare block seeds, written as a scatter of zeros.

Seeds are rare (``gamma`` is well under 1% at the paper's settings), so their count is drawn from a Poisson
law and their positions uniformly, which yields exactly independent Bernoulli(``gamma``) seeds per position
(Poisson splitting). The blocks are written as a scatter of zeros; backward keeps one offset per seed (its
block's corner, 8 bytes) and recomputes the scatter.
"""

from __future__ import annotations

import functools
import math
import threading

import torch
from torch import Tensor

from ._check import _contiguous_strides, _fills_its_memory, fp32_ratio, gamma_of, geometry
from ._kernel import Kernel


def _sample_seeds(n_planes: int, n_anchors: int, gamma: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The planes and anchors of independent Bernoulli(``gamma``) seeds over ``n_planes`` maps of ``n_anchors``
    valid positions: Poisson(-log(1 - gamma) * n) uniform draws, so each position receives Poisson(-log(1 - gamma))
    of them, independently: a seed with probability exactly ``gamma`` (one drawn twice is zeroed twice)."""
    n = n_planes * n_anchors
    if n == 0 or gamma <= 0.0:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty
    if gamma >= 1.0:
        every = torch.arange(n)
        return every // n_anchors, every % n_anchors
    k = int(torch.poisson(torch.full((), -math.log1p(-gamma) * n, dtype=torch.float64), generator=generator))
    return torch.randint(n_planes, (k,), generator=generator), torch.randint(n_anchors, (k,), generator=generator)


_local = threading.local()


def _generator(seed: int) -> torch.Generator:
    """This thread's private CPU generator (one per thread, reused), reseeded with ``seed``."""
    if getattr(_local, "generator", None) is None:
        _local.generator = torch.Generator()
    return _local.generator.manual_seed(seed)


def draw_seed(gamma: float) -> int:
    """A seed for a call's private generator, drawn from torch's (so ``torch.manual_seed`` holds); 0 with no
    draw at ``gamma == 0`` (keep_prob 1: no random numbers)."""
    return int(torch.randint(2**53, (), dtype=torch.int64)) if gamma > 0 else 0


@functools.lru_cache(maxsize=512)
def _grid(extent: tuple[int, ...], strides: tuple[int, ...], device: torch.device) -> Tensor:
    """Offsets ``sum(i * stride)`` of every position ``i`` of a box of size ``extent``, in row-major order."""
    offsets = torch.zeros((), dtype=torch.long)
    for size, stride in zip(extent, strides):
        offsets = (offsets.unsqueeze(-1) + torch.arange(size) * stride).flatten()
    return offsets.to(device)


def _fill_blocks(flat: Tensor, corner: Tensor, block: tuple[int, ...], strides: tuple[int, ...],
                 value: float | bool) -> None:
    """Writes ``value`` over the block starting at ``flat[c]`` for every ``c`` in ``corner`` (``strides``: the map's
    within ``flat``), as one ``index_fill_`` of an overlapping strided view of ``flat``, a slice per start offset."""
    if corner.numel() == 0:
        return
    length = math.prod(block)
    if strides == _contiguous_strides(block) and flat.numel() % length == 0 and not bool((corner % length).any()):
        flat.view(-1, length).index_fill_(0, corner // length, value)  # whole contiguous planes: rows
        return
    span = sum((b - 1) * s for b, s in zip(block, strides))
    flat.as_strided((flat.numel() - span, *block), (1, *strides)).index_fill_(0, corner, value)


_LANES = 8 * 255  # bytes summed per int64 word lane without a carry between the 8 byte lanes
_SMALL_MAP = 1 << 17  # bytes: count_nonzero below this, word lanes above (each is faster on its side)


def _count_dropped(plane: Tensor, offset: Tensor, n_planes: int, spatial: tuple[int, ...],
                   block: tuple[int, ...]) -> int:
    """The number of distinct cells the seeds' blocks cover (``plane``: each seed's plane, ``offset``: its corner
    within a contiguous plane). Only planes holding a seed get a slot in a small byte map where the blocks are
    marked; a small map is counted by ``count_nonzero``, a large one as int64 words summed 255 at a time (no byte
    lane overflows), several times faster."""
    if plane.numel() == 0:
        return 0
    seen = torch.zeros(n_planes, dtype=torch.long, device=plane.device)
    seen.index_fill_(0, plane, 1)
    plane_numel = math.prod(spatial)
    if block == spatial:  # every block is a whole plane
        return int(seen.sum()) * plane_numel
    slot = seen.cumsum_(0).index_select(0, plane)  # 1, 2, ...: the map's plane 0 stays empty
    numel = (min(plane.numel(), n_planes) + 1) * plane_numel
    small = numel <= _SMALL_MAP
    size = numel if small else -(-numel // _LANES) * _LANES  # the lane sum reads whole groups of 255 words
    marks = torch.zeros(size, dtype=torch.uint8, device=plane.device)
    _fill_blocks(marks, torch.add(offset, slot, alpha=plane_numel), block, _contiguous_strides(spatial), 1)
    if small:
        return int(marks.count_nonzero())
    lanes = marks.view(torch.int64).view(-1, 255).sum(dim=1)
    return int(lanes.view(torch.uint8).sum())


def _flat(t: Tensor) -> Tensor:
    """A 1-D view of the memory of a non-overlapping, dense tensor (fresh, or an input checked in place)."""
    return t.as_strided((t.numel(),), (1,))


def _corners(plane: Tensor, anchor: Tensor, shape: tuple[int, ...], valid: tuple[int, ...],
             stride: tuple[int, ...], offset: Tensor | None = None) -> Tensor:
    """The blocks' first cells as offsets into a tensor of ``shape`` and ``stride`` (consumes ``plane``)."""
    c, spatial = shape[1], tuple(shape[2:])
    stride_n, stride_c, *map_strides = stride
    strides = tuple(map_strides)
    if offset is None or strides != _contiguous_strides(spatial):  # e.g. channels_last
        offset = _grid(valid, strides, plane.device).index_select(0, anchor)
    if stride_n == c * stride_c:  # contiguous, or any layout keeping the planes in order
        return offset.add_(plane, alpha=stride_c)
    return offset.add_(plane // c, alpha=stride_n).add_(plane.remainder_(c), alpha=stride_c)


def _draw_blocks(shape: tuple[int, ...], seed: int, gamma: float, block: tuple[int, ...], valid: tuple[int, ...],
                 stride: tuple[int, ...], normalize: bool) -> tuple[Tensor, float]:
    """The blocks of one call, drawn from ``_generator(seed)``: their corners as offsets into a tensor of
    ``shape`` and ``stride`` (one int64 per seed), and the fp32 scale ``numel / kept`` (1 unless ``normalize``)."""
    n, c, *spatial = shape
    plane, anchor = _sample_seeds(n * c, math.prod(valid), gamma, _generator(seed))
    offset = _grid(valid, _contiguous_strides(tuple(spatial)), torch.device("cpu")).index_select(0, anchor)
    scale = 1.0
    if normalize:
        numel = math.prod(shape)
        scale = fp32_ratio(numel, numel - _count_dropped(plane, offset, n * c, tuple(spatial), block))
    return _corners(plane, anchor, shape, valid, stride, offset), scale


def redraw_corners(shape: tuple[int, ...], gamma: float, valid: tuple[int, ...], stride: tuple[int, ...],
                   seed: int) -> Tensor:
    """The corners :func:`_draw_blocks` drew from ``seed``, for an output of ``stride``."""
    plane, anchor = _sample_seeds(shape[0] * shape[1], math.prod(valid), gamma, _generator(seed))
    return _corners(plane, anchor, shape, valid, stride)


def sparse_forward(x: Tensor, gamma: float, block: tuple[int, ...], valid: tuple[int, ...], normalize: bool,
                   out: Tensor) -> tuple[Tensor, float, int]:
    """Writes ``where(mask, x, 0) * scale`` into ``out`` (``x`` itself, or a dense tensor of x's shape); returns
    the blocks' corners in ``out``'s memory, the scale and the seed they were drawn from."""
    seed = draw_seed(gamma)
    corner, scale = _draw_blocks(tuple(x.shape), seed, gamma, block, valid, tuple(out.stride()), normalize)
    if out is x:
        x.mul_(scale)
    else:
        torch.mul(x, scale, out=out)
    _fill_blocks(_flat(out), corner, block, tuple(out.stride()[2:]), 0.0)
    return corner, scale, seed


def sparse_backward(grad: Tensor, corner: Tensor, stride: tuple[int, ...], block: tuple[int, ...],
                    scale: float) -> Tensor:
    """``where(mask, grad, 0) * scale`` laid out with ``stride`` (the forward output's, which ``corner`` indexes)."""
    grad_in = torch.mul(grad, scale) if grad.stride() == stride else None
    if grad_in is None or grad_in.stride() != stride:  # e.g. an expanded or channels_last grad
        grad_in = torch.empty_strided(grad.shape, stride, dtype=grad.dtype, device=grad.device)
        torch.mul(grad, scale, out=grad_in)  # in the layout the corners were computed for
    _fill_blocks(_flat(grad_in), corner, block, tuple(stride[2:]), 0.0)
    return grad_in


class _SparseDropBlock(torch.autograd.Function):
    """The eager CPU fast path: ``where(mask, x, 0) * scale`` with a per-channel mask; backward keeps only the seeds."""

    @staticmethod
    def forward(ctx, x: Tensor, gamma: float, block: tuple[int, ...], valid: tuple[int, ...],  # type: ignore[override]
                normalize: bool, inplace: bool) -> Tensor:
        if inplace:
            ctx.mark_dirty(x)
        out = x if inplace else torch.empty_like(x)
        corner, scale, _ = sparse_forward(x, gamma, block, valid, normalize, out)
        ctx.save_for_backward(corner)  # 8 bytes per seed
        ctx.meta = (out.stride(), block, scale)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:  # type: ignore[override]
        stride, block, scale = ctx.meta
        (corner,) = ctx.saved_tensors
        return sparse_backward(grad, corner, stride, block, scale), None, None, None, None, None


class SparseKernel(Kernel):
    """The CPU kernel for per-channel masks (any map: a block covering the whole map drops a whole plane).

    Forward's state shows 2 fp64 values, the seed of a private CPU generator and ``gamma``, so that its size
    follows from the input's shape, as a traced graph needs; behind them in the same int64 storage lie the
    number of seeds and the blocks' corners, ``[seed, gamma, k, *corners]``. Backward rescatters the blocks from
    those corners or, if the state reaches it copied (by a ``saved_tensors_hooks`` pack hook, say: 2 values
    only), draws the same seeds again from the seed.
    """

    name = "sparse"

    def forward(self, x: Tensor, keep_prob: Tensor, block_size: int, per_channel: bool,
                normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
        block, valid, factor = geometry(tuple(x.shape[2:]), block_size)
        gamma = gamma_of(float(keep_prob), factor)
        out = torch.empty_like(x)
        corner, scale, seed = sparse_forward(x, gamma, block, valid, normalize, out)
        state = torch.empty(3 + corner.numel(), dtype=torch.int64)
        state[3:] = corner
        state[:3] = torch.tensor([seed, gamma, 0], dtype=torch.float64).view(torch.int64)
        state[2] = corner.numel()
        return out, state[:2].view(torch.float64), torch.tensor(scale, dtype=torch.float32)

    def backward(self, grad: Tensor, state: Tensor, scale: Tensor, block_size: int, per_channel: bool,
                 stride: list[int]) -> Tensor:
        block, valid, _ = geometry(tuple(grad.shape[2:]), block_size)
        storage, corner = state.untyped_storage(), None
        if state.storage_offset() == 0 and storage.nbytes() >= 24:
            buf = torch.empty(0, dtype=torch.int64).set_(storage)
            corner = buf[3:] if storage.nbytes() == (3 + int(buf[2])) * 8 else None
        if corner is None:  # the state was copied on its way here: draw the same seeds again
            seed, gamma = state.tolist()
            corner = redraw_corners(tuple(grad.shape), gamma, valid, tuple(stride), int(seed))
        return sparse_backward(grad, corner, tuple(stride), block, float(scale))

    def mask(self, like: Tensor, stride: list[int], keep_prob: Tensor, block_size: int, per_channel: bool,
             normalize: bool) -> tuple[Tensor, Tensor]:
        """The mask forward applies (the same draws), a CPU ``bool`` tensor laid out with ``stride``."""
        shape, stride = tuple(like.shape), tuple(stride)
        block, valid, factor = geometry(shape[2:], block_size)
        gamma = gamma_of(float(keep_prob), factor)
        corner, scale = _draw_blocks(shape, draw_seed(gamma), gamma, block, valid, stride, normalize)
        keep = torch.empty_strided(shape, stride, dtype=torch.bool).fill_(True)
        _fill_blocks(_flat(keep), corner, block, stride[2:], False)
        return keep, torch.tensor(scale, dtype=torch.float32)

    def fake_forward(self, x: Tensor, block_size: int, per_channel: bool) -> tuple[Tensor, Tensor, Tensor]:
        return torch.empty_like(x), torch.empty((2,), dtype=torch.float64), torch.empty((), dtype=torch.float32)

    def fake_backward(self, grad: Tensor, stride: list[int]) -> Tensor:
        return grad.new_empty_strided(grad.shape, stride)

    def fake_mask(self, like: Tensor, stride: list[int], block_size: int,
                  per_channel: bool) -> tuple[Tensor, Tensor]:
        return torch.empty_strided(like.shape, stride, dtype=torch.bool), torch.empty((), dtype=torch.float32)

    def eager(self, x: Tensor, keep_prob: float, keep_prob_tensor: Tensor | None, block_size: int,
              per_channel: bool, normalize: bool, inplace: bool) -> Tensor:
        block, valid, factor = geometry(tuple(x.shape[2:]), block_size)
        return _SparseDropBlock.apply(x, gamma_of(keep_prob, factor), block, valid, normalize,
                                      inplace and _fills_its_memory(x))


SPARSE = SparseKernel()
