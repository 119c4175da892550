"""The fused CUDA kernel, compiled for real GPUs ahead of time: every launch the op makes compiles to sm_90
and sm_80 machine code (with the ``ptxas`` Triton ships), no GPU needed.

The interpreter tests (``test_ops_triton.py``) run the kernels' arithmetic, but the interpreter is Python: it
runs code the compiler rejects. Calling a plain helper function from a kernel, for one, passes every
interpreter test and fails on a GPU ("Unsupported function referenced"). Here the launchers run on meta
tensors with a recorder in place of the kernels (``tools/_triton_aot.py``), so each launch is compiled with the
arguments, and the 32/64-bit and constant specialisations, that Triton's launcher would give it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # dev tooling, not in the wheel

import _triton_aot  # noqa: E402

CASES = {  # id: (shape, dtype, block_size, per_channel, layout)
    "resnet-group3": ((16, 256, 14, 14), torch.float32, 7, True, "contiguous"),
    "bf16-channels-last": ((16, 1024, 14, 14), torch.bfloat16, 7, True, "channels_last"),
    "fp16-strided-shared": ((8, 64, 28, 28), torch.float16, 5, False, "strided"),
    "whole-map": ((16, 2048, 7, 7), torch.float32, 7, True, "contiguous"),
    "shared-channels-last": ((8, 32, 20, 24), torch.float32, 3, False, "channels_last"),
    "3d": ((2, 8, 6, 12, 12), torch.float32, 3, True, "channels_last"),
    "long-rows": ((2, 4, 3, 3000), torch.float32, 20, True, "contiguous"),  # a row over several tiles
    "2**31-cells": ((1, 44_000_000, 7, 7), torch.bfloat16, 7, True, "contiguous"),  # 64-bit indices
}
FAST = ("resnet-group3", "bf16-channels-last", "fp16-strided-shared", "3d", "2**31-cells")


def distinct(launches):
    """One launch per specialisation (forward and backward share most of theirs)."""
    seen = {}
    for launch in launches:
        _, _, signature, constexprs, attrs = _triton_aot.specialize(launch)
        seen.setdefault((launch.name, repr(signature), repr(constexprs), repr(attrs)), launch)
    return list(seen.values())


@pytest.mark.parametrize("arch", [90, pytest.param(80, marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_every_launch_compiles_for_the_gpu(case, arch):
    shape, dtype, block_size, per_channel, layout = CASES[case]
    launches = _triton_aot.launches(shape, dtype, block_size=block_size, per_channel=per_channel, layout=layout)
    forward, backward = ["seeds", "rows", "mask", "scale", "apply"], ["seeds", "rows", "mask", "apply"]
    assert [launch.name for launch in launches] == forward + backward
    compiled = _triton_aot.launches(shape, dtype, block_size=block_size, per_channel=per_channel, compiled=True)
    assert [launch.name for launch in compiled] == forward[:-1]  # the mask op: no apply
    for launch in distinct(launches + compiled):
        kernel = _triton_aot.compile_launch(launch, arch)
        assert kernel.asm["cubin"], launch.name
        assert "scf.for" not in kernel.asm["ttgir"], f"{launch.name}: a loop left in the program"


def test_wide_maps_get_64_bit_indices_and_others_32():
    small = _triton_aot.launches((16, 256, 14, 14))
    wide = _triton_aot.launches(CASES["2**31-cells"][0], torch.bfloat16)
    assert {launch.kwargs["WIDE"] for launch in small if launch.name != "scale"} == {False}
    assert {launch.kwargs["WIDE"] for launch in wide if launch.name != "scale"} == {True}
    _, _, signature, _, _ = _triton_aot.specialize(wide[4])  # apply: the element count itself is 64-bit
    assert signature["numel"] == "i64"


def test_layouts_choose_the_apply_kernels_path():
    from dropblock_inject.ops import _triton_kernels as k

    paths = {layout: _triton_aot.launches((4, 8, 10, 10), layout=layout)[4].kwargs["LAYOUT"]
             for layout in _triton_aot.LAYOUTS}
    assert paths == {"contiguous": k.CONTIGUOUS, "channels_last": k.CHANNELS_LAST, "strided": k.STRIDED}
    with pytest.raises(ValueError, match="layout must be one of"):
        _triton_aot.launches((4, 8, 10, 10), layout="nhwc")
