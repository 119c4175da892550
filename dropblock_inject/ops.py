"""DropBlock, the op: functional forms and ``nn.Module`` wrappers.

Implements DropBlock from `"DropBlock: A regularization method for convolutional networks"
<https://arxiv.org/abs/1810.12890>`_ (Ghiasi, Lin & Le, NeurIPS 2018) with the semantics of the
authors' TensorFlow code (``tensorflow/tpu``, ``resnet_model.py``):

* the block is clipped to the feature map, per spatial axis;
* seeds are drawn only where a whole block fits (the *valid* region), independently per sample and
  (by default) per channel, at the rate
  ``gamma = (1 - keep_prob) / prod(block) * prod(size) / prod(size - block + 1)``;
* every seed zeroes the block whose top-left corner it is;
* the output is ``x * mask * numel(mask) / sum(mask)``, the ratio computed in fp32 and safe when the
  whole mask is dropped (the output is then all zeros);
* in eval mode, or when ``keep_prob == 1``, the op is the identity and draws no random numbers.

Two interchangeable implementations produce the same distribution:

* a *sparse* one (eager, CPU): seeds are rare (``gamma`` is well under 1% at the paper's settings), so
  their count is drawn from a Poisson law and their positions uniformly, which yields exactly
  independent Bernoulli(``gamma``) seeds per position (Poisson splitting). The blocks are then written
  as a scatter of zeros. Backward saves one offset per seed (its block's corner) and recomputes the scatter.
* a *dense* one (under ``torch.compile`` and on accelerators): a Bernoulli seed map grown into blocks
  (running sums, equivalent to a stride-1 max-pool), applied by a custom autograd function that saves a
  ``bool`` mask.

Masks broadcast over the input (shared across channels with ``per_channel=False``, or one value per channel
when the block covers the whole map) are small: they are built densely on every device as the scaled
multiplier itself and applied by a plain product, whose backward keeps only that small multiplier.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["DropBlock2d", "DropBlock3d", "drop_block2d", "drop_block3d"]


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


# ----------------------------------------------------------------------------------------------------------
# sparse implementation: eager, CPU, per-channel masks


def _sample_seeds(n_planes: int, n_anchors: int, gamma: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """Independent Bernoulli(``gamma``) seeds over ``n_planes`` maps of ``n_anchors`` valid positions each.

    Returns the seeds' plane and anchor indices. The number of draws is Poisson(-log(1 - gamma) * n) and
    each draw is uniform over the ``n = n_planes * n_anchors`` positions (plane and anchor drawn
    independently), so each position receives Poisson(-log(1 - gamma)) draws independently of the others:
    it is a seed with probability exactly ``gamma``. A position drawn twice is harmless (its block is
    zeroed twice and counted once).
    """
    n = n_planes * n_anchors
    if n == 0 or gamma <= 0.0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty
    if gamma >= 1.0:
        every = torch.arange(n, device=device)
        return every // n_anchors, every % n_anchors
    rate = torch.full((), -math.log1p(-gamma) * n, dtype=torch.float64)
    k = int(torch.poisson(rate).item())
    return torch.randint(n_planes, (k,), device=device), torch.randint(n_anchors, (k,), device=device)


@functools.lru_cache(maxsize=512)
def _grid(extent: tuple[int, ...], strides: tuple[int, ...], device: torch.device) -> Tensor:
    """Offsets ``sum(i * stride)`` of every position ``i`` of a box of size ``extent``, in row-major order."""
    offsets = torch.zeros((), dtype=torch.long)
    for size, stride in zip(extent, strides):
        offsets = (offsets.unsqueeze(-1) + torch.arange(size) * stride).flatten()
    return offsets.to(device)


def _fill_blocks(flat: Tensor, corner: Tensor, block: tuple[int, ...], strides: tuple[int, ...],
                 value: float) -> None:
    """Writes ``value`` over the ``block``-sized block whose first cell is ``flat[c]``, for every ``c`` in ``corner``.

    ``strides`` are the map's spatial strides within ``flat``. The blocks are slices of one overlapping strided
    view of ``flat`` (one slice per start offset), so a single ``index_fill_`` with one index per block writes
    them all, with no per-cell or per-row index arithmetic.
    """
    if corner.numel() == 0:
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


@functools.lru_cache(maxsize=512)
def _contiguous_strides(spatial: tuple[int, ...]) -> tuple[int, ...]:
    """Strides of a contiguous map of size ``spatial`` (looked up twice per sparse call, computed once)."""
    return tuple(math.prod(spatial[i + 1:]) for i in range(len(spatial)))


def _flat(t: Tensor) -> Tensor:
    """A 1-D view of the memory of a non-overlapping, dense tensor (fresh, or an input checked in place)."""
    return t.as_strided((t.numel(),), (1,))


class _SparseDropBlock(torch.autograd.Function):
    """``x * mask * scale`` for a per-channel mask drawn as block seeds; backward keeps only the seeds."""

    @staticmethod
    def forward(ctx, x: Tensor, gamma: float, block: tuple[int, ...], valid: tuple[int, ...],  # type: ignore[override]
                normalize: bool, inplace: bool) -> Tensor:
        if inplace:
            out = x
            ctx.mark_dirty(x)
        else:
            out = torch.empty_like(x)  # x's memory format when x is dense, contiguous otherwise
        n, c, *spatial = x.shape
        plane, anchor = _sample_seeds(n * c, math.prod(valid), gamma, x.device)
        stride_n, stride_c, *map_strides = out.stride()
        strides = tuple(map_strides)
        contiguous = _contiguous_strides(tuple(spatial))
        offset = _grid(valid, contiguous, x.device).index_select(0, anchor)  # block corner within its plane
        numel = x.numel()
        scale = 1.0
        if normalize:
            dropped = _count_dropped(plane, offset, n * c, tuple(spatial), block)
            scale = numel / max(numel - dropped, 1)
        if strides != contiguous:  # e.g. channels_last
            offset = _grid(valid, strides, x.device).index_select(0, anchor)
        if stride_n == c * stride_c:  # contiguous, or any layout keeping the planes in order
            corner = offset.add_(plane, alpha=stride_c)
        else:
            corner = offset.add_(plane // c, alpha=stride_n).add_(plane.remainder_(c), alpha=stride_c)
        if inplace:
            x.mul_(scale)
        else:
            torch.mul(x, scale, out=out)
        _fill_blocks(_flat(out), corner, block, strides, 0.0)
        ctx.save_for_backward(corner)  # 8 bytes per seed
        ctx.meta = (out.stride(), block, scale)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:  # type: ignore[override]
        stride, block, scale = ctx.meta
        (corner,) = ctx.saved_tensors
        strides = tuple(stride[2:])
        # the usual case: grad is laid out as the forward output, and so is the product
        grad_in = torch.mul(grad, scale) if grad.stride() == stride else None
        if grad_in is None or grad_in.stride() != stride:  # e.g. an expanded or channels_last grad
            grad_in = torch.empty_strided(grad.shape, stride, dtype=grad.dtype, device=grad.device)
            torch.mul(grad, scale, out=grad_in)  # in the layout the corners were computed for
        _fill_blocks(_flat(grad_in), corner, block, strides, 0.0)
        return grad_in, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# dense implementation: shared masks, accelerators and torch.compile


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


def _dense_keep_mask(mask_shape: Sequence[int], block: tuple[int, ...], valid: tuple[int, ...],
                     gamma: Tensor | float, device: torch.device) -> Tensor:
    """A ``bool`` keep mask of ``mask_shape``: Bernoulli seeds on the valid region, grown into blocks."""
    return _dense_block_counts(mask_shape, block, valid, gamma, device) == 0


class _ApplyKeepMask(torch.autograd.Function):
    """``x * keep * scale`` for a ``bool`` mask of x's shape; saves the mask, not a float copy."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(keep, scale)
        return _apply_keep_mask(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        keep, scale = ctx.saved_tensors
        return _apply_keep_mask(grad, keep, scale), None, None


def _apply_keep_mask(x: Tensor, keep: Tensor, scale: Tensor) -> Tensor:
    return (x * keep).mul_(scale.to(x.dtype))


def _normalizer(kept: Tensor, numel: int) -> Tensor:
    """``numel / kept`` in fp32, and 0 when nothing is kept (a zero mask must not meet an inf scale)."""
    # a true division: ``numel / tensor`` would multiply by a rounded reciprocal (1 ulp off at kept == numel)
    return torch.where(kept > 0, torch.full_like(kept, numel).div_(kept.clamp_min(1.0)), 0.0)


def _fills_its_memory(x: Tensor) -> bool:
    """Whether x's elements fill its memory exactly (any permutation of the dimensions)."""
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last if x.dim() == 4
                                                   else torch.channels_last_3d)


