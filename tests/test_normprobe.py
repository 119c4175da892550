"""Norms by behaviour: per-channel affine maps with statistics held in buffers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dropblock_inject.surgery.s14_normprobe import is_stat_norm


class _Frozen(nn.Module):
    """A frozen BatchNorm of the kind libraries write (any class name)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        for name, value in (("weight", torch.rand(c) + 0.5), ("bias", torch.randn(c)),
                            ("running_mean", torch.randn(c)), ("running_var", torch.rand(c) + 0.5)):
            self.register_buffer(name, value)

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.reshape(shape) + (self.bias - self.running_mean * scale).reshape(shape)


class _BufferedNonAffine(_Frozen):
    def forward(self, x):
        return torch.relu(super().forward(x))


def test_frozen_and_running_stat_norms_are_norms_whatever_their_class():
    ops = pytest.importorskip("torchvision.ops")
    bn = nn.BatchNorm2d(6).train()
    bn.running_mean.normal_()
    assert is_stat_norm(_Frozen(6)) and is_stat_norm(ops.FrozenBatchNorm2d(6)) and is_stat_norm(bn)
    assert is_stat_norm(nn.BatchNorm3d(4)) and bn.training  # flag restored


def test_modules_that_are_no_stat_norm():
    depthwise = nn.Conv2d(6, 6, 1, groups=6)  # per-channel affine, but learned parameters, no statistics
    assert not is_stat_norm(depthwise)
    assert not is_stat_norm(nn.GroupNorm(2, 6))  # statistics of the input itself
    assert not is_stat_norm(nn.BatchNorm2d(6, track_running_stats=False))
    assert not is_stat_norm(_BufferedNonAffine(6))


def test_probe_changes_no_buffer_and_draws_no_random_number():
    bn = nn.BatchNorm2d(3, momentum=None)
    bn.train()
    before = [b.clone() for b in bn.buffers()]
    state = torch.get_rng_state()
    assert is_stat_norm(bn)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(before, bn.buffers()))
