"""Placement on Hugging Face transformers CNNs built from configs (issue 15): the named ``hf_resnet`` recipe,
fused conv-norm units under ``after: [norm]``, and a segmenter whose heads take several maps."""

import pytest
import torch
from _models import counts

import dropblock_inject as dbi

transformers = pytest.importorskip("transformers")
X = torch.randn(1, 3, 64, 64)


@pytest.mark.parametrize("cls", ["ResNetForImageClassification", "ResNetModel"])
def test_hf_resnet_recipe(cls):
    model = getattr(transformers, cls)(transformers.ResNetConfig()).eval()
    with torch.no_grad():
        ref = model(X)
    points = dbi.plan(model, "hf_resnet")
    assert counts(points) == (27, 9)  # ResNetConvLayer units count as conv then norm for after: [norm]
    assert {round(p.keep_prob, 6) for p in points if ".stages.3." in p.module} == {0.9}
    assert {round(p.keep_prob, 6) for p in points if ".stages.2." in p.module} == {0.975}
    dbi.inject(model, "hf_resnet")
    with torch.no_grad():
        out = model(X)
    key = "logits" if "logits" in ref else "last_hidden_state"
    assert torch.equal(out[key], ref[key])
    dbi.strip(model)
    assert not dbi.injected_dropblocks(model)


def test_upernet_heads_and_pooled_bins_never_selected():
    backbone = transformers.ConvNextConfig(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3],
                                           out_features=["stage1", "stage2", "stage3", "stage4"])
    model = transformers.UperNetForSemanticSegmentation(transformers.UperNetConfig(backbone_config=backbone)).eval()
    points = dbi.plan(model, "paper_generic", example_input=torch.randn(1, 3, 128, 128))
    assert points and all(p.module.startswith("backbone.") for p in points)
    with pytest.raises(dbi.RecipeError, match="adaptively pooled map"):
        dbi.plan(model, {"rules": [{"modules": ["decode_head.psp_modules.*"], "after": ["any"]}]},
                 example_input=torch.randn(1, 3, 128, 128))


def test_mobilenet_v2_with_tf_padding():
    """HF MobileNetV2's conv layers compute TensorFlow padding in Python (``apply_tf_padding``): recorded as one
    call, each layer gets its point after the norm, and each inverted residual with a residual its shortcut."""
    model = transformers.MobileNetV2ForImageClassification(transformers.MobileNetV2Config()).eval()
    assert model.config.tf_padding
    with torch.no_grad():
        ref = model(X).logits
    points = dbi.plan(model, "paper_generic", example_input=X)
    branch, shortcut = counts(points)
    assert branch >= 30 and {p.after for p in points if p.kind == "branch"} == {"normalization"}
    residual = {f"mobilenet_v2.layer.{i}" for i, b in enumerate(model.mobilenet_v2.layer) if b.use_residual}
    assert {p.module for p in points if p.kind == "shortcut"} == {
        m for m in residual if any(p.module.startswith(m + ".") for p in points)}
    assert shortcut >= 5
    dbi.inject(model, "paper_generic", example_input=X)
    with torch.no_grad():
        assert torch.equal(model(X).logits, ref)
