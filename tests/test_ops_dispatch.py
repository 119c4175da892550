"""Which kernel runs: one choice per call, forced by ``DROPBLOCK_INJECT_KERNEL`` or ``set_kernel``, and the
Triton kernel's first-call check (run here under Triton's interpreter): a kernel that fails it warns once, then
the dense kernel runs. Also what the package must not touch: the environment, and inductor's configuration
from inside a fake kernel."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import dropblock_inject.ops as ops
from dropblock_inject import DropBlock2d, drop_block2d
from dropblock_inject.ops import _dispatch, _selfcheck, kernel_for, set_kernel


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("DROPBLOCK_INJECT_KERNEL", raising=False)
    monkeypatch.setattr(_selfcheck, "_results", {})  # every test checks the kernel anew
    yield
    set_kernel(None)


def test_default_kernels_on_cpu():
    x = torch.ones(2, 3, 8, 8)
    assert kernel_for(x, 3) == "sparse" and kernel_for(x, 3, per_channel=False) == "dense"
    assert kernel_for(x, 8) == "dense"  # the block covers the map: one value per plane
    assert kernel_for(torch.ones(2, 3, 8, 8, device="meta"), 3) == "dense"


@pytest.mark.parametrize("name", ["dense", "sparse"])
def test_environment_variable_and_api_force_a_kernel(name, monkeypatch):
    x = torch.ones(2, 3, 9, 9)
    monkeypatch.setenv("DROPBLOCK_INJECT_KERNEL", name)
    assert kernel_for(x) == name
    set_kernel("dense" if name == "sparse" else "sparse")  # the API wins over the variable
    assert kernel_for(x) != name
    set_kernel(None)
    assert kernel_for(x) == name
    assert kernel_for(x, per_channel=False) == "dense"  # the sparse kernel has per-channel masks only


def test_a_forced_kernel_runs(monkeypatch):
    x = torch.rand(4, 8, 12, 12) + 0.5
    calls = []
    dense_mask = _dispatch.DENSE.mask
    monkeypatch.setattr(_dispatch.DENSE, "mask", lambda *a, **k: calls.append(1) or dense_mask(*a, **k))
    set_kernel("dense")
    y = DropBlock2d(3, 0.7)(x)
    assert calls and (y == 0).any()


def test_unknown_kernel_names_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="set_kernel must name a DropBlock kernel.*but got 'fast'"):
        set_kernel("fast")
    monkeypatch.setenv("DROPBLOCK_INJECT_KERNEL", "cuda")
    with pytest.raises(ValueError, match="DROPBLOCK_INJECT_KERNEL must name a DropBlock kernel.*'cuda'"):
        drop_block2d(torch.ones(1, 1, 5, 5), 0.5, 3)


def test_public_namespace_holds_the_public_api():
    public = {n for n in vars(ops) if not n.startswith("_")}
    modules = {n for n, v in vars(ops).items() if type(v) is type(os)}
    assert set(ops.__all__) == public - modules
    assert set(ops.__all__) == {"DropBlock2d", "DropBlock3d", "drop_block2d", "drop_block3d", "kernel_for",
                                "seed_rate", "set_kernel"}
    assert not {n for n in vars(ops) if n.startswith("_") and not n.startswith("__")} - modules


def test_building_the_interpreted_kernels_writes_no_environment_variable():
    pytest.importorskip("triton")
    from dropblock_inject.ops import _triton_kernels

    written = []

    class Watched(dict):
        def __setitem__(self, key, value):
            written.append(key)

        def __delitem__(self, key):
            written.append(key)

    environ = os.environ
    os.environ = Watched(environ)
    try:
        ks = _triton_kernels.kernels.__wrapped__(interpret=True)
    finally:
        os.environ = environ
    assert not written and type(ks.apply).__name__ == "InterpretedFunction"


def test_tracing_the_mask_op_leaves_inductors_configuration_alone():
    from torch._inductor import config
    from torch._subclasses.fake_tensor import FakeTensorMode

    with config.patch(post_grad_custom_pre_pass=None), FakeTensorMode():
        torch.ops.dropblock_inject.drop_block_mask.default([2, 3, 8, 8], [192, 64, 8, 1], torch.float32,
                                                           torch.device("cpu"), torch.tensor(0.9), 3, True, True)
        assert config.post_grad_custom_pre_pass is None


def test_compiling_installs_the_pass_unless_opted_out(monkeypatch):
    from torch._inductor import config

    from dropblock_inject.ops._hoist import _holds_hoist

    with config.patch(post_grad_custom_pre_pass=None):
        monkeypatch.setenv("DROPBLOCK_INJECT_INDUCTOR_PASS", "0")
        torch._dynamo.reset()
        torch.compile(DropBlock2d(3, 0.9), backend="aot_eager", fullgraph=True)(torch.ones(2, 3, 8, 8))
        assert config.post_grad_custom_pre_pass is None
        monkeypatch.delenv("DROPBLOCK_INJECT_INDUCTOR_PASS")
        torch._dynamo.reset()
        torch.compile(DropBlock2d(3, 0.9), backend="aot_eager", fullgraph=True)(torch.ones(2, 3, 8, 8))
        assert _holds_hoist(config.post_grad_custom_pre_pass)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------
# the Triton kernel's first-call check, under the interpreter (a forced Triton kernel on CPU tensors)


@pytest.fixture
def triton_forced():
    pytest.importorskip("triton")
    set_kernel("triton")


@pytest.mark.parametrize("per_channel", [True, False])
def test_a_sound_triton_kernel_passes_its_check_silently(triton_forced, per_channel):
    x = torch.rand(2, 4, 10, 10) + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel_for(x, per_channel=per_channel) == "triton"
        y = drop_block2d(x, 0.7, 3, per_channel=per_channel)
    assert y.shape == x.shape


def _raises(*args, **kwargs):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.mark.parametrize("target, broken, message", [
    ("_launch_apply", lambda ks, x, keep, scale, per_channel: x.clone(), "is not numel / kept"),
    ("_launch_apply", _raises, "RuntimeError: CUDA error: an illegal memory access"),
    ("_keep_map", lambda *a, **k: _raises(), "RuntimeError: CUDA error"),
])
def test_a_failing_triton_kernel_warns_once_then_the_dense_kernel_runs(triton_forced, monkeypatch, target, broken,
                                                                       message):
    from dropblock_inject.ops import _triton

    monkeypatch.setattr(_triton, target, broken)
    x = torch.rand(2, 4, 10, 10) + 0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(3)
        first = DropBlock2d(3, 0.7)(x)
        second = drop_block2d(x, 0.7, 3)
        assert kernel_for(x) == "dense"
    checks = [w for w in caught if "first-call check" in str(w.message)]
    assert len(checks) == 1 and issubclass(checks[0].category, RuntimeWarning)
    assert message in str(checks[0].message) and "dense kernel runs instead" in str(checks[0].message)
    assert (first == 0).any() and (second == 0).any()
    set_kernel("dense")
    torch.manual_seed(3)
    assert torch.equal(DropBlock2d(3, 0.7)(x), first)  # the dense kernel's numbers, the same draws


def test_the_check_leaves_the_random_state_alone(triton_forced):
    torch.manual_seed(0)
    assert kernel_for(torch.ones(2, 3, 8, 8)) == "triton"  # runs the check
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)