def _drop_block(x: Tensor, keep_prob: float | Tensor, block_size: int, per_channel: bool, scale: bool,
                dense: bool, inplace: bool = False) -> Tensor:
    inplace = inplace and not dense  # the dense path (accelerators, torch.compile) always allocates
    spatial = tuple(x.shape[2:])
    # dynamo traces through lru_cache wrappers (with a warning): give it the plain function
    geometry = _geometry.__wrapped__ if torch.compiler.is_compiling() else _geometry
    block, valid, factor = geometry(spatial, block_size)
    gamma = (1.0 - keep_prob) * factor
    mask_shape = (x.shape[0], x.shape[1] if per_channel else 1, *spatial)
    whole_map = valid == (1,) * len(valid)
    if per_channel and not whole_map:
        if not dense:
            return _SparseDropBlock.apply(x, float(gamma), block, valid, scale, inplace and _fills_its_memory(x))
        keep = _dense_keep_mask(mask_shape, block, valid, gamma, x.device)
        if scale:
            factor_t = _normalizer(keep.sum(dtype=torch.float32), keep.numel())
        else:
            factor_t = torch.ones((), dtype=torch.float32, device=x.device)
        return _ApplyKeepMask.apply(x, keep, factor_t)
    # A mask broadcast over x: one per sample (shared across channels), or one value per channel when every
    # block covers the whole map. It is small, so it is built as the scaled fp32 multiplier itself and
    # applied by a plain product, whose backward keeps only that multiplier (1/C or 1/(H*W) of x).
    if whole_map:
        multiplier = torch.rand((*mask_shape[:2], *valid), device=x.device).ge_(gamma)
    else:
        multiplier = _dense_block_counts(mask_shape, block, valid, gamma, x.device).eq_(0)
    if scale:
        # numel(mask) / sum(mask) over the small mask equals the ratio over the broadcast one
        if dense:
            multiplier.mul_(_normalizer(multiplier.sum(), multiplier.numel()))
        else:  # eager CPU: a Python scalar is several times cheaper than the tensor arithmetic
            kept = multiplier.sum().item()
            multiplier.mul_(multiplier.numel() / kept if kept else 0.0)
    multiplier = multiplier.to(x.dtype)
    return x.mul_(multiplier) if inplace else x * multiplier


