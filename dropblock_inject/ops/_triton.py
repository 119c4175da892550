"""The fused accelerator kernel, in Triton: philox seeds, block mask and count, scaled product.

Three launches, none of which syncs with the host:

1. ``_seeds``: one philox draw per valid anchor (counter = anchor index, key = a seed drawn from torch's
   generator on the device), a ``uint8`` seed map ``bits < gamma * 2**32`` (exact to 2**-32); ``gamma``
   is computed in the kernel from the ``keep_prob`` tensor, so a new keep_prob is a new value, not a new
   kernel (nor a recompile).
2. ``_mask``: for every cell of the mask, whether a seed of the valid region lies in the block window ending
   at it (the stride-1 max-pool of the seed map, read from cache), written as a ``uint8`` keep map; the kept
   cells are counted and the scale ``numel / kept`` (0 when nothing is kept) computed by torch ops on the
   device (no host sync).
3. ``_apply``: ``x * keep * scale``, in x's dtype and strides.

Backward keeps only the philox seed, the threshold and the scale (20 bytes): it redraws the same seed map (philox is
counter-based), rebuilds the keep map and applies it to the gradient. The seed and keep maps are temporaries
of one launch sequence, never saved. Compiled graphs run launches 1 and 2 only (:func:`triton_mask`, through
the mask op, see ``_mask_op``) and leave the product to inductor, which fuses it with its neighbours.

The kernels are plain functions decorated at run time (:func:`kernels`), so a test can build an interpreted
copy (``TRITON_INTERPRET=1``) that runs them on CPU tensors while the CUDA ones stay compiled. For that they
call Triton builtins only: ``tl.sum``, ``tl.randint`` and the other library functions are ``@triton.jit``
functions decorated when ``triton`` is imported, which the interpreter cannot call unless the whole process
imported Triton under ``TRITON_INTERPRET=1`` ("Cannot call @triton.jit'd outside of the scope of a
kernel"). So philox is written out, and the count is a torch reduction.
"""

import functools
import math
import os
from types import SimpleNamespace

import torch
from torch import Tensor

from ._check import _geometry
from ._dense import keep_scale

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None
    tl = SimpleNamespace(constexpr=int)  # the kernels' annotations must still evaluate

AVAILABLE = triton is not None


