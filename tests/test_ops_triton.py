"""The fused Triton kernel (the op's CUDA kernel), run on CPU tensors by Triton's interpreter.

The kernels are built for the interpreter (``TRITON_INTERPRET=1`` while they are decorated, see
``dropblock_inject.ops._triton``), so these tests run wherever Triton is installed, GPU or not, with the
statistical checks of ``test_ops.py``: drop fractions against the analytic expectation, whole in-map blocks,
the scale ``numel / kept``, per-channel independence and shared masks, and a backward that rebuilds the same
mask from the saved philox seed. The interpreter runs a program as numpy arrays (a few seconds per 2**18
cells with a 7x7 block), so the samples are smaller than in ``test_ops.py`` and the tolerance wider (it
stays above 4 standard deviations of the measured fraction for every case); the longer sweeps are ``slow``.
On a machine with CUDA the compiled kernel is also checked through the registered op.
"""

from __future__ import annotations

import math

import pytest
import torch
from _dropblock_stats import assert_scaled_mask, assert_whole_blocks, expected_drop_fraction

pytest.importorskip("triton")

from dropblock_inject.ops import _triton, seed_rate  # noqa: E402

TOL = 0.02
CELLS = 2**18


def forward(x: torch.Tensor, kp: float, bs: int, per_channel: bool = True, scale: bool = True):
    return _triton.TRITON.forward(x, torch.tensor(kp), bs, per_channel, scale)


def fraction(kp: float, bs: int, spatial: tuple[int, ...], per_channel: bool = True, draws: int = 2) -> float:
    maps = CELLS // math.prod(spatial)
    shape = (maps // 16, 16, *spatial) if per_channel else (maps, 2, *spatial)
    x = torch.ones(shape)
    total = 0.0
    for _ in range(draws):
        y, _, _ = forward(x, kp, bs, per_channel)
        assert_whole_blocks(y, bs)
        assert_scaled_mask(y)
        total += float((y == 0).double().mean())
    return total / draws


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


FAST_2D = [(0.9, 7, 14, 14), (0.7, 5, 10, 20), (0.5, 9, 5, 7)]  # the paper's, rectangular, whole map
SLOW_2D = [(0.8, 3, 16, 16), (0.9, 7, 6, 16), (0.75, 2, 8, 12), (0.3, 4, 9, 9), (0.0, 7, 14, 14)]


@pytest.mark.parametrize("kp,bs,h,w", FAST_2D + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW_2D])
def test_drop_fraction_per_channel(kp, bs, h, w):
    assert fraction(kp, bs, (h, w)) == pytest.approx(expected_drop_fraction(kp, bs, (h, w)), abs=TOL)


@pytest.mark.parametrize("kp,bs,h,w", [(0.8, 3, 16, 16), pytest.param(0.9, 7, 14, 14, marks=pytest.mark.slow)])
def test_drop_fraction_shared(kp, bs, h, w):
    assert fraction(kp, bs, (h, w), per_channel=False) == pytest.approx(expected_drop_fraction(kp, bs, (h, w)),
                                                                        abs=TOL)


@pytest.mark.parametrize("kp,bs,t,h,w", [(0.8, 3, 4, 8, 8), pytest.param(0.7, 2, 6, 6, 6, marks=pytest.mark.slow)])
def test_drop_fraction_3d(kp, bs, t, h, w):
    assert fraction(kp, bs, (t, h, w)) == pytest.approx(expected_drop_fraction(kp, bs, (t, h, w)), abs=TOL)


def test_masks_independent_across_channels_and_shared_when_asked():
    x = torch.ones(8, 32, 12, 12)
    zero = forward(x, 0.7, 3)[0] == 0
    assert not torch.equal(zero, zero[:, :1].expand_as(zero))
    same_map = (zero == zero[:, :1]).all(dim=(2, 3)).float().mean()
    assert same_map < 0.1  # independent masks almost never coincide on a 12x12 map
    zero = forward(x, 0.7, 3, per_channel=False)[0] == 0
    assert zero.any() and torch.equal(zero, zero[:, :1].expand_as(zero))