def _functional(x: Tensor, keep_prob: float, block_size: int, per_channel: bool, scale: bool, training: bool,
                inplace: bool, spatial_dims: int, name: str) -> Tensor:
    _check_input(x, spatial_dims, name)
    block_size = _check_block_size(block_size)
    keep_prob = _check_keep_prob(keep_prob)
    if not training or keep_prob == 1.0 or x.numel() == 0:
        return x
    dense = x.device.type != "cpu" or torch.compiler.is_compiling()
    return _drop_block(x, keep_prob, block_size, per_channel, scale, dense, inplace)


def drop_block2d(x: Tensor, keep_prob: float, block_size: int = 7, *, per_channel: bool = True,
                 scale: bool = True, training: bool = True, inplace: bool = False) -> Tensor:
    """DropBlock on a batch of 2-D feature maps.

    Args:
        x (Tensor[N, C, H, W]): the input feature maps, any floating point dtype and memory format.
        keep_prob (float): the expected fraction of kept activations, in [0, 1].
        block_size (int): side of the square block to drop, clipped to the map per axis. Default: 7.
        per_channel (bool): draw an independent mask for every channel, as the reference does; ``False``
            shares one mask across the channels of a sample. Default: ``True``.
        scale (bool): multiply the kept activations by ``numel(mask) / sum(mask)``. Default: ``True``.
        training (bool): apply the op; ``False`` returns ``x`` unchanged. Default: ``True``.
        inplace (bool): write the result into ``x`` (on CPU, outside ``torch.compile``), saving an
            allocation; only for an ``x`` that nothing else reads and whose producer does not keep it for
            backward (e.g. a BatchNorm or convolution output). Default: ``False``.

    Returns:
        Tensor[N, C, H, W]: the input with blocks zeroed, in the input's dtype and memory format.
    """
    return _functional(x, keep_prob, block_size, per_channel, scale, training, inplace, 2, "drop_block2d")


