"""Tests of the DropBlock op (``dropblock_inject.ops``): distribution, masks, scaling, gradients, options.

Every statistical check compares with the *analytic* expectation (see :func:`expected_drop_fraction`), on
seeded draws over tens of thousands of independent maps, so a wrong seed rate, a wrong valid region or a
wrong block growth moves the measured fraction by several standard deviations.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dropblock_inject import DropBlock2d, DropBlock3d, drop_block2d, drop_block3d
from dropblock_inject.ops._dense import DENSE
from dropblock_inject.ops._functional import _call_op
from dropblock_inject.ops._sparse import SPARSE, _SMALL_MAP, _contiguous_strides, _count_dropped, _grid

from _dropblock_stats import (TOL, assert_scaled_mask, assert_whole_blocks, clipped, drop_fraction,
                              expected_drop_fraction, stat_shape)


# The implementations, called directly: the sparse CPU kernel (the eager fast path), the dense kernel (the
# fallback of devices without a fused kernel), the broadcast mask of per_channel=False (the same code whatever
# ``dense`` says; both are checked), and the registered op ``torch.ops.dropblock_inject.drop_block`` as
# compile, export and fx call it (its CPU kernel: the sparse one drawing from a reseeded generator, whose
# backward draws the seeds again; and the broadcast mask).
def _eager(kernel, x, kp, bs, per_channel, scale):
    return x if kp == 1.0 else kernel.eager(x, kp, None, bs, per_channel, scale, False)


def sparse(x, kp, bs, scale=True):
    return _eager(SPARSE, x, kp, bs, True, scale)


def dense(x, kp, bs, scale=True):
    return _eager(DENSE, x, kp, bs, True, scale)


def shared(x, kp, bs, scale=True):
    return _eager(DENSE, x, kp, bs, False, scale)


def shared_dense(x, kp, bs, scale=True):
    return _eager(DENSE, x, kp, bs, False, scale)


def op(x, kp, bs, scale=True):
    return torch.ops.dropblock_inject.drop_block(x, torch.tensor(kp), bs, True, scale)[0]


def op_shared(x, kp, bs, scale=True):
    return torch.ops.dropblock_inject.drop_block(x, torch.tensor(kp), bs, False, scale)[0]


PATHS = {"sparse": sparse, "dense": dense, "shared": shared, "shared_dense": shared_dense, "op": op,
         "op_shared": op_shared}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# ----------------------------------------------------------------------------------------------------------
# the distribution: drop fractions against the analytic expectation

CASES_2D = [
    # keep_prob, block_size, H, W
    (0.9, 7, 14, 14),   # the paper's setting on a 14x14 map
    (0.8, 3, 16, 16),
    (0.7, 5, 10, 20),   # rectangular
    (0.9, 7, 6, 16),    # block clipped on H only
    (0.5, 9, 5, 7),     # block covers the whole map: one value per map
    (0.75, 2, 8, 12),   # even block
    (0.3, 4, 9, 9),     # heavy dropping, many overlaps
    (0.0, 7, 14, 14),   # keep_prob 0 with a block smaller than the map
]


def test_expected_fraction_helper_sanity():
    # block == map: a map is dropped whole with probability 1 - keep_prob
    assert expected_drop_fraction(0.6, 5, (5, 5)) == pytest.approx(0.4)
    # block 1: plain dropout
    assert expected_drop_fraction(0.9, 1, (7, 3)) == pytest.approx(0.1)
    # few seeds: close to 1 - keep_prob
    assert expected_drop_fraction(0.999, 3, (20, 20)) == pytest.approx(0.001, rel=0.01)


@pytest.mark.parametrize("path", ["sparse", "dense", "op"])
@pytest.mark.parametrize("kp,bs,h,w", CASES_2D)
def test_drop_fraction_per_channel(path, kp, bs, h, w):
    got = drop_fraction(lambda x: PATHS[path](x, kp, bs), stat_shape((h, w), 64), draws=6)
    assert got == pytest.approx(expected_drop_fraction(kp, bs, (h, w)), abs=TOL)


@pytest.mark.parametrize("path", ["shared", "shared_dense", "op_shared"])
@pytest.mark.parametrize("kp,bs,h,w", CASES_2D)
def test_drop_fraction_shared(path, kp, bs, h, w):
    # one mask per sample: many samples, few channels
    got = drop_fraction(lambda x: PATHS[path](x, kp, bs), stat_shape((h, w), 2, shared=True), draws=6)
    assert got == pytest.approx(expected_drop_fraction(kp, bs, (h, w)), abs=TOL)


def test_drop_fraction_public_api_matches_expectation():
    kp, bs = 0.9, 7
    exp = expected_drop_fraction(kp, bs, (14, 14))
    assert drop_fraction(lambda x: drop_block2d(x, kp, bs), (64, 64, 14, 14), 4) == pytest.approx(exp, abs=TOL)
    m = DropBlock2d(bs, kp).train()
    assert drop_fraction(m, (64, 64, 14, 14), 4) == pytest.approx(exp, abs=TOL)
    m = DropBlock2d(bs, kp, per_channel=False).train()
    assert drop_fraction(m, (4096, 2, 14, 14), 4) == pytest.approx(exp, abs=TOL)


def test_sparse_and_dense_agree_per_cell():
    """Not only the mean: the per-position drop rate (edges are dropped less often) matches the analytics."""
    kp, bs, h, w = 0.7, 5, 10, 12
    block = clipped(bs, (h, w))
    valid = [s - b + 1 for s, b in zip((h, w), block)]
    gamma = (1 - kp) / math.prod(block) * h * w / math.prod(valid)
    counts = torch.ones(())
    for s, b in zip((h, w), block):
        counts = counts.unsqueeze(-1) * torch.tensor([min(p, s - b) - max(0, p - b + 1) + 1 for p in range(s)])
    expected = 1 - (1 - gamma) ** counts.double()
    for fn in (sparse, dense):
        x = torch.ones(64, 64, h, w)
        rate = sum((fn(x, kp, bs) == 0).double().mean((0, 1)) for _ in range(4)) / 4
        torch.testing.assert_close(rate, expected, atol=0.02, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# the mask: whole blocks, normalisation, per-channel vs shared


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kp,bs,h,w", CASES_2D)
def test_zeros_are_whole_in_map_blocks(path, kp, bs, h, w):
    y = PATHS[path](torch.ones(4, 8, h, w), kp, bs)
    assert_whole_blocks(y, bs)
    assert_scaled_mask(y)


@pytest.mark.parametrize("path", list(PATHS))
def test_mean_preserved_by_normalisation(path):
    for kp, bs in [(0.9, 7), (0.5, 3), (0.2, 1), (0.6, 14)]:
        x = torch.ones(8, 16, 14, 14)
        y = PATHS[path](x, kp, bs)
        assert (y != 0).any()
        assert float(y.double().sum()) == pytest.approx(x.numel(), rel=1e-5)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_everything_dropped_gives_finite_zeros(path, dtype):
    # keep_prob 0 with a block covering the map, and keep_prob 0 with block 1 (every position a seed);
    # numel > 65504 so that numel / max(kept, 1) overflows float16 if it were applied to a zero mask
    for bs, shape in [(16, (8, 64, 16, 16)), (1, (8, 64, 16, 16)), (3, (1, 1, 3, 3))]:
        x = torch.ones(shape, dtype=dtype)
        y = PATHS[path](x, 0.0, bs)
        assert y.dtype == dtype
        assert torch.isfinite(y).all()
        assert (y == 0).all()


@pytest.mark.parametrize("path", list(PATHS))
def test_nothing_dropped_is_exactly_the_input(path):
    # numel / kept must be a true division: 55 * (1 / 55) is 1 ulp off in fp32 (found by hypothesis)
    for shape in [(1, 1, 5, 11), (2, 3, 7, 13)]:
        x = torch.rand(shape) + 0.5
        assert torch.equal(PATHS[path](x, 1.0, 1), x)
        assert torch.equal(PATHS[path](x, 1.0, 3), x)


@pytest.mark.parametrize("n_planes, spatial, block, seeds, large_map", [
    (64, (10, 10), (7, 7), 40, False),        # a few planes: a small byte map, counted by count_nonzero
    (4096, (14, 14), (3, 3), 3000, True),     # thousands of seeded planes: a map above _SMALL_MAP
    (16, (4, 6, 6), (2, 3, 3), 30, False),    # 3-D blocks
])
def test_count_dropped_matches_a_cell_by_cell_count(n_planes, spatial, block, seeds, large_map):
    assert ((min(seeds, n_planes) + 1) * math.prod(spatial) > _SMALL_MAP) == large_map  # the map it sizes
    valid = tuple(s - b + 1 for s, b in zip(spatial, block))
    plane = torch.randint(n_planes, (seeds,))
    anchor = torch.randint(math.prod(valid), (seeds,))
    offset = _grid(valid, _contiguous_strides(spatial), torch.device("cpu")).index_select(0, anchor)
    covered = torch.zeros(n_planes, *spatial, dtype=torch.bool)
    for p, a in zip(plane.tolist(), anchor.tolist()):
        corner = torch.unravel_index(torch.tensor(a), valid)
        covered[(p, *(slice(int(i), int(i) + b) for i, b in zip(corner, block)))] = True
    assert _count_dropped(plane, offset, n_planes, spatial, block) == int(covered.sum())


def test_scale_false_keeps_values():
    x = torch.rand(4, 8, 12, 12) + 0.5
    for fn in PATHS.values():
        y = fn(x, 0.7, 3, scale=False)
        kept = y != 0
        assert kept.any() and not kept.all()
        assert torch.equal(y[kept], x[kept])
    y = drop_block2d(x, 0.7, 3, scale=False)
    assert torch.equal(y[y != 0], x[y != 0])


@pytest.mark.parametrize("path", ["sparse", "dense", "op"])
def test_per_channel_masks_differ_across_channels(path):
    y = PATHS[path](torch.ones(4, 32, 14, 14), 0.7, 3)
    for n in range(4):
        zeros = (y[n] == 0).flatten(1)
        assert len({tuple(z.nonzero().flatten().tolist()) for z in zeros}) > 16
    # also when the block covers the map (one value per channel)
    y = PATHS[path](torch.ones(4, 64, 5, 5), 0.5, 7)
    per_map = (y == 0).flatten(2)
    assert (per_map.all(-1) | (~per_map).all(-1)).all()  # whole maps
    dropped = per_map.all(-1)
    assert 0 < dropped.sum() < 4 * 64
    assert (dropped.any(1) & ~dropped.all(1)).all()  # within every sample, some channels dropped, some kept


@pytest.mark.parametrize("path", ["shared", "shared_dense", "op_shared"])
def test_shared_masks_identical_across_channels(path):
    for bs, hw in [(3, 14), (7, 5)]:
        x = torch.rand(8, 16, hw, hw) + 0.5
        y = PATHS[path](x, 0.6, bs)
        zero = y == 0
        assert torch.equal(zero, zero[:, :1].expand_as(zero))
        assert zero.any() and not zero.all()
        # the samples' masks differ
        assert len({tuple(z.flatten().tolist()) for z in zero[:, 0]}) > 1
    # and the module
    m = DropBlock2d(3, 0.6, per_channel=False).train()
    z = m(torch.ones(2, 8, 14, 14)) == 0
    assert torch.equal(z, z[:, :1].expand_as(z))


# ----------------------------------------------------------------------------------------------------------
# gradients


def check_grad(fn, x: torch.Tensor) -> None:
    """x.grad == grad_output * mask * numel / kept, read from the output's zero pattern."""
    x = x.detach().requires_grad_()
    y = fn(x)
    g = torch.randn_like(y)
    y.backward(g)
    mask = y.detach() != 0
    factor = y.numel() / max(int(mask.sum()), 1)
    assert 0 < int(mask.sum()) < y.numel()
    torch.testing.assert_close(y.detach(), x.detach() * mask * factor)
    torch.testing.assert_close(x.grad, g * mask * factor)