def _seeds(state_ptr, keep_prob_ptr, seeds_ptr, n_anchors, factor, FORWARD: tl.constexpr,
           BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # int32: the launcher checks n_anchors < 2**31
    if FORWARD:  # the seed threshold gamma * 2**32, from the keep_prob tensor; kept in state[1] for backward
        gamma = (1.0 - tl.load(keep_prob_ptr).to(tl.float32)) * factor
        threshold = (tl.minimum(tl.maximum(gamma, 0.0), 1.0) * 4294967296.0).to(tl.int64)
        tl.store(state_ptr + 1, threshold, mask=pid == 0)
    else:
        threshold = tl.load(state_ptr + 1)
    # Philox-4x32-10 (Salmon et al., SC 2011), counter (offs, 0, 0, 0), key = the 64-bit seed; written out
    # with builtins only, as tl.randint is, so that the interpreter runs it (see the module docstring)
    seed = tl.load(state_ptr)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = offs.to(tl.uint32)
    c1 = tl.full((BLOCK,), 0, tl.uint32)
    c2 = tl.full((BLOCK,), 0, tl.uint32)
    c3 = tl.full((BLOCK,), 0, tl.uint32)
    for _ in range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = tl.mul(a2, 0xCD9E8D57, sanitize_overflow=False)  # uint32 products and sums wrap, as in tl.randint
        c3 = tl.mul(a0, 0xD2511F53, sanitize_overflow=False)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    tl.store(seeds_ptr + offs, (c0.to(tl.int64) < threshold).to(tl.uint8), mask=offs < n_anchors)


def _mask(seeds_ptr, keep_ptr, n_cells, T, H, W, VT, VH, VW, BT: tl.constexpr, BH: tl.constexpr,
          BW: tl.constexpr, BLOCK: tl.constexpr):
    # the block is constexpr: its loops unroll (one kernel per block shape, a handful per model), and Triton 3.6's
    # interpreter cannot take range() of a runtime scalar under numpy >= 2.4
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n_cells
    w = offs % W
    rest = offs // W
    h = rest % H
    rest = rest // H
    t = rest % T
    base = (rest // T) * (VT * VH * VW)
    hits = tl.full((BLOCK,), 0, tl.int32)
    for dt in range(BT):
        at = t - dt
        ok_t = live & (at >= 0) & (at < VT)
        for dh in range(BH):
            ah = h - dh
            ok_h = ok_t & (ah >= 0) & (ah < VH)
            row = base + (at * VH + ah) * VW
            for dw in range(BW):
                aw = w - dw
                ok = ok_h & (aw >= 0) & (aw < VW)
                hits += tl.load(seeds_ptr + row + aw, mask=ok, other=0).to(tl.int32)
    tl.store(keep_ptr + offs, (hits == 0).to(tl.uint8), mask=live)


def _apply(x_ptr, out_ptr, keep_ptr, scale_ptr, numel, C, T, H, W,
           sxn, sxc, sxt, sxh, sxw, son, soc, sot, soh, sow,
           PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < numel
    w = offs % W
    rest = offs // W
    h = rest % H
    rest = rest // H
    t = rest % T
    rest = rest // T
    c = rest % C
    n = rest // C
    plane = n * C + c if PER_CHANNEL else n
    keep = tl.load(keep_ptr + ((plane * T + t) * H + h) * W + w, mask=live, other=0)
    x = tl.load(x_ptr + n * sxn + c * sxc + t * sxt + h * sxh + w * sxw, mask=live, other=0.0)
    scale = tl.load(scale_ptr)  # fp32
    y = tl.where(keep != 0, x * scale, 0.0)
    tl.store(out_ptr + n * son + c * soc + t * sot + h * soh + w * sow, y.to(out_ptr.dtype.element_ty), mask=live)


@functools.lru_cache(maxsize=2)
def kernels(interpret: bool = False) -> SimpleNamespace:
    """The three kernels, jitted for the device, or for Triton's CPU interpreter when ``interpret``.

    Args:
        interpret: build them as ``TRITON_INTERPRET=1`` would (they then run on CPU tensors).

    Returns:
        A namespace with ``seeds``, ``mask``, ``apply`` and the launch ``block`` size.

    Raises:
        RuntimeError: Triton is not installed.
    """
    if not AVAILABLE:
        raise RuntimeError("the fused DropBlock kernel needs Triton (pip install triton)")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:  # triton.jit picks the interpreter when it decorates, from the environment
        jitted = {name: triton.jit(fn) for name, fn in (("seeds", _seeds), ("mask", _mask), ("apply", _apply))}
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    # the interpreter runs a program as numpy arrays: fewer, larger programs are much faster there
    return SimpleNamespace(**jitted, block=16384 if interpret else 1024)


def _dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(T, H, W)`` of a 2-D or 3-D map (T = 1 for 2-D)."""
    return (1, *shape) if len(shape) == 2 else shape  # type: ignore[return-value]


def _strides5(t: Tensor) -> tuple[int, ...]:
    n, c, *rest = t.stride()
    return (n, c, 0, *rest) if len(rest) == 2 else (n, c, *rest)


def _keep_map(ks: SimpleNamespace, state: Tensor, keep_prob: Tensor | None, mask_planes: int,
              spatial: tuple[int, ...], block_size: int) -> Tensor:
    """The ``uint8`` keep map of ``mask_planes`` planes (flat).

    With a ``keep_prob`` (forward) the seeds kernel writes the threshold into ``state[1]``; without one
    (backward) it reads it from there.
    """
    block, valid, factor = _geometry(spatial, block_size)
    t, h, w = _dims(spatial)
    bt, bh, bw = _dims(block)
    vt, vh, vw = _dims(valid)
    n_anchors = mask_planes * math.prod(valid)
    if n_anchors >= 2**31:
        raise ValueError(f"the fused DropBlock kernel draws one philox counter per seed position and supports "
                         f"fewer than 2**31 of them, but this input has {n_anchors}")
    seeds = torch.empty(n_anchors, dtype=torch.uint8, device=state.device)
    ks.seeds[(triton.cdiv(n_anchors, ks.block),)](state, state if keep_prob is None else keep_prob, seeds,
                                                   n_anchors, factor, FORWARD=keep_prob is not None,
                                                   BLOCK=ks.block)
    n_cells = mask_planes * math.prod(spatial)
    keep = torch.empty(n_cells, dtype=torch.uint8, device=state.device)
    ks.mask[(triton.cdiv(n_cells, ks.block),)](seeds, keep, n_cells, t, h, w, vt, vh, vw, BT=bt, BH=bh, BW=bw,
                                                BLOCK=ks.block)
    return keep


def _launch_apply(ks: SimpleNamespace, x: Tensor, keep: Tensor, scale: Tensor, per_channel: bool) -> Tensor:
    out = torch.empty_like(x)
    _, c, *spatial = x.shape
    t, h, w = _dims(tuple(spatial))
    ks.apply[(triton.cdiv(x.numel(), ks.block),)](x, out, keep, scale, x.numel(), c, t, h, w,
                                                   *_strides5(x), *_strides5(out), PER_CHANNEL=per_channel,
                                                   BLOCK=ks.block)
    return out


def keep_shape(shape: list[int] | tuple[int, ...], per_channel: bool) -> tuple[int, ...]:
    """The keep map's shape for an input of ``shape``: one plane per channel, or one per sample."""
    n, c, *spatial = shape
    return (n, c if per_channel else 1, *spatial)


def _draw(ks: SimpleNamespace, shape: tuple[int, ...], keep_prob: Tensor, block_size: int, per_channel: bool,
          normalize: bool, device: torch.device) -> tuple[Tensor, Tensor | None, Tensor]:
    """One call's draws: the state (the philox seed, from torch's generator on ``device``, and the threshold
    the seeds kernel sets), the flat ``uint8`` keep map (None for an empty input) and the scale."""
    state = torch.randint(2**62, (2,), dtype=torch.int64, device=device)
    if math.prod(shape) == 0:
        return state, None, torch.ones((), device=device)
    planes = keep_shape(shape, per_channel)
    keep_prob = keep_prob.to(device=device, dtype=torch.float32).reshape(1)
    keep = _keep_map(ks, state, keep_prob, planes[0] * planes[1], tuple(shape[2:]), block_size)
    return state, keep, keep_scale(keep, normalize)


def triton_mask(shape: list[int], keep_prob: Tensor, block_size: int, per_channel: bool, normalize: bool,
                device: torch.device, interpret: bool = False) -> tuple[Tensor, Tensor]:
    """The keep mask and scale :func:`triton_forward` would apply, for a compiled graph to multiply by.

    It draws the same philox seed from torch's generator and runs the same two kernels, so under one
    ``torch.manual_seed`` ``x * keep * scale`` is :func:`triton_forward`'s output.

    Args:
        shape: the input's shape ``(N, C, *spatial)``.
        keep_prob: a one-element tensor.
        block_size: the requested block size.
        per_channel: a mask per channel, or one per sample.
        normalize: scale by ``numel / kept``; otherwise the scale is 1.
        device: the input's device (CPU when ``interpret``).
        interpret: run Triton's interpreter.

    Returns:
        ``keep``, a contiguous ``bool`` tensor ``(N, C, *spatial)`` (``(N, 1, *spatial)`` when shared), and
        the fp32 0-d scale, both on ``device``.
    """
    mask_shape = keep_shape(shape, per_channel)
    _, keep, scale = _draw(kernels(interpret), tuple(shape), keep_prob, block_size, per_channel, normalize, device)
    if keep is None:
        return torch.ones(mask_shape, dtype=torch.bool, device=device), scale
    return keep.view(torch.bool).view(mask_shape), scale


def triton_forward(x: Tensor, keep_prob: Tensor, block_size: int, per_channel: bool, normalize: bool,
                   interpret: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """DropBlock forward with the fused kernels.

    Args:
        x: the input ``(N, C, *spatial)`` on the kernels' device (CPU tensors when ``interpret``).
        keep_prob: a one-element tensor.
        block_size: the requested block size.
        per_channel: a mask per channel, or one per sample.
        normalize: scale by ``numel(mask) / kept``.
        interpret: run Triton's interpreter.

    Returns:
        The output (laid out as ``torch.empty_like(x)``), the state (int64: the philox seed, drawn from
        torch's generator on x's device, and the seed threshold) and the scale (fp32, 0-d): all that backward
        needs.
    """
    ks = kernels(interpret)
    state, keep, scale = _draw(ks, tuple(x.shape), keep_prob, block_size, per_channel, normalize, x.device)
    if keep is None:
        return torch.empty_like(x), state, scale
    return _launch_apply(ks, x, keep, scale, per_channel), state, scale


def triton_backward(grad: Tensor, state: Tensor, scale: Tensor, block_size: int, per_channel: bool,
                    interpret: bool = False) -> Tensor:
    """``grad * keep * scale``, the keep map redrawn from the forward's philox seed and threshold.

    Args:
        grad: the output's gradient.
        state: the forward's state (philox seed and threshold).
        scale: the forward's scale.
        block_size: the requested block size.
        per_channel: as in forward.
        interpret: run Triton's interpreter.

    Returns:
        The input's gradient, laid out as ``torch.empty_like(grad)``.
    """
    ks = kernels(interpret)
    n, c, *spatial = grad.shape
    if grad.numel() == 0:
        return torch.empty_like(grad)
    keep = _keep_map(ks, state, None, n * (c if per_channel else 1), tuple(spatial), block_size)
    return _launch_apply(ks, grad, keep, scale, per_channel)
