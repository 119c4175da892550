"""Stage 5, selection (``surgery.s22_select``): recipes on real models, plans, strides."""


import pytest
import timm
import torch
import torchvision
from _models import X, counts, same_state, state_copy

import dropblock_inject as dbi
from dropblock_inject.ops._modules import _DropBlockNd

RESNETS = {
    "tv_resnet18": (lambda: torchvision.models.resnet18(), (8, 4)),
    "tv_resnet50": (lambda: torchvision.models.resnet50(), (27, 9)),
    "tv_resnet101": (lambda: torchvision.models.resnet101(), (78, 26)),
    "tv_resnext50": (lambda: torchvision.models.resnext50_32x4d(), (27, 9)),
    "tv_wide_resnet50_2": (lambda: torchvision.models.wide_resnet50_2(), (27, 9)),
    "timm_resnet50": (lambda: timm.create_model("resnet50", pretrained=False), (27, 9)),
    "timm_seresnet50": (lambda: timm.create_model("seresnet50", pretrained=False), (27, 9)),
}

HEAVY = {"tv_resnet101", "tv_resnext50", "tv_wide_resnet50_2"}  # the same placement, more blocks: slow only


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in RESNETS])
def test_paper_recipe_on_resnet_family(name):
    ctor, expected = RESNETS[name]
    model = ctor().eval()
    ref = model(X)
    state = state_copy(model)
    params = [id(p) for p in model.parameters()]
    attrs = {name: sorted(m.__dict__) for name, m in model.named_modules()}
    points = dbi.plan(model, "resnet50_paper")
    assert counts(points) == expected
    assert all(p.module.split(".")[0] in ("layer3", "layer4") for p in points)
    assert {round(p.keep_prob, 6) for p in points if p.module.startswith("layer4")} == {0.9}
    assert {round(p.keep_prob, 6) for p in points if p.module.startswith("layer3")} == {0.975}
    assert all(p.block_size == 7 for p in points)
    out = dbi.inject(model, "resnet50_paper")
    assert out is model and type(model) is type(ctor())
    assert len(dbi.injected_dropblocks(model)) == sum(expected)
    assert [id(p) for p in model.parameters()] == params
    assert same_state(model, state)
    assert torch.equal(model(X), ref)
    dbi.strip(model)
    assert not any(isinstance(m, _DropBlockNd) for m in model.modules())
    assert {name: sorted(m.__dict__) for name, m in model.named_modules()} == attrs  # no attribute left over
    assert same_state(model, state)
    assert torch.equal(model(X), ref)


def test_resnet50_exact_paper_placement():
    model = torchvision.models.resnet50()
    points = dbi.plan(model, "resnet50_paper")
    first = [(p.after, p.kind) for p in points if p.module == "layer3.0"]
    assert first == [("bn1", "branch"), ("bn2", "branch"), ("bn3", "branch"), ("downsample_1", "shortcut")]
    assert [(p.after, p.kind) for p in points if p.module == "layer4.2"][-1] == ("x", "shortcut")
    assert points[0].shape == (1, 256, 28, 28)  # stride 8 in the first block of group 3, before it downsamples
    text = dbi.format_plan(points)
    assert "36 DropBlocks: 27 branch, 9 shortcut, in 9 modules" in text


@pytest.mark.parametrize("ctor, expected", [
    (lambda: torchvision.models.vgg11_bn(), (2, 0)),
    (lambda: torchvision.models.densenet121(), (81, 0)),
    (lambda: torchvision.models.resnet50(), (27, 9)),
], ids=["vgg11_bn", "densenet121", "resnet50"])
def test_paper_generic(ctor, expected):
    model = ctor().eval()
    ref = model(X)
    points = dbi.plan(model, "paper_generic")
    assert counts(points) == expected
    assert all(p.shape is not None and len(p.shape) == 4 and p.shape[-1] in (28, 14, 7) for p in points)
    dbi.inject(model, "paper_generic")
    assert torch.equal(model(X), ref)


def test_se_maps_never_selected():
    model = timm.create_model("seresnet50", pretrained=False)
    points = dbi.plan(model, {"rules": [{"modules": ["**"], "after": ["any"], "stride": [16, 32]}]})
    assert points and all(p.shape[-1] > 1 for p in points)
    assert not any(".se" in p.module for p in points)