def test_scale_is_numel_over_kept():
    x = torch.randn(16, 8, 11, 13)
    y, _, scale = forward(x, 0.8, 4)
    keep = y != 0
    assert scale.dtype == torch.float32 and float(scale) == pytest.approx(x.numel() / int(keep.sum()), rel=1e-7)
    torch.testing.assert_close(y[keep], x[keep] * scale, rtol=0, atol=0)
    y, _, _ = forward(x, 0.8, 4, scale=False)
    torch.testing.assert_close(y[y != 0], x[y != 0])


def test_keep_one_is_identity_and_keep_zero_is_finite_zeros():
    x = torch.randn(4, 8, 9, 9)
    torch.testing.assert_close(forward(x, 1.0, 3)[0], x, rtol=0, atol=0)
    y = forward(x, 0.0, 9)[0]  # whole map, every map dropped: nothing kept, no inf or nan
    assert torch.equal(y, torch.zeros_like(x))


def test_backward_rebuilds_the_mask_from_the_seed():
    x = torch.ones(8, 16, 14, 14)
    y, state, scale = forward(x, 0.9, 7)
    assert state.numel() == 2 and state.dtype == torch.int64 and scale.numel() == 1  # 20 bytes, no mask
    g = torch.randn_like(x)
    grad = _triton.TRITON.backward(g, state, scale, 7, True, [])
    torch.testing.assert_close(grad, g * y, rtol=0, atol=0)
    # the seed threshold gamma * 2**32 lives in the state: a keep_prob changed before backward cannot matter
    assert int(state[1]) / 2**32 == pytest.approx(seed_rate(0.9, (14, 14), 7), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_and_channels_last_preserved(dtype):
    x = torch.ones(4, 8, 10, 10, dtype=dtype).to(memory_format=torch.channels_last)
    y = forward(x, 0.8, 3)[0]
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_whole_blocks(y.float(), 3)
    assert_scaled_mask(y)
    nc = torch.ones(4, 16, 10, 10)[:, ::2]  # a non-contiguous input: read through its strides
    y = forward(nc, 0.8, 3)[0]
    assert_whole_blocks(y, 3)


def test_reproducible_under_manual_seed_and_empty_batch():
    x = torch.ones(4, 8, 10, 10)
    torch.manual_seed(7)
    a = forward(x, 0.8, 3)[0]
    torch.manual_seed(7)
    assert torch.equal(a, forward(x, 0.8, 3)[0])
    assert forward(torch.ones(0, 8, 10, 10), 0.8, 3)[0].shape == (0, 8, 10, 10)


def reference_keep(seeds: torch.Tensor, maps) -> torch.Tensor:
    """The keep map of a seed map by definition: a cell is dropped when a seed lies in the block ending at it
    (a stride-1 max-pool of the seed map, padded with block - 1 zeros before and the map's rest after)."""
    (t, h, w), block, (vt, vh, vw) = maps.size, maps.block, maps.valid
    anchors = seeds.view(maps.anchor_rows, -1).view(maps.planes, vt, vh, -1)
    assert not anchors[..., vw:].any()  # a row's padding holds no seed
    padded = torch.zeros(1, maps.planes, *(s + b - 1 for s, b in zip(maps.size, block)))
    padded[0, :, block[0] - 1:block[0] - 1 + vt, block[1] - 1:block[1] - 1 + vh, block[2] - 1:block[2] - 1 + vw] = \
        anchors[..., :vw].float()
    return (torch.nn.functional.max_pool3d(padded, block, stride=1)[0] == 0).view(-1)


@pytest.mark.parametrize("spatial, block_size", [
    ((14, 14), 7), ((10, 20), 5), ((5, 7), 9), ((9, 9), 4), ((7, 7), 7), ((1, 16), 3), ((3, 40), 12),
    ((16, 17), 17), ((2, 70), 20),  # rows of more than one word, blocks over 8 and 16 columns
    ((4, 8, 8), 3), ((6, 6, 6), 2), ((3, 5, 9), 9),
])
def test_keep_map_is_the_max_pool_of_the_seed_map(spatial, block_size):
    """Bit for bit, for every geometry the row and mask kernels tile differently: the word-at-a-time max-pool
    (rows of int64 words, shifted by bytes) is the max-pool of the seeds the philox kernel drew."""
    ks = _triton.kernels(interpret=True)
    planes = 48
    maps = _triton._Maps.of(planes, spatial, block_size)
    state = torch.tensor([987654321, int(0.04 * 2**32)])  # a dense seed map: blocks overlap and touch
    seeds = _triton._seed_map(ks, maps, state)
    assert 0 < int(seeds.sum()) < planes * math.prod(maps.valid)
    count = torch.zeros(1, dtype=torch.int64)
    keep = _triton._block_mask(ks, maps, seeds, count)
    want = reference_keep(seeds, maps)
    assert not want.all() and want.any()
    assert torch.equal(keep.bool(), want)
    assert int(count) == int(want.sum())  # the kept cells, summed per program and added up atomically


@pytest.mark.parametrize("numel", [1, 7, 196, 2**24 + 1, 3 * 2**24 + 5, 2**31 + 11, 2**40 + 3])
def test_scale_kernel_is_the_torch_scale_bit_for_bit(numel):
    """The scale kernel divides as ``_dense.keep_scale`` does (the CPU paths' and, before, this kernel's scale):
    counts and sizes past 2**24 round to fp32 on the way, 0 kept gives 0, and no normalisation gives 1."""
    from dropblock_inject.ops._dense import _normalizer

    ks = _triton.kernels(interpret=True)
    for kept in {0, 1, 3, numel // 3, numel - 1, numel}:
        count = torch.tensor([kept], dtype=torch.int64)
        for normalize in (True, False):
            scale = torch.empty((), dtype=torch.float32)
            ks.scale[(1,)](count, scale, float(numel), NORMALIZE=normalize)
            want = _normalizer(count.to(torch.float32), numel).reshape(()) if normalize else torch.tensor(1.0)
            assert torch.equal(scale, want), (numel, kept, normalize)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("shape", [(4, 8, 10, 12), (2, 8, 3, 6, 6)])
def test_every_layout_gives_the_same_output_and_gradient(shape, per_channel):
    """Contiguous and channels-last tensors are read by their flat index, others through their strides: the
    same seed must give the same output and gradient, bit for bit, whatever the layout."""
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape)
    g = torch.randn(shape)
    wide = torch.randn(shape[0], shape[1] * 2, *shape[2:])[:, ::2]  # strided: every other channel
    wide.copy_(x)
    outs = []
    for a, b in ((x, g), (x.to(memory_format=fmt), g.to(memory_format=fmt)), (wide, g), (x, g.to(memory_format=fmt))):
        torch.manual_seed(11)
        y, state, scale = forward(a, 0.8, 3, per_channel)
        grad = _triton.TRITON.backward(b, state, scale, 3, per_channel, [])
        assert y.stride() == torch.empty_like(a).stride() and grad.stride() == torch.empty_like(b).stride()
        outs.append((y, grad))
    assert not outs[0][0].ne(0).all()  # something was dropped
    for y, grad in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(grad, outs[0][1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the interpreter tests above cover the kernel)")
def test_cuda_op_runs_the_compiled_kernel():
    from dropblock_inject import DropBlock2d

    x = torch.ones(512, 16, 14, 14, device="cuda", requires_grad=True)
    m = DropBlock2d(7, 0.9).train().cuda()
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    y = y.detach().cpu()
    assert float((y == 0).double().mean()) == pytest.approx(expected_drop_fraction(0.9, 7, (14, 14)), abs=TOL)
    assert_whole_blocks(y, 7)
    torch.testing.assert_close(x.grad.cpu(), g.cpu() * y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the interpreter tests above cover the kernel)")
@pytest.mark.parametrize("shape, block_size, per_channel, layout", [
    ((16, 64, 14, 14), 7, True, torch.contiguous_format), ((8, 32, 7, 7), 7, True, torch.channels_last),
    ((4, 16, 9, 70), 20, False, torch.contiguous_format), ((2, 8, 4, 12, 12), 3, True, torch.channels_last_3d),
])
def test_cuda_kernels_compute_what_the_interpreter_computes(shape, block_size, per_channel, layout):
    """The compiled kernels on the GPU and the interpreted ones on the CPU, from one philox seed: the same
    threshold, keep map, scale, output and gradient, bit for bit (fp32), forward and backward."""
    x = torch.randn(shape).to(memory_format=layout)
    g = torch.randn(shape).to(memory_format=layout)
    seed = torch.tensor([1234567890123, 0])
    results = []
    for device, interpret in (("cpu", True), ("cuda", False)):
        ks = _triton.kernels(interpret)
        state, keep, scale = _triton._draw(ks, tuple(shape), torch.tensor(0.85), block_size, per_channel, True,
                                           torch.device(device), state=seed.clone().to(device))
        y = _triton._launch_apply(ks, x.to(device), keep, scale, per_channel)
        grad = _triton.TRITON.backward(g.to(device), state, scale, block_size, per_channel, [])
        results.append([t.cpu() for t in (state, keep, scale, y, grad)])
    for name, cpu, gpu in zip(("state", "keep map", "scale", "output", "gradient"), *results, strict=True):
        assert torch.equal(cpu, gpu), name
    assert not results[0][1].all()  # something was dropped


def test_philox_matches_the_random123_known_answer():
    # Philox-4x32-10 with counter (0, 0, 0, 0) and key (0, 0) gives 0x6627e8d5 first (Random123's kat_vectors).
    # The seeds kernel only says whether that word is below a threshold: bisect the threshold to read it.
    ks = _triton.kernels(interpret=True)
    seeds = torch.empty(8, dtype=torch.uint8)  # one anchor row of one anchor, padded to a word

    def below(threshold: int) -> bool:
        state = torch.tensor([0, threshold], dtype=torch.int64)
        ks.seeds[(1, 1)](state, state, state, seeds, 1, 1, 8, 0.0, FORWARD=False, WIDE=False, BLOCK_R=1, BLOCK_W=8)
        assert not seeds[1:].any()  # the row's padding holds no seed
        return bool(seeds[0])

    lo, hi = 0, 2**32  # the word w satisfies: w < threshold  <=>  threshold > w
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if below(mid) else (mid, hi)
    assert lo == 0x6627E8D5


# ----------------------------------------------------------------------------------------------------------
# the mask alone: what compiled CUDA graphs run (the mask op's CUDA kernel), the product left to inductor


@pytest.mark.parametrize("shape, per_channel, scale, channels_last, dtype", [
    ((4, 8, 14, 14), True, True, False, torch.float32),
    ((4, 8, 14, 14), True, True, True, torch.float32),  # the mask stays contiguous, the product follows x
    ((4, 8, 12, 12), False, True, False, torch.float32),  # shared: one (N, 1, H, W) mask
    ((2, 4, 5, 8, 8), True, True, False, torch.float32),  # 3-D
    ((4, 8, 14, 14), True, False, False, torch.float32),  # no scale: 1
    ((4, 8, 14, 14), True, True, False, torch.bfloat16),
])
def test_mask_times_input_is_the_fused_kernels_output(shape, per_channel, scale, channels_last, dtype):
    x = torch.randn(shape).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    torch.manual_seed(3)
    fused, _, fused_scale = forward(x, 0.8, 3, per_channel, scale)
    torch.manual_seed(3)  # the same philox seed from torch's generator: the same seeds and mask
    keep, factor = _triton.TRITON.mask(x, [], torch.tensor(0.8), 3, per_channel, scale)
    assert keep.dtype == torch.bool and keep.is_contiguous()
    assert keep.shape == (shape[0], shape[1] if per_channel else 1, *shape[2:])
    assert factor.shape == () and factor.dtype == torch.float32 and torch.equal(factor, fused_scale)
    product = (x.float() * keep * factor).to(dtype)  # as inductor computes it: in fp32, rounded once
    assert not keep.all() and torch.equal(product == 0, fused == 0)
    if dtype == torch.float32:
        assert torch.equal(product, fused)  # bitwise
    else:  # the interpreter rounds fp32 to bf16 towards zero (a GPU, and inductor, to nearest): one ulp apart
        torch.testing.assert_close(fused.float(), product.float(), rtol=2**-7, atol=0)
    assert scale or float(factor) == 1.0


def test_mask_of_an_empty_batch():
    keep, factor = _triton.TRITON.mask(torch.empty(0, 8, 10, 10), [], torch.tensor(0.8), 3, True, True)
    assert keep.shape == (0, 8, 10, 10) and keep.dtype == torch.bool and factor.shape == ()
