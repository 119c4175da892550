"""Stage 5, selection (``surgery.select``): recipes on real models, plans, strides."""


import pytest
import timm
import torch
import torchvision
from _models import X, counts, same_state, state_copy

import dropblock_inject as dbi
from dropblock_inject.ops import _DropBlockNd

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
