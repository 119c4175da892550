"""Arguments are checked where the module or the function is built or called: one clear error naming the
argument and quoting its value, before anything runs (and before a graph could fail on it)."""

from __future__ import annotations

import math

import pytest
import torch

from dropblock_inject import DropBlock2d, DropBlock3d, drop_block2d, drop_block3d

X2, X3 = torch.ones(1, 2, 6, 6), torch.ones(1, 2, 3, 6, 6)


@pytest.mark.parametrize("block_size", [0, -3, 2**31, 2**63, 10**30])
@pytest.mark.parametrize("build", [lambda b: DropBlock2d(b, 0.9), lambda b: DropBlock3d(b, 0.9),
                                   lambda b: drop_block2d(X2, 0.9, b), lambda b: drop_block3d(X3, 0.9, b)])
def test_block_size_out_of_range_is_a_value_error_naming_it(build, block_size):
    with pytest.raises(ValueError, match=rf"block_size must be in \[1, 2\*\*31\), but got {str(block_size)[:50]}"):
        build(block_size)


def test_block_size_at_the_bound_is_accepted():
    assert DropBlock2d(2**31 - 1, 0.9).block_size == 2**31 - 1
    assert drop_block2d(X2, 0.9, 2**31 - 1).shape == X2.shape


@pytest.mark.parametrize("block_size", [3.0, "7", True, None])
def test_block_size_of_another_type_is_a_type_error(block_size):
    with pytest.raises(TypeError, match="block_size must be an int"):
        DropBlock2d(block_size, 0.9)
    with pytest.raises(TypeError, match="block_size must be an int"):
        drop_block2d(X2, 0.9, block_size)


@pytest.mark.parametrize("keep_prob", [math.nan, math.inf, -math.inf, -0.1, 1.5])
def test_keep_prob_not_finite_in_0_1_is_a_value_error(keep_prob):
    for call in (lambda: DropBlock2d(3, keep_prob), lambda: drop_block2d(X2, keep_prob, 3),
                 lambda: setattr(DropBlock2d(3, 0.9), "keep_prob", keep_prob)):
        with pytest.raises(ValueError, match=rf"keep_prob must be a finite number in \[0, 1\], but got {keep_prob}"):
            call()


@pytest.mark.parametrize("name", ["per_channel", "scale", "inplace"])
@pytest.mark.parametrize("value", ["false", 0, 1, None])
def test_flags_must_be_bools(name, value):
    with pytest.raises(TypeError, match=rf"{name} must be a bool, but got {value!r}"):
        DropBlock2d(3, 0.9, **{name: value})
    with pytest.raises(TypeError, match=rf"{name} must be a bool, but got {value!r}"):
        drop_block2d(X2, 0.9, 3, **{name: value})
    with pytest.raises(TypeError, match=rf"{name} must be a bool, but got {value!r}"):
        drop_block3d(X3, 0.9, 3, **{name: value})


def test_training_must_be_a_bool():
    with pytest.raises(TypeError, match="training must be a bool, but got 'yes'"):
        drop_block2d(X2, 0.9, 3, training="yes")


def test_a_long_value_is_quoted_briefly():
    with pytest.raises(TypeError) as info:
        DropBlock2d("x" * 10_000, 0.9)
    assert len(str(info.value)) < 150