@pytest.mark.parametrize("path", list(PATHS))
def test_gradient_is_mask_times_scale(path):
    check_grad(lambda x: PATHS[path](x, 0.8, 5), torch.rand(4, 8, 14, 14) + 0.5)
    check_grad(lambda x: PATHS[path](x, 0.6, 9), torch.rand(32, 8, 5, 7) + 0.5)  # whole map
    check_grad(lambda x: PATHS[path](x, 0.8, 4), torch.rand(4, 8, 10, 16) + 0.5)  # even block, rectangle


@pytest.mark.parametrize("path", list(PATHS))
def test_gradient_3d(path):
    fn = PATHS[path]
    check_grad(lambda x: fn(x, 0.8, 3), torch.rand(4, 8, 5, 8, 8) + 0.5)
    check_grad(lambda x: drop_block3d(x, 0.8, 3), torch.rand(4, 8, 5, 8, 8) + 0.5)


def test_gradient_through_modules():
    check_grad(DropBlock2d(5, 0.8).train(), torch.rand(4, 8, 14, 14) + 0.5)
    check_grad(DropBlock2d(5, 0.8, per_channel=False).train(), torch.rand(4, 8, 14, 14) + 0.5)
    check_grad(DropBlock3d(3, 0.8).train(), torch.rand(4, 8, 5, 8, 8) + 0.5)