def test_format_plan_singular():
    points = dbi.plan(torchvision.models.resnet18(), {"rules": [{"modules": ["layer4.1"], "after": [], "shortcut": True}]})
    assert dbi.format_plan(points).splitlines()[-1] == "1 DropBlock: 0 branch, 1 shortcut, in 1 module"


def test_vision_transformer_is_not_a_cnn():
    with pytest.raises(dbi.RecipeError, match="VisionTransformer is not a CNN: it has 1 convolution"):
        dbi.plan(torchvision.models.vit_b_16(), "paper_generic")


def test_module_path_typo_names_the_closest_paths():
    with pytest.raises(dbi.RecipeError, match=r"no module path matches \['layer33.\*'\]; the closest existing "
                                              r"paths are \['layer3'"):
        dbi.plan(torchvision.models.resnet18(), {"rules": [{"modules": ["layer33.*"]}]})


def test_input_too_small_says_why_and_small_plans_warn():
    model = torchvision.models.resnet50()
    with pytest.raises(dbi.RecipeError, match="1x1 from stride 8 on: the example input 1x3x8x8 is too small"):
        dbi.plan(model, "paper_generic", example_input=torch.randn(1, 3, 8, 8))
    with pytest.warns(UserWarning, match="dropped because their maps are 1x1 at this input size"):
        points = dbi.plan(model, "paper_generic", example_input=torch.randn(1, 3, 32, 32))
    assert 0 < len(points) < 36


def test_residual_wrappers_get_their_shortcut():
    from _models import ConvBlock, Residual, WrappedNet

    model = WrappedNet().eval()
    points = dbi.plan(model, "paper_generic", example_input=torch.randn(1, 3, 64, 64))
    assert [(p.module, p.after) for p in points if p.kind == "shortcut"] == [("blocks.0", "x"), ("blocks.1", "x")]
    points = dbi.plan(model, {"rules": [{"types": ["Residual"], "after": [], "shortcut": True}]})
    assert [(p.module, p.after, p.kind) for p in points] == [("blocks.0", "x", "shortcut"), ("blocks.1", "x", "shortcut")]
    assert Residual and ConvBlock


def test_functional_convolutions_count():
    from _models import FunctionalConvBlock
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 1), FunctionalConvBlock()).eval()
    points = dbi.plan(model, {"rules": [{"modules": ["1"], "after": ["norm"], "shortcut": True}]})
    assert [(p.after, p.kind) for p in points] == [("bn1", "branch"), ("bn2", "branch"), ("x", "shortcut")]
    points = dbi.plan(model, {"rules": [{"modules": ["1"], "after": ["conv"]}]})
    assert [p.after for p in points] == ["conv2d", "conv2d_1"]


@pytest.mark.parametrize("name, expected", [
    ("skresnext50_32x4d", (27, 9)), ("skresnet18", (8, 4)), ("resnest26d", (12, 4)), ("ecaresnet26t", (12, 4)),
    ("resnetaa50d", (27, 9)), ("seresnext26d_32x4d", (12, 4)), ("resnet26d", (12, 4)), ("resnext26ts", None)])
def test_resnet_recipe_on_timm_fused_units(name, expected):
    """``after: [norm]`` places a point after each conv-norm unit and each SelectiveKernel / SplitAttn step."""
    model = timm.create_model(name, pretrained=False)
    if expected is None:  # byobnet: stages.*, not layer*
        with pytest.raises(dbi.RecipeError, match="top-level modules are .*stages"):
            dbi.plan(model, "resnet_paper")
        return
    points = dbi.plan(model, "resnet_paper")
    assert counts(points) == expected
    blocks = {p.module for p in points}
    assert all(sum(q.module == b and q.kind == "branch" for q in points) == expected[0] // len(blocks) for b in blocks)


@pytest.mark.parametrize("name", ["ghostnet_100", "repghostnet_050"])
def test_blocks_made_of_conv_modules_get_their_shortcut(name):
    """A GhostBottleneck calls only GhostModules (no layer of its own): it is still tried for its residual
    addition, so its identity shortcut gets a point (previously only wrappers of one or two children were)."""
    model = timm.create_model(name).eval()
    points = dbi.plan(model, "paper_generic", example_input=torch.randn(1, 3, 64, 64))
    shortcut = {p.module for p in points if p.kind == "shortcut"}
    assert {"blocks.6.1", "blocks.6.2", "blocks.8.1"} <= shortcut and len(shortcut) == 11
