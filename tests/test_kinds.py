"""Stage 2, node kinds (``surgery.s07_kinds``): conv-norm units, layers inside units, gates."""

import re

import pytest
import timm
import torch
import torchvision
from _models import BnConv, ConvBnNamed, ConvBnResidual, counts
from torch import nn

import dropblock_inject as dbi


def test_conv_norm_units_recognised_by_their_forward():
    from torchvision.models.inception import BasicConv2d

    from dropblock_inject.surgery.s07_kinds import module_kind as _module_kind

    assert _module_kind(BasicConv2d(8, 8, kernel_size=3)) == "unit"  # conv, bn, functional relu
    assert _module_kind(ConvBnNamed()) == "unit"
    assert _module_kind(ConvBnResidual()) is None
    assert _module_kind(BnConv(8)) is None
    # the residual one is a block of its own: DropBlock after its bn and on its shortcut; a unit is not
    recipe = {"rules": [{"modules": ["1"], "after": ["norm"], "shortcut": True}]}
    points = dbi.plan(nn.Sequential(nn.Conv2d(3, 8, 1), ConvBnResidual()), recipe)
    assert [(p.module, p.after, p.kind) for p in points] == [("1", "bn", "branch"), ("1", "x", "shortcut")]
    with pytest.raises(dbi.RecipeError, match="matches no insertion point"):
        dbi.plan(nn.Sequential(nn.Conv2d(3, 8, 1), ConvBnNamed()), recipe)


@pytest.mark.parametrize("ctor, size, expected", [
    (lambda: torchvision.models.inception_v3(weights=None, init_weights=False), 299, 66),
    pytest.param(lambda: timm.create_model("inception_v3", pretrained=False), 299, 66, marks=pytest.mark.slow),
    (lambda: torchvision.models.googlenet(weights=None, init_weights=False), 96, 42),
], ids=["tv_inception_v3", "timm_inception_v3", "googlenet"])
def test_inception_units_get_one_dropblock_each(ctor, size, expected):
    """Inception's BasicConv2d (torchvision) and ConvNormAct (timm) are units of their Inception block: one
    DropBlock after each, placed in the block, none inside the unit (timm's used to get both)."""
    model = ctor().eval()
    points = dbi.plan(model, "paper_generic", example_input=torch.randn(1, 3, size, size))
    assert len(points) == expected and all(p.kind == "branch" for p in points)
    assert all(re.fullmatch(r"Mixed_[67][a-e]|inception[45][a-e]", p.module) for p in points), points[0]
    assert len({(p.module, p.after) for p in points}) == expected


def test_modules_inside_conv_norm_modules_are_not_rewritten():
    # timm's byobnet blocks are made of ConvNormAct (conv + BatchNormAct2d): DropBlock after each of them
    # in the block, not a second one inside
    model = timm.create_model("resnext26ts", pretrained=False)
    points = dbi.plan(model, "paper_generic", example_input=torch.randn(1, 3, 64, 64))
    assert counts(points) == (12, 4)
    assert {p.module for p in points} == {"stages.2.0", "stages.2.1", "stages.3.0", "stages.3.1"}


def test_attention_logits_never_selected():
    # timm's GlobalContext: conv_attn gives one-channel logits that go through a softmax and a matmul
    model = timm.create_model("gcresnet33ts", pretrained=False)
    points = dbi.plan(model, "paper_generic", example_input=torch.randn(1, 3, 64, 64))
    assert points and not any(".attn" in p.module for p in points)
    assert all(p.shape[1] > 1 for p in points)


def test_parallel_convolutions_over_channel_groups_are_one_conv():
    """timm's MixedConv2d (a ModuleDict of convs with its own forward) is one conv: the norms after it are
    branch points, so MixNet's residual blocks get branch points beside their shortcut points."""
    from timm.layers import MixedConv2d

    from dropblock_inject.surgery.s07_kinds import module_kind

    assert module_kind(MixedConv2d(16, 16, kernel_size=[3, 5])) == "conv"
    assert module_kind(nn.ModuleList([nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)])) is None  # a plain container
    points = dbi.plan(timm.create_model("mixnet_s"), "paper_generic", example_input=torch.rand(1, 3, 224, 224))
    shortcut_blocks = {p.module for p in points if p.kind == "shortcut"}
    branch_blocks = {p.module for p in points if p.kind == "branch"}
    assert shortcut_blocks and shortcut_blocks <= branch_blocks, shortcut_blocks - branch_blocks
    assert {p.after for p in points if p.module == "blocks.4.1"} >= {"bn1", "bn2", "bn3"}
