"""Placement on segmenters (issue 15): dilated backbones count as groups 3 and 4, and no DropBlock on
predictions, adaptively pooled maps or single-channel maps, whatever the recipe."""

import warnings

import pytest
import torch
from _models import SegNet, counts
from torch import nn
from torchvision.models import segmentation

import dropblock_inject as dbi

X = torch.randn(1, 3, 224, 224)


@pytest.mark.parametrize("name", ["deeplabv3_resnet50", "fcn_resnet50"])
def test_dilated_resnet_stages_are_groups_3_and_4(name):
    """layer3/layer4 trade their stride for dilation (output stride 8): still the paper's 27 + 9 points there,
    none in the head."""
    model = getattr(segmentation, name)(weights=None, weights_backbone=None).eval()
    points = dbi.plan(model, "paper_generic", example_input=X)
    assert counts(points) == (27, 9)
    assert {p.module.rsplit(".", 1)[0] for p in points} == {"backbone.layer3", "backbone.layer4"}
    assert {p.shape[-1] for p in points} == {28}  # stride 8 maps


@pytest.mark.parametrize("name", ["deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"])
def test_mobilenet_segmenters_never_on_the_head(name):
    model = getattr(segmentation, name)(weights=None, weights_backbone=None).eval()
    points = dbi.plan(model, "paper_generic", example_input=X)
    assert points and all(p.module.startswith("backbone") for p in points)


def test_prediction_named_explicitly_is_an_error():
    model = segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    with pytest.raises(dbi.RecipeError, match=r"prediction \(it reaches the model output with no further layer"):
        dbi.plan(model, {"rules": [{"modules": ["classifier.4"], "after": ["conv"]}]}, example_input=X)


@pytest.mark.parametrize("module, reason", [("classifier", "prediction"), ("pool_bn", "adaptively pooled map"),
                                            ("attn", "single-channel map")])
def test_never_on_predictions_pooled_or_one_channel_maps(module, reason):
    model = SegNet().eval()
    points = dbi.plan(model, {"rules": [{"after": ["any"]}]})  # every layer of every scope
    assert {p.after for p in points} == {"stem", "body_0", "body_1", "body_2"}
    with pytest.raises(dbi.RecipeError, match=reason):
        dbi.plan(model, {"rules": [{"modules": [module], "after": ["any"]}]})


def test_dilated_stage_rule_of_named_recipe():
    model = segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None).eval()
    points = dbi.plan(model, "deeplabv3_resnet")
    assert counts(points) == (27, 9)
    model = segmentation.fcn_resnet50(weights=None, weights_backbone=None).eval()
    assert counts(dbi.plan(model, "deeplabv3_resnet")) == (27, 9)


def test_no_stride_16_stage_names_the_largest_stride():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    with pytest.raises(dbi.RecipeError, match=r"largest stride found is 4 .*modules:"):
        dbi.plan(model, "paper_generic")


def test_smp_efficientnet_encoder_gets_shortcut_points():
    """efficientnet_pytorch's MBConvBlock branches on its float ``drop_connect_rate`` argument: traced with the
    value of the example forward, its blocks get their shortcut points instead of being skipped."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.Unet("efficientnet-b0", encoder_weights=None, classes=2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no block left without DropBlock
        points = dbi.plan(model, "paper_generic", example_input=torch.randn(1, 3, 64, 64))
    shortcut = {p.module for p in points if p.kind == "shortcut"}
    assert len(shortcut) >= 5 and all(m.startswith("encoder._blocks.") for m in shortcut)
    dbi.inject(model, "paper_generic", example_input=torch.randn(1, 3, 64, 64))
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the injected forward, not the original one
        warnings.filterwarnings("ignore", message=".*covers the whole")  # 64 px: group 4's maps are 2x2
        model(torch.randn(2, 3, 64, 64)).mean().backward()