def drop_block3d(x: Tensor, keep_prob: float, block_size: int = 7, *, per_channel: bool = True,
                 scale: bool = True, training: bool = True, inplace: bool = False) -> Tensor:
    """DropBlock on a batch of 3-D feature maps (video or volumes).

    Args:
        x (Tensor[N, C, T, H, W]): the input feature maps, any floating point dtype and memory format.
        keep_prob (float): the expected fraction of kept activations, in [0, 1].
        block_size (int): side of the cubic block to drop, clipped to the map per axis. Default: 7.
        per_channel (bool): an independent mask for every channel; ``False`` shares one per sample.
        scale (bool): multiply the kept activations by ``numel(mask) / sum(mask)``. Default: ``True``.
        training (bool): apply the op; ``False`` returns ``x`` unchanged. Default: ``True``.
        inplace (bool): write the result into ``x`` (on CPU, outside ``torch.compile``); see
            :func:`drop_block2d`. Default: ``False``.

    Returns:
        Tensor[N, C, T, H, W]: the input with blocks zeroed, in the input's dtype and memory format.
    """
    return _functional(x, keep_prob, block_size, per_channel, scale, training, inplace, 3, "drop_block3d")


class _DropBlockNd(nn.Module):
    _spatial_dims: int = 2

    def __init__(self, block_size: int = 7, keep_prob: float = 1.0, *, per_channel: bool = True,
                 scale: bool = True, inplace: bool = False) -> None:
        super().__init__()
        self.block_size = _check_block_size(block_size)
        self.per_channel = bool(per_channel)
        self.scale = bool(scale)
        self.inplace = bool(inplace)
        keep_prob = _check_keep_prob(keep_prob)
        self._keep_prob = keep_prob
        # The tensor copy is what a compiled graph reads, so changing keep_prob never recompiles; it is not
        # persistent, so state_dict keys are those of the model without DropBlock.
        self.register_buffer("keep_prob_tensor", torch.tensor(keep_prob, dtype=torch.float32), persistent=False)

    @property
    def keep_prob(self) -> float:
        """The current keep probability; setting it updates the tensor buffer in place (no allocation)."""
        return self._keep_prob

    @keep_prob.setter
    def keep_prob(self, value: float) -> None:
        value = _check_keep_prob(value)
        self._keep_prob = value
        with torch.no_grad():
            self.keep_prob_tensor.fill_(value)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        if torch.compiler.is_compiling():
            # read the buffer, not the Python float, so a new keep_prob does not trigger a recompile
            return _drop_block(x, self.keep_prob_tensor.to(torch.float32), self.block_size, self.per_channel,
                               self.scale, dense=True)
        name = type(self).__name__
        _check_input(x, self._spatial_dims, name)
        if self._keep_prob == 1.0 or x.numel() == 0:
            return x
        return _drop_block(x, self._keep_prob, self.block_size, self.per_channel, self.scale,
                           dense=x.device.type != "cpu", inplace=self.inplace)

    def extra_repr(self) -> str:
        return (f"block_size={self.block_size}, keep_prob={self._keep_prob}, per_channel={self.per_channel}, "
                f"scale={self.scale}" + (", inplace=True" if self.inplace else ""))


class DropBlock2d(_DropBlockNd):
    """DropBlock on 2-D feature maps, as a module; see :func:`drop_block2d`.

    Args:
        block_size (int): side of the square block, clipped to the feature map. Default: 7.
        keep_prob (float): expected fraction of kept activations; 1 disables the op. Schedulers set it
            through the :attr:`keep_prob` property. Default: 1.0.
        per_channel (bool): independent masks per channel (the reference); ``False`` shares one mask.
        scale (bool): rescale kept activations by ``numel(mask) / sum(mask)``. Default: ``True``.
        inplace (bool): write into the input (CPU, eager), as ``nn.ReLU(inplace=True)`` does; ``inject``
            sets it where the input is a BatchNorm or convolution output read by nothing else.
            Default: ``False``.

    Shape:
        Input ``(N, C, H, W)``, output the same. Identity in eval mode.
    """

    _spatial_dims = 2


class DropBlock3d(_DropBlockNd):
    """DropBlock on 3-D feature maps ``(N, C, T, H, W)``, as a module; see :func:`drop_block3d`.

    Args:
        block_size (int): side of the cubic block, clipped to the feature map. Default: 7.
        keep_prob (float): expected fraction of kept activations; 1 disables the op. Default: 1.0.
        per_channel (bool): independent masks per channel; ``False`` shares one mask per sample.
        scale (bool): rescale kept activations by ``numel(mask) / sum(mask)``. Default: ``True``.
        inplace (bool): write into the input (CPU, eager); see :class:`DropBlock2d`. Default: ``False``.
    """

    _spatial_dims = 3
