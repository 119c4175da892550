"""The fused kernel's Triton programs, launched in this order by ``_triton``: :func:`_seeds` (philox seed map,
and in forward the threshold and a zeroed count), :func:`_rows` and :func:`_mask` (the block's max-pool along W,
then along H and T, the keep map and in forward its kept cells counted), :func:`_scale` and :func:`_apply`.
They are plain functions, jitted at run time by :func:`kernels` (for the device, or for the interpreter).

Why it is built this way (what a GPU executes, counted in ``benchmarks/triton_sass.py``): the block's
max-pool is separable, and every byte of the seed and row maps is 0 or 1, so an ``int64`` word ORs eight
cells in one instruction and a shift by ``d`` bytes moves eight seeds ``d`` columns (the rows kernel reads two
words per output word where it read ``BW`` bytes per cell, the mask kernel ``BT * BH`` words per eight cells
where one pass over the window read ``BT * BH * BW`` bytes per cell: 49 for the paper's 7x7 block). Programs
work on tiles of whole rows (``BLOCK_R`` rows by ``BLOCK_W`` columns or words, with a second grid axis where a
row is longer than a tile), so a row's coordinates are divided out once per row, not per cell. Indices are
int32 unless a map reaches 2**31 bytes (``WIDE``): a division or remainder by a runtime size is a short
instruction sequence in 32 bits and a long one in 64. The window loops are ``tl.static_range`` (unrolled,
their loads issued together). :func:`_apply` reads contiguous and channels-last tensors by their flat index
(``LAYOUT``): no per-element division in the contiguous per-channel case, two in the others, and any other
strides through the general, 64-bit path.

The programs call Triton builtins only, and no helper of their own: ``tl.sum``, ``tl.randint`` and the other
library functions are ``@triton.jit`` functions decorated when ``triton`` is imported, which the interpreter
cannot call unless the whole process imported Triton under ``TRITON_INTERPRET=1`` ("Cannot call @triton.jit'd
outside of the scope of a kernel"), and a plain helper runs interpreted but does not compile ("Unsupported
function referenced", caught by ``tests/test_ops_triton_aot.py``). So philox is written out, and the count
is ``tl.reduce`` with Triton's own sum combine function, which the interpreter recognises and runs as a numpy
sum (``tl.sum`` would call the combine; ``tl.reduce`` is a builtin that only names it).
"""

import functools
from types import SimpleNamespace

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None
    tl = SimpleNamespace(constexpr=int)  # the kernels' annotations must still evaluate

AVAILABLE = triton is not None
STRIDED, CONTIGUOUS, CHANNELS_LAST = 0, 1, 2  # _apply's LAYOUT


