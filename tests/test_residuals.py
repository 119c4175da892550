"""Residual additions by dataflow: chained, after a transition, the skip second, projections, and the sum
of re-parameterisable branches (no skip)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dropblock_inject.surgery.s10_dataflow import record
from dropblock_inject.surgery.s16_roles import Roles

torchvision = pytest.importorskip("torchvision")


def _roles(model: nn.Module, x) -> Roles:
    return Roles(record(model, x), model)


class _Chained(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(8, 8, 3, padding=1)) for _ in range(3))
        self.ops = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())

    def forward(self, x):
        x = self.stem(x)
        for blk in self.blocks:
            x = x + blk(x)
        down = F.max_pool2d(x, 2)
        return self.ops(down) + down  # MONAI VNet's order: the skip second


def test_chained_residual_additions_have_their_skip():
    r = _roles(_Chained(), torch.zeros(1, 3, 32, 32))
    adds = r.residual_adds
    assert [(a.scope, a.position, a.skip, a.branch_convs) for a in adds] == [
        ("", 0, 0, (0, 2)), ("", 1, 0, (0, 2)), ("", 2, 0, (0, 2)), ("", 3, 1, (1, 0))]
    # each skip is the previous addition's output: the chain
    for prev, add in zip(adds, adds[1:3]):
        assert add.operands[0] == r.flow.ops[prev.op].outputs[0]


def test_torchvision_projection_shortcut_is_the_skip():
    r = _roles(torchvision.models.resnet50(), torch.zeros(1, 3, 64, 64))
    first = r.adds_in("layer3.0")
    assert len(first) == 1 and first[0].branch_convs == (3, 1) and first[0].skip == 1 and first[0].position == 0
    assert len(r.residual_adds) == 16 and all(a.skip is not None for a in r.residual_adds)


class _RepVGG(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, 2, 1)
        self.dense = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.one = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        x = self.stem(x)
        return torch.relu(self.dense(x) + self.one(x))


def test_reparam_branches_have_no_skip():
    r = _roles(_RepVGG(), torch.zeros(1, 3, 32, 32))
    assert [(a.skip, a.branch_convs) for a in r.residual_adds] == [(None, (1, 1))]


def test_monai_vnet_skips_are_the_transition_outputs_and_the_repeated_input():
    monai = pytest.importorskip("monai")
    model = monai.networks.nets.VNet(spatial_dims=3, in_channels=1, out_channels=2)
    r = _roles(model, torch.zeros(1, 1, 32, 32, 32))
    by_scope = {a.scope: a for a in r.residual_adds}
    # ``torch.add(out, x.repeat(...))``: the repeated input, no layer, is the skip of the conv branch
    assert by_scope["in_tr"].skip == 1 and by_scope["in_tr"].branch_convs == (1, 0)
    # ``ops(down) + down``: the skip is the down-convolution's output, the source of the branch
    for scope in ("down_tr64", "down_tr128", "down_tr256"):
        add = by_scope[scope]
        down = r.flow.calls_of(f"{scope}.act_function1")[0].outputs[0]
        assert add.skip == 1 and add.operands[1] == down and add.branch_convs[0] >= 2
