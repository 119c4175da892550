"""The op's rules, the same on every path: ``where(keep, x, 0) * scale`` (a dropped NaN or inf is 0, a kept one
stays), an fp32 scale ``numel / kept`` whatever the input dtype; eager (sparse and dense kernels, and the
registered op), fx, export, compile (AOT autograd and inductor), shared and per-channel masks, and the Triton
kernel under its interpreter."""

from __future__ import annotations

import pytest
import torch

from dropblock_inject import DropBlock2d
from dropblock_inject.ops import kernel_for
from dropblock_inject.ops._check import fp32_ratio

SHAPE = (4, 6, 12, 12)


BLOCK = {"size": 3}  # the block size the paths are built with (a test may change it)


def _module(per_channel):
    return DropBlock2d(BLOCK["size"], 0.7, per_channel=per_channel).train()


def _eager(per_channel):
    return _module(per_channel)


def _op(per_channel):
    op = torch.ops.dropblock_inject.drop_block.default
    return lambda x: op(x, torch.tensor(0.7), BLOCK["size"], per_channel, True)[0]


def _fx(per_channel):
    return torch.fx.symbolic_trace(_module(per_channel))


def _export(per_channel):
    module = _module(per_channel)
    return lambda x: torch.export.export(module, (x,)).module()(x)


def _compiled(backend):
    def build(per_channel):
        torch._dynamo.reset()
        return torch.compile(_module(per_channel), backend=backend, fullgraph=True)
    return build


PATHS = {"eager": (_eager, None), "dense": (_eager, "dense"), "op": (_op, None), "fx": (_fx, None),
         "export": (_export, None), "aot_eager": (_compiled("aot_eager"), None),
         "inductor": (_compiled("inductor"), None), "triton": (_eager, "triton")}


def _build(path, per_channel, monkeypatch):
    build, kernel = PATHS[path]
    if kernel == "triton":
        pytest.importorskip("triton")
    if kernel is not None:
        monkeypatch.setenv("DROPBLOCK_INJECT_KERNEL", kernel)
        assert kernel_for(torch.ones(SHAPE), BLOCK["size"], per_channel) == kernel  # no silent fallback
    return build(per_channel)


def _run(fn, x, seed=5):
    torch.manual_seed(seed)
    with torch.no_grad():
        return fn(x)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("path", list(PATHS))
def test_dropped_nan_and_inf_are_zero_and_kept_ones_stay(path, per_channel, monkeypatch):
    fn = _build(path, per_channel, monkeypatch)
    ones = torch.ones(SHAPE)
    reference = _run(fn, ones)
    keep = reference != 0
    assert keep.any() and not keep.all()
    scale = reference[keep][0]
    x = ones.clone().view(-1)
    x[::3], x[1::7], x[2::11] = float("nan"), float("inf"), -float("inf")
    x = x.view(SHAPE)
    got = _run(fn, x)
    want = torch.where(keep, x * scale, 0.0)
    assert ((got == 0) == (want == 0)).all()  # every dropped cell is 0, NaN and inf included
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("path", ["eager", "dense", "op", "fx", "aot_eager"])
def test_the_nan_rule_holds_when_the_block_covers_the_map(path, per_channel, monkeypatch):
    """Blocks covering the whole map drop whole planes (a mask of one value per plane)."""
    monkeypatch.setitem(BLOCK, "size", 12)
    test_dropped_nan_and_inf_are_zero_and_kept_ones_stay(path, per_channel, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("path", list(PATHS))
def test_the_scale_is_fp32_numel_over_kept_for_any_dtype(path, per_channel, dtype, monkeypatch):
    fn = _build(path, per_channel, monkeypatch)
    y = _run(fn, torch.ones((3, 5, 11, 13), dtype=dtype))
    assert y.dtype == dtype
    kept = y != 0
    want = torch.tensor(fp32_ratio(y.numel(), int(kept.sum())), dtype=torch.float32).to(dtype)
    assert torch.equal(y[kept], want.expand(int(kept.sum())))


def test_fp32_ratio_is_torchs_fp32_division():
    for numel, kept in [(3 * 5 * 11 * 13, 1000), (2**25 + 1, 2**24 + 3), (7, 3), (10, 0)]:
        want = torch.tensor(float(numel)) / torch.tensor(float(kept)) if kept else torch.tensor(0.0)
        assert fp32_ratio(numel, kept) == float(want)


@pytest.mark.parametrize("whole_map", [False, True])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("path", ["eager", "dense", "op", "fx", "aot_eager", "inductor", "triton"])
def test_the_gradient_follows_the_nan_rule(path, per_channel, whole_map, monkeypatch):
    """A NaN or inf gradient at a dropped cell gives 0, a kept one stays (times the scale)."""
    if whole_map:
        monkeypatch.setitem(BLOCK, "size", 12)
    fn = _build(path, per_channel, monkeypatch)
    x = torch.ones(SHAPE, requires_grad=True)
    torch.manual_seed(5)
    y = fn(x)
    keep = y.detach() != 0
    assert keep.any() and not keep.all()
    scale = y.detach()[keep][0]
    grad = torch.ones(SHAPE).view(-1)
    grad[::3], grad[1::7], grad[2::11] = float("nan"), float("inf"), -float("inf")
    grad = grad.view(SHAPE)
    (got,) = torch.autograd.grad(y, x, grad)
    want = torch.where(keep, grad * scale, 0.0)
    assert ((got == 0) == (want == 0)).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
