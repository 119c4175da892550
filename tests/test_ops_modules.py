"""The modules' own behaviour: a warning, once per module and in eager mode only, when the block covers the
whole feature map (so every block drops whole channels), naming a block size that would fit."""

from __future__ import annotations

import warnings

import pytest
import torch

from dropblock_inject import DropBlock2d, DropBlock3d


def _warnings(module, x, calls=2):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(calls):
            module(x)
    return [str(w.message) for w in caught if "covers the whole" in str(w.message)]


def test_a_block_covering_the_map_warns_once_naming_a_size_that_fits():
    got = _warnings(DropBlock2d(7, 0.9), torch.ones(2, 3, 4, 4))
    assert got == ["DropBlock2d: block_size 7 covers the whole 4x4 map: every block drops whole channels; "
                   "use block_size <= 3 at this resolution"]
    got = _warnings(DropBlock3d(5, 0.9), torch.ones(1, 2, 2, 5, 3))
    assert len(got) == 1 and "covers the whole 2x5x3 map" in got[0] and "block_size <= 4" in got[0]


@pytest.mark.parametrize("build, shape", [
    (lambda: DropBlock2d(7, 0.9), (2, 3, 8, 4)),   # fits along one axis: blocks at several places
    (lambda: DropBlock2d(7, 0.9), (2, 3, 7, 7)),   # the paper's own group 4 at 224 px: a block the map's size
    (lambda: DropBlock2d(7, 1.0), (2, 3, 4, 4)),   # keep_prob 1: nothing is dropped
    (lambda: DropBlock2d(7, 0.9).eval(), (2, 3, 4, 4)),
])
def test_no_warning_where_blocks_fit_or_nothing_drops(build, shape):
    assert _warnings(build(), torch.ones(shape)) == []


def test_no_warning_and_no_graph_break_under_compile():
    torch._dynamo.reset()
    compiled = torch.compile(DropBlock2d(7, 0.9), backend="aot_eager", fullgraph=True)
    assert _warnings(compiled, torch.ones(2, 3, 4, 4)) == []
    torch._dynamo.reset()