def _seeds(state_ptr, keep_prob_ptr, count_ptr, seeds_ptr, n_rows, VW, SP, factor, FORWARD: tl.constexpr,
           WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    # one lane per (anchor row r, byte w < SP of its row in the seed map): a seed at anchor (r, w) where its
    # philox draw (counter = the anchor's index r * VW + w) is below the threshold; 0 in the row's padding
    pid = tl.program_id(0).to(tl.int64) if WIDE else tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    if FORWARD:  # the seed threshold gamma * 2**32, from the keep_prob tensor; kept in state[1] for backward
        gamma = (1.0 - tl.load(keep_prob_ptr).to(tl.float32)) * factor
        threshold = (tl.minimum(tl.maximum(gamma, 0.0), 1.0) * 4294967296.0).to(tl.int64)
        first = (tl.program_id(0) == 0) & (tl.program_id(1) == 0)
        tl.store(state_ptr + 1, threshold, mask=first)
        tl.store(count_ptr, 0, mask=first)  # the count _mask adds to (launched after this kernel)
    else:
        threshold = tl.load(state_ptr + 1)
    # Philox-4x32-10 (Salmon et al., SC 2011), counter (anchor, 0, 0, 0), key = the 64-bit seed; written out
    # with builtins only, as tl.randint is, so that the interpreter runs it (see the module docstring)
    seed = tl.load(state_ptr)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = (r * VW + w).to(tl.uint32)  # the launcher checks that there are fewer than 2**31 anchors
    c1 = tl.full((BLOCK_R, BLOCK_W), 0, tl.uint32)
    c2 = tl.full((BLOCK_R, BLOCK_W), 0, tl.uint32)
    c3 = tl.full((BLOCK_R, BLOCK_W), 0, tl.uint32)
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = tl.mul(a2, 0xCD9E8D57, sanitize_overflow=False)  # uint32 products and sums wrap, as in tl.randint
        c3 = tl.mul(a0, 0xD2511F53, sanitize_overflow=False)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    hit = (c0.to(tl.int64) < threshold) & (w < VW)
    tl.store(seeds_ptr + r * SP + w, hit.to(tl.uint8), mask=(r < n_rows) & (w < SP))


def _rows(seeds_ptr, rows_ptr, n_rows, SPW, RPW, BW: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
          BLOCK_W: tl.constexpr):
    # one lane per (anchor row r, word j of its row hits, columns 8j..8j+7): byte k = OR over dw < BW of the
    # seed byte at column 8j + k - dw. Bytes are 0 or 1, so a word ORs eight of them at once, and shifting a
    # word by d bytes (the bytes below from the previous word) moves a seed d columns right; no byte ever
    # carries into the sign bit, so arithmetic shifts of int64 are logical ones here.
    pid = tl.program_id(0).to(tl.int64) if WIDE else tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    j = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    live = (r < n_rows) & (j < RPW)
    hits = tl.full((BLOCK_R, BLOCK_W), 0, tl.int64)
    for m in tl.static_range((BW + 7) // 8):  # dw = 8 m + d: words j - m and j - m - 1
        cur = tl.load(seeds_ptr + r * SPW + j - m, mask=live & (j - m >= 0) & (j - m < SPW), other=0)
        prev = tl.load(seeds_ptr + r * SPW + j - m - 1, mask=live & (j - m >= 1) & (j - m - 1 < SPW), other=0)
        for d in tl.static_range(8):
            if 8 * m + d < BW:
                if d == 0:
                    hits = hits | cur
                else:
                    hits = hits | (cur << (8 * d)) | (prev >> (64 - 8 * d))
    tl.store(rows_ptr + r * RPW + j, hits, mask=live)


def _mask(rows_ptr, keep_ptr, count_ptr, n_rows, T, H, W, VT, VH, RPW, BT: tl.constexpr, BH: tl.constexpr,
          COUNT: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    # one lane per (row r = (plane, t, h) of the map, word j: columns 8j..8j+7): kept unless a row hit lies
    # at t - BT < at <= t, h - BH < ah <= h; a lane divides its row's coordinates out once for its 8 cells.
    # With COUNT, each program adds the cells it kept to count_ptr (one atomic per program).
    pid = tl.program_id(0).to(tl.int64) if WIDE else tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]  # the tile as in _rows (kernels call no helpers: the
    j = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]  # compiler needs them jitted, the
    live = r < n_rows  # interpreter plain)
    h = r % H
    rest = r // H
    t = rest % T
    base = (rest // T) * VT
    hits = tl.full((BLOCK_R, BLOCK_W), 0, tl.int64)
    for dt in tl.static_range(BT):
        at = t - dt
        ok_t = live & (at >= 0) & (at < VT)
        for dh in tl.static_range(BH):
            ah = h - dh
            ok = ok_t & (ah >= 0) & (ah < VH) & (j < RPW)
            hits = hits | tl.load(rows_ptr + ((base + at) * VH + ah) * RPW + j, mask=ok, other=0)
    keep = hits ^ 0x0101010101010101  # a 0/1 byte each: kept where no hit
    k = tl.arange(0, 8)[None, None, :]
    w = j[:, :, None] * 8 + k  # the map is dense, its rows not word-aligned: the words are stored byte by byte
    cells = (keep[:, :, None] >> (k * 8).to(tl.int64)) & 0xFF
    tl.store(keep_ptr + r[:, :, None] * W + w, cells.to(tl.uint8), mask=live[:, :, None] & (w < W))
    if COUNT:  # a word's kept cells: its bytes below W summed by one multiply into the top byte (at most 8)
        below = tl.minimum(tl.maximum(W - j * 8, 0), 8)
        cells_below = tl.where(below >= 8, -1, (tl.full((1, 1), 1, tl.int64) << (8 * tl.minimum(below, 7))) - 1)
        summed = tl.mul(keep & cells_below, 0x0101010101010101, sanitize_overflow=False)  # low bytes wrap
        per_word = tl.where(live & (j < RPW), summed >> 56, 0)
        # tl.reduce with the sum's combine function, which the interpreter runs as a numpy sum (not tl.sum)
        total = tl.reduce(tl.reduce(per_word, 1, tl.standard._sum_combine), 0, tl.standard._sum_combine)
        tl.atomic_add(count_ptr, total)


def _scale(count_ptr, scale_ptr, numel, NORMALIZE: tl.constexpr):
    # the fp32 scale numel / kept, an IEEE division (as torch's), 0 when nothing is kept; 1 without NORMALIZE.
    # numel comes as an fp32 argument: the float nearest to the count of cells, as torch converts it.
    if NORMALIZE:
        kept = tl.load(count_ptr).to(tl.float32)
        scale = tl.where(kept > 0.0, tl.div_rn(tl.full((), numel, tl.float32), tl.maximum(kept, 1.0)), 0.0)
    else:
        scale = tl.full((), 1.0, tl.float32)
    tl.store(scale_ptr, scale)


def _apply(x_ptr, out_ptr, keep_ptr, scale_ptr, numel, C, T, H, W,
           sxn, sxc, sxt, sxh, sxw, son, soc, sot, soh, sow,
           PER_CHANNEL: tl.constexpr, LAYOUT: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64) if WIDE else tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < numel
    if LAYOUT == 1:  # CONTIGUOUS: x and out (N, C, *spatial) contiguous, the keep map's own order
        x_at = offs
        out_at = offs
        if PER_CHANNEL:
            keep_at = offs
        else:
            plane = T * H * W
            keep_at = offs // (C * plane) * plane + offs % plane
    elif LAYOUT == 2:  # CHANNELS_LAST: x and out (N, *spatial, C) in memory, the keep map (N, C, *spatial)
        x_at = offs
        out_at = offs
        plane = T * H * W
        c = offs % C
        rest = offs // C
        if PER_CHANNEL:
            keep_at = (rest // plane * C + c) * plane + rest % plane
        else:
            keep_at = rest
    else:  # STRIDED: any strides, 64-bit
        offs = offs.to(tl.int64)
        w = offs % W
        rest = offs // W
        h = rest % H
        rest = rest // H
        t = rest % T
        rest = rest // T
        c = rest % C
        n = rest // C
        keep_at = (((n * C + c if PER_CHANNEL else n) * T + t) * H + h) * W + w
        x_at = n * sxn + c * sxc + t * sxt + h * sxh + w * sxw
        out_at = n * son + c * soc + t * sot + h * soh + w * sow
    keep = tl.load(keep_ptr + keep_at, mask=live, other=0)
    x = tl.load(x_ptr + x_at, mask=live, other=0.0)
    scale = tl.load(scale_ptr)  # fp32
    y = tl.where(keep != 0, x * scale, 0.0)
    tl.store(out_ptr + out_at, y.to(out_ptr.dtype.element_ty), mask=live)


@functools.lru_cache(maxsize=2)
def kernels(interpret: bool = False) -> SimpleNamespace:
    """The five programs, jitted for the device, or for Triton's CPU interpreter when ``interpret``.

    Args:
        interpret: build them as ``TRITON_INTERPRET=1`` would (they then run on CPU tensors).

    Returns:
        A namespace with ``seeds``, ``rows``, ``mask``, ``scale``, ``apply`` and the lanes of a program:
        ``block`` (bytes or elements) and ``words`` (eight cells each).

    Raises:
        RuntimeError: Triton is not installed.
    """
    if not AVAILABLE:
        raise RuntimeError("the fused DropBlock kernel needs Triton (pip install triton)")
    if interpret:  # what triton.jit builds under TRITON_INTERPRET=1, without reading (or writing) the environment
        from triton.runtime.interpreter import InterpretedFunction as jit
    else:
        from triton.runtime.jit import JITFunction as jit
    jitted = {fn.__name__[1:]: jit(fn) for fn in (_seeds, _rows, _mask, _scale, _apply)}
    # the interpreter runs a program as numpy arrays: fewer, larger programs are much faster there
    return SimpleNamespace(**jitted, block=16384 if interpret else 1024, words=4096 if interpret else 256)