def test_gradcheck_float64():
    for fn in PATHS.values():
        x = (torch.rand(2, 2, 5, 6, dtype=torch.float64) + 0.5).requires_grad_()
        torch.manual_seed(5)

        def f(t, fn=fn):
            torch.manual_seed(5)  # the same mask on every call
            return fn(t, 0.7, 3)

        assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("path", list(PATHS))
def test_channels_last_preserved_in_output_and_grad(path):
    x = (torch.rand(4, 8, 12, 12) + 0.5).to(memory_format=torch.channels_last).requires_grad_()
    y = PATHS[path](x, 0.7, 3)
    assert y.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(y)  # channels_last too
    (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    mask = y.detach() != 0
    factor = y.numel() / int(mask.sum())
    torch.testing.assert_close(y.detach(), x.detach() * mask * factor)
    torch.testing.assert_close(gx, g * mask * factor)
    y.backward(g)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("x_format, grad_kind", [
    (torch.contiguous_format, "channels_last"),
    (torch.channels_last, "contiguous"),
    (torch.contiguous_format, "expanded"),  # what y.sum().backward() sends
])
def test_gradient_whatever_the_grad_layout(path, x_format, grad_kind):
    x = (torch.rand(4, 8, 12, 12) + 0.5).to(memory_format=x_format).requires_grad_()
    y = PATHS[path](x, 0.7, 3)
    if grad_kind == "expanded":
        g = torch.randn(()).expand(y.shape)
    else:
        fmt = torch.channels_last if grad_kind == "channels_last" else torch.contiguous_format
        g = torch.randn(y.shape).contiguous(memory_format=fmt)
    (gx,) = torch.autograd.grad(y, x, g)
    mask = y.detach() != 0
    torch.testing.assert_close(gx, g * mask * (y.numel() / int(mask.sum())))


def test_channels_last_3d():
    x = (torch.rand(2, 4, 5, 8, 8) + 0.5).to(memory_format=torch.channels_last_3d)
    for fn in PATHS.values():
        xr = x.clone().requires_grad_()
        y = fn(xr, 0.7, 3)
        assert y.is_contiguous(memory_format=torch.channels_last_3d)
        check_grad(lambda t, fn=fn: fn(t, 0.7, 3), x)


@pytest.mark.parametrize("shape, memory_format", [((4, 8, 11, 9), torch.channels_last),
                                                  ((2, 3, 5, 11, 9), torch.channels_last_3d)])
def test_sparse_mask_does_not_depend_on_memory_format(shape, memory_format):
    # the sparse path writes blocks through the output's own strides: a channels-last map must get
    # exactly the blocks a contiguous one gets from the same seeds
    x = torch.rand(shape) + 0.5
    g = torch.randn(shape)
    results = []
    for t in (x, x.to(memory_format=memory_format)):
        t = t.clone().requires_grad_()
        torch.manual_seed(3)
        y = sparse(t, 0.6, 3)
        y.backward(g)
        results.append((y.detach(), t.grad))
    (y_ref, g_ref), (y_cl, g_cl) = results
    assert (y_ref == 0).any()
    assert torch.equal(y_ref, y_cl)
    assert torch.equal(g_ref, g_cl)


@pytest.mark.parametrize("path", list(PATHS))
def test_non_contiguous_input(path):
    base = (torch.rand(4, 16, 14, 28) + 0.5).requires_grad_()
    x = base[:, ::2, :, ::2]  # neither contiguous nor dense
    assert not x.is_contiguous()
    y = PATHS[path](x, 0.7, 3)
    mask = y.detach() != 0
    factor = y.numel() / int(mask.sum())
    torch.testing.assert_close(y.detach(), x.detach() * mask * factor)
    assert_whole_blocks(torch.where(mask, 1.0, 0.0), 3)
    g = torch.randn_like(y)
    y.backward(g)
    expected = torch.zeros_like(base)
    expected[:, ::2, :, ::2] = g * mask * factor
    torch.testing.assert_close(base.grad, expected)
    # a permuted (dense but not contiguous) input
    check_grad(lambda t: PATHS[path](t, 0.7, 3), (torch.rand(4, 8, 12, 10) + 0.5).transpose(2, 3))


# ----------------------------------------------------------------------------------------------------------
# randomness, identity, eval


@pytest.mark.parametrize("path", list(PATHS))
def test_reproducible_under_manual_seed(path):
    x = torch.rand(4, 8, 14, 14)
    torch.manual_seed(7)
    a = PATHS[path](x, 0.8, 5)
    torch.manual_seed(7)
    b = PATHS[path](x, 0.8, 5)
    c = PATHS[path](x, 0.8, 5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_module_reproducible_under_manual_seed():
    for m in (DropBlock2d(5, 0.8), DropBlock2d(5, 0.8, per_channel=False)):
        x = torch.rand(4, 8, 14, 14)
        torch.manual_seed(3)
        a = m(x)
        torch.manual_seed(3)
        assert torch.equal(a, m(x))


def _identity_no_rng(fn, x):
    state = torch.get_rng_state()
    y = fn(x)
    assert y is x
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("cls,shape", [(DropBlock2d, (2, 4, 8, 8)), (DropBlock3d, (2, 4, 3, 8, 8))])
@pytest.mark.parametrize("per_channel", [True, False])
def test_eval_and_keep_one_are_identity_without_random_numbers(cls, shape, per_channel):
    x = torch.rand(shape, requires_grad=True)
    m = cls(3, 0.5, per_channel=per_channel).eval()
    _identity_no_rng(m, x)
    m = cls(3, 1.0, per_channel=per_channel).train()
    _identity_no_rng(m, x)
    m.keep_prob = 0.5
    m.keep_prob = 1.0
    _identity_no_rng(m, x)
    # the default keep_prob is 1: a freshly built module is a no-op
    _identity_no_rng(cls(3, per_channel=per_channel), x)
    functional = drop_block2d if cls is DropBlock2d else drop_block3d
    _identity_no_rng(lambda t: functional(t, 0.5, 3, per_channel=per_channel, training=False), x)
    _identity_no_rng(lambda t: functional(t, 1.0, 3, per_channel=per_channel), x)


def test_training_draws_random_numbers():
    state = torch.get_rng_state()
    DropBlock2d(3, 0.9).train()(torch.rand(2, 4, 8, 8))
    assert not torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------------------------------------
# dtypes, formats, shapes


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_preserved(path, dtype):
    x = torch.ones(4, 8, 14, 14, dtype=dtype)
    y = PATHS[path](x, 0.8, 5)
    assert y.dtype == dtype
    assert_whole_blocks(y, 5)
    assert_scaled_mask(y)
    xr = (torch.rand(4, 8, 14, 14, dtype=dtype) + 0.5).requires_grad_()
    y = PATHS[path](xr, 0.8, 5)
    y.sum().backward()
    assert xr.grad.dtype == dtype


def test_module_dtypes_and_half_module():
    m = DropBlock2d(5, 0.8).train()
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert m(torch.ones(2, 4, 14, 14, dtype=dtype)).dtype == dtype
    m.half()  # converts the float buffer too; the op must keep working
    assert m(torch.ones(2, 4, 14, 14, dtype=torch.float16)).dtype == torch.float16
    m.keep_prob = 0.7
    assert m.keep_prob == 0.7


@pytest.mark.parametrize("path", list(PATHS))
def test_empty_batch(path):
    x = torch.ones(0, 4, 8, 8, requires_grad=True)
    y = PATHS[path](x, 0.8, 3)
    assert y.shape == x.shape
    y.sum().backward()
    for fn in (DropBlock2d(3, 0.8), DropBlock2d(3, 0.8, per_channel=False)):
        assert fn(x).shape == x.shape
    assert drop_block2d(x, 0.8, 3).shape == x.shape
    assert drop_block3d(torch.ones(0, 2, 3, 4, 4), 0.8, 3).shape == (0, 2, 3, 4, 4)


@pytest.mark.parametrize("path", list(PATHS))
def test_tiny_and_rectangular_maps(path):
    for shape, bs in [((2, 3, 1, 1), 7), ((2, 3, 1, 9), 3), ((2, 3, 9, 1), 3), ((3, 2, 2, 17), 5)]:
        x = torch.ones(shape)
        y = PATHS[path](x, 0.5, bs)
        assert y.shape == shape
        assert_whole_blocks(y, bs)
        assert_scaled_mask(y)


def test_under_autocast():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    for m in (DropBlock2d(3, 0.8), DropBlock2d(3, 0.8, per_channel=False)):
        x = torch.rand(4, 3, 14, 14)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = conv(x)
            y = m(h)
        assert h.dtype == y.dtype == torch.bfloat16
        assert (y == 0).any()
        y.float().sum().backward()
        assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
        conv.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = drop_block2d(torch.ones(4, 8, 14, 14), 0.8, 3)
    assert y.dtype == torch.float32  # an fp32 input stays fp32: the op is not an autocast op
    assert_scaled_mask(y)


# ----------------------------------------------------------------------------------------------------------
# the module: keep_prob buffer, repr, state_dict


def test_keep_prob_tensor_not_a_buffer_and_updated_in_place():
    m = DropBlock2d(7, 0.9)
    assert m.state_dict() == {}
    assert not list(m.buffers())  # AveragedModel(use_buffers=True) and DDP's broadcast never see it
    assert m.keep_prob_tensor.item() == pytest.approx(0.9)
    ptr = m.keep_prob_tensor.data_ptr()
    m.keep_prob = 0.8
    assert m.keep_prob == 0.8 and isinstance(m.keep_prob, float)
    assert m.keep_prob_tensor.data_ptr() == ptr
    assert m.keep_prob_tensor.item() == pytest.approx(0.8)
    m.keep_prob = torch.tensor(0.75)  # a one-element tensor is accepted
    assert m.keep_prob == 0.75 and m.keep_prob_tensor.data_ptr() == ptr
    # the state_dict of a model is unchanged by the module
    model = nn.Sequential(nn.Conv2d(3, 4, 3), DropBlock2d(3, 0.9))
    assert set(model.state_dict()) == {"0.weight", "0.bias"}
    model.load_state_dict(nn.Sequential(nn.Conv2d(3, 4, 3)).state_dict())


def test_repr_shows_config():
    r = repr(DropBlock2d(5, 0.9, per_channel=False))
    assert r.startswith("DropBlock2d(")
    for part in ("block_size=5", "keep_prob=0.9", "per_channel=False", "scale=True"):
        assert part in r
    assert "keep_prob=0.7" in repr(DropBlock3d(3, 0.7))


def test_module_deepcopy_and_pickle():
    import copy
    import io

    m = DropBlock2d(5, 0.9)
    c = copy.deepcopy(m)
    c.keep_prob = 0.5
    assert m.keep_prob == 0.9 and m.keep_prob_tensor.item() == pytest.approx(0.9)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)
    assert m2.keep_prob == 0.9 and m2.keep_prob_tensor.item() == pytest.approx(0.9)


# ----------------------------------------------------------------------------------------------------------
# torch.compile


def test_compile_no_recompile_when_keep_prob_changes():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    m = DropBlock2d(3, 0.9).train()
    compiled = torch.compile(m, backend=counter)
    x = torch.ones(64, 32, 12, 12)
    for kp in (0.9, 0.8, 0.7, 0.95):
        m.keep_prob = kp
        y = compiled(x)
        frac = float((y == 0).double().mean())
        assert frac == pytest.approx(expected_drop_fraction(kp, 3, (12, 12)), abs=TOL)
        assert_whole_blocks(y, 3)
        assert_scaled_mask(y)
    assert counter.frame_count == 1  # one graph, no graph break, no recompile
    m.keep_prob = 1.0
    assert torch.equal(compiled(x), x)  # values: identity (the compiled graph still draws)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_compile_shared_and_gradient():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    m = DropBlock2d(3, 0.8, per_channel=False).train()
    compiled = torch.compile(m, backend=counter)
    for kp in (0.8, 0.6):
        m.keep_prob = kp
        check_grad(compiled, torch.rand(16, 8, 12, 12) + 0.5)
    assert counter.frame_count == 1
    x = torch.ones(2048, 2, 12, 12)  # a new shape (and no grad): one more graph, then none per keep_prob
    for kp in (0.6, 0.9):
        m.keep_prob = kp
        y = compiled(x)
        assert float((y == 0).double().mean()) == pytest.approx(expected_drop_fraction(kp, 3, (12, 12)), abs=TOL)
        z = y == 0
        assert torch.equal(z, z[:, :1].expand_as(z))
    assert counter.frame_count == 2
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------
# argument errors


@pytest.mark.parametrize("bad,exc,text", [(0, ValueError, "0"), (2.5, TypeError, "2.5"), (True, TypeError, "True"),
                                          (-3, ValueError, "-3")])
def test_bad_block_size(bad, exc, text):
    with pytest.raises(exc, match="block_size") as info:
        DropBlock2d(bad, 0.9)
    assert text in str(info.value)
    with pytest.raises(exc, match="block_size"):
        drop_block2d(torch.ones(1, 1, 4, 4), 0.9, bad)
    with pytest.raises(exc, match="block_size"):
        DropBlock3d(bad)


@pytest.mark.parametrize("bad,exc,text", [(-0.1, ValueError, "-0.1"), (1.5, ValueError, "1.5"),
                                          (float("nan"), ValueError, "nan"), ("a", TypeError, "'a'"),
                                          (None, TypeError, "None")])
def test_bad_keep_prob(bad, exc, text):
    with pytest.raises(exc, match="keep_prob") as info:
        DropBlock2d(3, bad)
    assert text in str(info.value)
    m = DropBlock2d(3, 0.9)
    with pytest.raises(exc, match="keep_prob"):
        m.keep_prob = bad
    assert m.keep_prob == 0.9 and m.keep_prob_tensor.item() == pytest.approx(0.9)  # unchanged
    with pytest.raises(exc, match="keep_prob"):
        drop_block2d(torch.ones(1, 1, 4, 4), bad, 3)


def test_bad_input_rank_and_dtype():
    with pytest.raises(ValueError, match=r"DropBlock2d.*4-D.*\(2, 3, 4\)"):
        DropBlock2d(3, 0.9).train()(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match=r"DropBlock3d.*5-D.*\(2, 3, 4, 4\)"):
        DropBlock3d(3, 0.9).train()(torch.ones(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"drop_block2d.*4-D"):
        drop_block2d(torch.ones(1, 2, 3, 4, 5), 0.9, 3)
    with pytest.raises(TypeError, match=r"floating point.*torch\.int64"):
        DropBlock2d(3, 0.9).train()(torch.ones(1, 2, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"floating point.*torch\.int64"):
        drop_block2d(torch.ones(1, 2, 4, 4, dtype=torch.long), 0.9, 3)
    with pytest.raises(TypeError, match="Tensor"):
        drop_block2d([[1.0]], 0.9, 3)


# ----------------------------------------------------------------------------------------------------------
# what backward keeps


def saved_bytes(fn, x: torch.Tensor) -> int:
    storages: dict[int, int] = {}
    x_ptr = x.untyped_storage().data_ptr()

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() != x_ptr:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    y.sum().backward()
    return sum(storages.values())


def test_backward_memory_sparse_saves_only_seeds():
    x = torch.randn(16, 256, 14, 14, requires_grad=True)
    nbytes = saved_bytes(lambda t: sparse(t, 0.9, 7), x)
    assert nbytes < x.numel()  # < 1 byte per input element (seeds: ~0.02 B/elem here)
    assert nbytes < 0.1 * x.numel()


def test_backward_memory_op_saves_the_seeds_not_a_mask():
    # the registered op (compile, export, fx): a generator seed, gamma, the scale and one corner (8 bytes) per
    # seed, as the eager kernel keeps: about 0.016 bytes per element here, where a bool mask would be 1
    for shape in ((16, 256, 14, 14), (4, 64, 28, 28)):
        x = torch.randn(shape, requires_grad=True)
        assert 64 < saved_bytes(lambda t: op(t, 0.9, 7), x) < 0.05 * x.numel()


def test_backward_memory_dense_and_shared():
    x = torch.randn(16, 256, 14, 14, requires_grad=True)
    # per-channel dense: a bool mask, one byte per element (plus a scalar)
    assert saved_bytes(lambda t: dense(t, 0.9, 7), x) <= x.numel() + 64
    # shared: one mask per sample, a fraction of a byte per element
    for fn in (shared, shared_dense):
        assert saved_bytes(lambda t, fn=fn: fn(t, 0.9, 7), x) <= x.numel() // 16
    assert saved_bytes(DropBlock2d(7, 0.9, per_channel=False).train(), x) <= x.numel() // 16
    assert saved_bytes(DropBlock2d(7, 0.9).train(), x) < 0.1 * x.numel()


# ----------------------------------------------------------------------------------------------------------
# 3-D

CASES_3D = [
    # keep_prob, block_size, T, H, W
    (0.9, 3, 4, 8, 8),
    (0.8, 5, 3, 10, 6),   # clipped on T
    (0.7, 2, 6, 6, 6),    # even block
    (0.5, 9, 3, 4, 5),    # whole volume
]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kp,bs,t,h,w", CASES_3D)
def test_drop_fraction_3d(path, kp, bs, t, h, w):
    shared_mask = path in ("shared", "shared_dense", "op_shared")
    shape = stat_shape((t, h, w), 2 if shared_mask else 64, shared=shared_mask)
    got = drop_fraction(lambda x: PATHS[path](x, kp, bs), shape, draws=4)
    assert got == pytest.approx(expected_drop_fraction(kp, bs, (t, h, w)), abs=TOL)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kp,bs,t,h,w", CASES_3D)
def test_zeros_are_whole_blocks_3d(path, kp, bs, t, h, w):
    y = PATHS[path](torch.ones(3, 4, t, h, w), kp, bs)
    assert_whole_blocks(y, bs)
    assert_scaled_mask(y)


def test_dropblock3d_module():
    m = DropBlock3d(3, 0.8).train()
    x = torch.ones(64, 64, 4, 8, 8)
    y = m(x)
    assert float((y == 0).double().mean()) == pytest.approx(expected_drop_fraction(0.8, 3, (4, 8, 8)), abs=TOL)
    assert_whole_blocks(y, 3)
    m = DropBlock3d(3, 0.8, per_channel=False).train()
    z = m(torch.ones(8, 4, 4, 8, 8)) == 0
    assert torch.equal(z, z[:, :1].expand_as(z))
    # clipping: block 7 on a (2, 3, 12) volume is (2, 3, 7)
    y = drop_block3d(torch.ones(8, 16, 2, 3, 12), 0.5, 7)
    assert_whole_blocks(y, 7)
    zero = y == 0
    assert zero.any()
    assert (zero.all(2).all(2).sum(-1) % 1 == 0).all()  # dropped cells span the whole T and H extent
    assert torch.equal(zero, zero[:, :, :1, :1].expand_as(zero))


# ----------------------------------------------------------------------------------------------------------
# properties over random configurations

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def configs(draw, spatial_dims: int):
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 8))
    size = 12 if spatial_dims == 3 else 20
    spatial = tuple(draw(st.integers(1, size)) for _ in range(spatial_dims))
    block = draw(st.integers(1, 9))
    keep = draw(st.one_of(st.sampled_from([0.0, 0.5, 0.9, 1.0]), st.floats(0.0, 1.0)))
    dtype = draw(st.sampled_from(DTYPES))
    per_channel = draw(st.booleans())
    dense_path = draw(st.booleans())
    channels_last = spatial_dims == 2 and draw(st.booleans())
    return (n, c, *spatial), block, keep, dtype, per_channel, dense_path, channels_last


def _check_invariants(shape, block, keep, dtype, per_channel, dense_path, channels_last):
    x = torch.ones(shape, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = _eager(DENSE if dense_path or not per_channel else SPARSE, x, keep, block, per_channel, True)
    assert y.shape == x.shape and y.dtype == dtype
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_whole_blocks(y, block)
    assert_scaled_mask(y)
    if not per_channel:
        z = y == 0
        assert torch.equal(z, z[:, :1].expand_as(z))
    if keep == 1.0:
        assert torch.equal(y, x)
    # the public entry points agree on shape and dtype
    fn = drop_block2d if len(shape) == 4 else drop_block3d
    out = fn(x, keep, block, per_channel=per_channel)
    assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()


@settings(max_examples=40, deadline=None)
@given(configs(2))
def test_properties_2d(cfg):
    _check_invariants(*cfg)


@settings(max_examples=40, deadline=None)
@given(configs(3))
def test_properties_3d(cfg):
    _check_invariants(*cfg)


# ------------------------------------------------------------------------------------------------ inplace


@pytest.mark.parametrize("per_channel, block_size", [(True, 3), (False, 3), (True, 16)])  # sparse, shared, whole map
@pytest.mark.parametrize("channels_last", [False, True])
def test_inplace_matches_out_of_place(per_channel, block_size, channels_last):
    base = torch.rand(4, 6, 12, 12) + 0.5
    if channels_last:
        base = base.to(memory_format=torch.channels_last)
    g = torch.randn(4, 6, 12, 12)
    results = []
    for inplace in (False, True):
        leaf = base.clone().requires_grad_()
        h = leaf * 1.0  # a fresh non-leaf, like a BatchNorm output
        ptr = h.data_ptr()
        torch.manual_seed(11)
        y = DropBlock2d(block_size, 0.7, per_channel=per_channel, inplace=inplace)(h)
        assert (y.data_ptr() == ptr) == inplace
        y.backward(g)
        results.append((y.detach(), leaf.grad))
    (y0, g0), (y1, g1) = results
    assert (y0 == 0).any()
    assert torch.equal(y0, y1)
    assert torch.equal(g0, g1)


def test_inplace_functional_and_fallbacks():
    x = torch.rand(2, 4, 10, 20) + 0.5
    strided = x.clone()[:, :, :, ::2]  # not dense: worked on out of place
    torch.manual_seed(0)
    ref = drop_block2d(strided.contiguous(), 0.6, 3)
    torch.manual_seed(0)
    out = drop_block2d(strided, 0.6, 3, inplace=True)
    assert torch.equal(out, ref)
    y = x.clone()
    assert drop_block2d(y, 0.6, 3, inplace=True) is y  # dense: written into
    assert "inplace=True" in repr(DropBlock2d(3, 0.9, inplace=True))
    leaf = torch.rand(2, 4, 10, 10, requires_grad=True)  # like nn.ReLU(inplace=True) on a leaf
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        DropBlock2d(3, 0.6, inplace=True)(leaf)


@pytest.mark.parametrize(("shape", "block_size", "keep_prob"), [((2, 64, 8, 8), 7, 0.9), ((2, 32, 16, 16), 3, 0.8),
                                                                 ((2, 8, 6, 10, 10), 3, 0.85)])
def test_eager_module_and_registered_op_draw_the_same_mask(shape, block_size, keep_prob):
    """Under the same torch.manual_seed the eager module (the sparse kernel called directly) and the registered
    op (what compiled and fx-traced models call) drop the same blocks, forward and backward."""
    db = (DropBlock3d if len(shape) == 5 else DropBlock2d)(block_size, keep_prob).train()
    x = torch.randn(shape)
    outs, grads = [], []
    for call in (db, lambda t: _call_op(t, db.keep_prob_tensor, db.block_size, db.per_channel, db.scale)):
        leaf = x.clone().requires_grad_()
        torch.manual_seed(7)
        out = call(leaf)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append(leaf.grad)
    assert (outs[0] == 0).any() and torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
