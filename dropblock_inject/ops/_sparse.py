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


def _sample_seeds(n_planes: int, n_anchors: int, gamma: float, device: torch.device,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Independent Bernoulli(``gamma``) seeds over ``n_planes`` maps of ``n_anchors`` valid positions each.

    Returns the seeds' plane and anchor indices. The number of draws is Poisson(-log(1 - gamma) * n) and
    each draw is uniform over the ``n = n_planes * n_anchors`` positions (plane and anchor drawn
    independently), so each position receives Poisson(-log(1 - gamma)) draws independently of the others:
    it is a seed with probability exactly ``gamma``. A position drawn twice is harmless (its block is
    zeroed twice and counted once). Draws come from ``generator`` when given (a CPU generator), so that the
    same seeds can be drawn again.
    """
    n = n_planes * n_anchors
    if n == 0 or gamma <= 0.0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty
    if gamma >= 1.0:
        every = torch.arange(n, device=device)
        return every // n_anchors, every % n_anchors
    rate = torch.full((), -math.log1p(-gamma) * n, dtype=torch.float64)
    k = int(torch.poisson(rate, generator=generator).item())
    return (torch.randint(n_planes, (k,), device=device, generator=generator),
            torch.randint(n_anchors, (k,), device=device, generator=generator))


_local = threading.local()


def seeded_generator(seed: int) -> torch.Generator:
    """This thread's private CPU generator, reseeded with ``seed`` (one generator per thread, reused)."""
    generator = getattr(_local, "generator", None)
    if generator is None:
        generator = _local.generator = torch.Generator()
    return generator.manual_seed(seed)


def draw_seed(gamma: float) -> int:
    """The seed of a call's private generator, drawn from torch's (so ``torch.manual_seed`` holds); 0 with no
    draw at ``gamma == 0`` (keep_prob 1: no random numbers, as in eager)."""
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
    """Writes ``value`` over the ``block``-sized block whose first cell is ``flat[c]``, for every ``c`` in ``corner``.

    ``strides`` are the map's spatial strides within ``flat``. The blocks are slices of one overlapping strided
    view of ``flat`` (one slice per start offset), so a single ``index_fill_`` with one index per block writes
    them all, with no per-cell or per-row index arithmetic.
    """
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
    """Number of distinct cells that the blocks of the given seeds cover, without sorting anything.

    ``plane`` is each seed's (sample, channel) plane and ``offset`` its block corner's offset within a
    contiguous plane. Only the planes that hold a seed are looked at: each gets a slot in a small byte map
    of contiguous planes (a few hundred planes rather than N * C, so no large buffer is zeroed and faulted
    in), and the blocks are marked there. A small map is counted by ``count_nonzero``; a large one eight bytes
    at a time, as int64 words summed in groups of 255 (so no byte lane overflows), several times faster.
    """
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


def _draw_blocks(shape: tuple[int, ...], gamma: float, block: tuple[int, ...], valid: tuple[int, ...],
                 normalize: bool, device: torch.device,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor, float]:
    """The seeds of one call: their planes, anchors and corner offsets within a contiguous plane, and the
    scale ``numel / kept`` (1 when not ``normalize``)."""
    n, c, *spatial = shape
    plane, anchor = _sample_seeds(n * c, math.prod(valid), gamma, device, generator)
    offset = _grid(valid, _contiguous_strides(tuple(spatial)), device).index_select(0, anchor)
    scale = 1.0
    if normalize:
        numel = math.prod(shape)
        dropped = _count_dropped(plane, offset, n * c, tuple(spatial), block)
        scale = fp32_ratio(numel, numel - dropped)  # fp32, as every kernel computes it
    return plane, anchor, offset, scale


def sparse_forward(x: Tensor, gamma: float, block: tuple[int, ...], valid: tuple[int, ...], normalize: bool,
                   out: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, float]:
    """Writes ``where(mask, x, 0) * scale`` into ``out`` (``x`` itself, or a dense tensor of x's shape).

    Args:
        x: the input ``(N, C, *spatial)``.
        gamma: the seed rate.
        block: the clipped block.
        valid: the valid seed region.
        normalize: scale by ``numel / kept``; otherwise the scale is 1.
        out: where to write, non-overlapping and dense (may be ``x``).
        generator: where the seeds are drawn from (default: torch's global generator).

    Returns:
        The blocks' corners as offsets into ``out``'s memory (int64, one per seed), and the scale applied.
    """
    shape = tuple(x.shape)
    plane, anchor, offset, scale = _draw_blocks(shape, gamma, block, valid, normalize, x.device, generator)
    corner = _corners(plane, anchor, shape, valid, tuple(out.stride()), offset)
    if out is x:
        x.mul_(scale)
    else:
        torch.mul(x, scale, out=out)
    _fill_blocks(_flat(out), corner, block, tuple(out.stride()[2:]), 0.0)
    return corner, scale


def redraw_corners(shape: tuple[int, ...], gamma: float, valid: tuple[int, ...], stride: tuple[int, ...],
                   seed: int) -> Tensor:
    """The corners :func:`sparse_forward` drew from ``seeded_generator(seed)``, for an output of ``stride``."""
    plane, anchor = _sample_seeds(shape[0] * shape[1], math.prod(valid), gamma, torch.device("cpu"),
                                  seeded_generator(seed))
    return _corners(plane, anchor, shape, valid, stride)


def sparse_backward(grad: Tensor, corner: Tensor, stride: tuple[int, ...], block: tuple[int, ...],
                    scale: float) -> Tensor:
    """``grad * mask * scale``, the mask rebuilt from the corners that :func:`sparse_forward` returned.

    Args:
        grad: the output's gradient, any layout.
        corner: the blocks' corners, offsets into a tensor of strides ``stride``.
        stride: the forward output's strides.
        block: the clipped block.
        scale: the forward's scale.

    Returns:
        The input's gradient, laid out with ``stride``.
    """
    # the usual case: grad is laid out as the forward output, and so is the product
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
            out = x
            ctx.mark_dirty(x)
        else:
            out = torch.empty_like(x)  # x's memory format when x is dense, contiguous otherwise
        # the seeds come from a private generator seeded from torch's, as in the registered op, so eager,
        # compiled and fx-traced models draw the same masks under the same torch.manual_seed
        seed = draw_seed(gamma)
        corner, scale = sparse_forward(x, gamma, block, valid, normalize, out, seeded_generator(seed))
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
        seed = draw_seed(gamma)
        out = torch.empty_like(x)
        corner, scale = sparse_forward(x, gamma, block, valid, normalize, out, seeded_generator(seed))
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
        plane, anchor, offset, scale = _draw_blocks(shape, gamma, block, valid, normalize, torch.device("cpu"),
                                                    seeded_generator(draw_seed(gamma)))
        keep = torch.empty_strided(shape, stride, dtype=torch.bool).fill_(True)
        _fill_blocks(_flat(keep), _corners(plane, anchor, shape, valid, stride, offset), block, stride[2:], False)
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
