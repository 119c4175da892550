"""Placement decided from the recorded dataflow: properties of the plan on models users train (built offline
with random weights), not counts alone."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from torch import nn

import dropblock_inject as dbi

torchvision = pytest.importorskip("torchvision")


def _plan(model: nn.Module, recipe="paper_generic", x=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small maps at the test's input size
        return dbi.plan(model, recipe, example_input=x)


@pytest.fixture
def yolo(monkeypatch, tmp_path):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))  # its settings file, written at import
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    return lambda cfg: tasks.DetectionModel(cfg, verbose=False)


def _index(point) -> int:
    return int(point.module.split(".")[1])


# -- backbone only, no attention, live maps only ---------------------------------------------------------

def test_yolov8n_points_only_in_its_backbone(yolo):
    points = _plan(yolo("yolov8n.yaml"), x=torch.zeros(1, 3, 256, 256))
    # the backbone is model.0-9; the PAN neck (model.10-21) and the Detect head (model.22) get none
    assert points and max(map(_index, points)) <= 9
    assert {_index(p) for p in points} >= {6, 8}


def test_yolo11n_no_point_in_neck_head_or_attention(yolo):
    model = yolo("yolo11n.yaml")
    points = _plan(model, x=torch.zeros(1, 3, 256, 256))
    assert points and max(map(_index, points)) <= 10
    # C2PSA (model.10): its feed-forward convs may get points, its attention's qkv / pe / proj never
    assert not [p for p in points if ".attn" in p.module or p.after in ("qkv", "pe", "proj")]
    assert any(p.module == "model.10.m.0" and p.after.startswith("ffn") for p in points)


def test_pspnet_dead_encoder_stages_get_no_point():
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.PSPNet(encoder_name="mobilenet_v2", encoder_weights=None)  # depth 3: stages 7-18 thrown away
    x = torch.zeros(1, 3, 64, 64)
    # its live encoder ends at stride 8: no stride-16/32 stage, said so, never a DropBlock on a dead stage
    with pytest.raises(dbi.RecipeError, match=r"largest stride found is 8 \(in 'encoder\.features\.[0-6]\."):
        _plan(model, x=x)  # the stage it names is one whose maps reach the outputs
    ran = set()
    hooks = [model.encoder.features[i].register_forward_hook(lambda *_, i=i: ran.add(i)) for i in range(19)]
    with torch.no_grad():
        model.eval()(x[:0])
    for h in hooks:
        h.remove()
    dead = ran - set(range(7))
    assert dead  # stages that run and whose output is thrown away
    points = _plan(model, {"rules": [{"modules": ["encoder.features.*"], "after": ["unit"], "shortcut": True}]}, x)
    stages = {int(p.module.split(".")[2]) for p in points}
    assert set(range(1, 7)) <= stages and not stages & dead


def test_dla34_features_only_gets_the_classifier_block_points():
    timm = pytest.importorskip("timm")
    x = torch.zeros(1, 3, 128, 128)
    key = lambda p: (p.module, p.after, p.kind)  # noqa: E731
    features = {key(p) for p in _plan(timm.create_model("dla34", features_only=True, pretrained=False), x=x)}
    classifier = {key(p) for p in _plan(timm.create_model("dla34", pretrained=False), x=x)}
    assert len(classifier) == 23 and features == classifier


# -- norms by behaviour -----------------------------------------------------------------------------------

def _detr():
    pytest.importorskip("transformers")
    from tools.coverage.zoo_detect import hf_detr

    return hf_detr("detr")


def test_detr_branch_points_after_its_frozen_norms_and_none_in_series():
    model = _detr()
    points = _plan(model, x=torch.zeros(1, 3, 128, 128))
    branch = [p for p in points if p.kind == "branch"]
    assert branch and len(points) - len(branch) == 2  # one shortcut point per stride-16/32 block
    modules = dict(model.named_modules())
    # every branch point follows its conv-norm pair's norm (a class no registry names), never the conv
    for p in branch:
        assert type(modules[f"{p.module}.{p.after}"]).__name__ == "DetrFrozenBatchNorm2d", p
    # the projection shortcut's output has its one shortcut point, not a second branch point in series
    shortcuts = {f"{p.module}.{p.after}" for p in points if p.kind == "shortcut"}
    assert not [p for p in branch if p.module in shortcuts]


def test_resnet50_paper_placement_unchanged():
    for recipe in ("resnet50_paper", "paper_generic"):
        points = _plan(torchvision.models.resnet50(), recipe)
        assert len(points) == 36 and sum(p.kind == "branch" for p in points) == 27, recipe
        assert {p.module.split(".")[0] for p in points} == {"layer3", "layer4"}


@pytest.mark.slow
def test_inject_time():
    model = torchvision.models.resnet50()
    start = time.perf_counter()
    dbi.inject(model, "paper_generic")
    assert time.perf_counter() - start < 0.5


# -- residuals by dataflow --------------------------------------------------------------------------------

def _cbr(cin: int, c: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())


class _ChainedStage(nn.Module):
    """A transition, then residual blocks chained in one forward: ``for blk in blocks: x = x + blk(x)``."""

    def __init__(self, cin: int, c: int) -> None:
        super().__init__()
        self.down = _cbr(cin, c, 2)
        self.blocks = nn.ModuleList(nn.Sequential(_cbr(c, c), nn.Conv2d(c, c, 3, 1, 1, bias=False),
                                                  nn.BatchNorm2d(c)) for _ in range(3))

    def forward(self, x):
        x = self.down(x)
        for blk in self.blocks:
            x = x + blk(x)
        return x


class _RepBlock(nn.Module):
    """A re-parameterisable block: the sum of a 3x3 and a 1x1 conv branch, no skip path."""

    def __init__(self, cin: int, c: int, stride: int) -> None:
        super().__init__()
        self.conv3, self.bn3 = nn.Conv2d(cin, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)))


def _net(stage, channels: int = 3) -> nn.Sequential:
    return nn.Sequential(_cbr(channels, 8, 2), stage(8, 16), stage(16, 32), stage(32, 64), stage(64, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def test_chained_residual_additions_get_their_shortcut_points():
    points = _plan(_net(_ChainedStage), x=torch.zeros(1, 3, 64, 64))
    shortcut = [p for p in points if p.kind == "shortcut"]
    # stages 3 and 4 (strides 16 and 32): each of their three chained additions has its shortcut point
    assert sorted(p.module for p in shortcut) == ["3"] * 3 + ["4"] * 3
    assert len({p.after for p in shortcut if p.module == "3"}) == 3
    # and the transition's conv-norm unit and each block's two conv-norm units their branch points
    assert sum(p.kind == "branch" and p.module == "4" for p in points) == 7


def test_a_sum_of_two_conv_branches_has_no_shortcut():
    points = _plan(_net(lambda cin, c: _RepBlock(cin, c, 2)), x=torch.zeros(1, 3, 64, 64))
    assert points and not [p for p in points if p.kind == "shortcut"]


# -- not a CNN, and plan and inject agree -----------------------------------------------------------------

class _ConvStemTransformer(nn.Module):
    """A conv stem to stride 32, a transformer on its tokens, then a residual conv decoder at stride 16."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 4, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 8, 1))
        self.encoder = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True)
        self.up = nn.ConvTranspose2d(32, 16, 2, 2)
        self.dec = _RepBlock(16, 16, 1)

    def forward(self, x):
        y = self.stem(x)
        n, c, h, w = y.shape
        t = self.encoder(y.flatten(2).transpose(1, 2))
        z = self.up(t.transpose(1, 2).reshape(n, c, h, w))
        return z + self.dec(z)


def test_a_transformer_with_a_conv_stem_and_decoder_is_told_it_is_not_a_cnn():
    model = _ConvStemTransformer().eval()
    x = torch.zeros(1, 3, 128, 128)
    for call in (dbi.plan, dbi.inject):  # both refuse, with the reason and what to write instead
        with pytest.raises(dbi.RecipeError, match=r"not a CNN.*stride 16 or 32.*attention.*modules: \[\.\.\.\]"):
            call(model, "paper_generic", example_input=x)
    assert not dbi.injected_dropblocks(model)
    # naming modules by path still places DropBlock where asked
    assert _plan(model, {"rules": [{"modules": ["dec"], "after": ["unit"]}]}, x)


def test_plan_lists_exactly_what_inject_installs():
    """Both run the same plan phase: a model that does not take the default example input (one channel) and
    a recipe that names modules give the same points from plan and inject, neither refusing."""
    recipe = {"rules": [{"modules": ["3", "4"], "after": ["unit"], "shortcut": True}]}
    model = _net(_ChainedStage, channels=1)
    planned = [(p.module, p.after, p.kind) for p in _plan(model, recipe)]
    dbi.inject(model, recipe)
    installed = [(d.point.module, d.point.after, d.point.kind) for d in dbi.injected_dropblocks(model)]
    assert planned and sorted(installed) == sorted(planned)


# -- real stride ------------------------------------------------------------------------------------------

def test_a_dilated_attention_gate_is_no_stride_16_or_32_stage():
    """pytorchcv's BAM-ResNet50 computes a spatial attention gate with dilated convs after stages 1-3: at
    strides 4 and 8 they are no stride-16/32 maps, whatever their dilation."""
    model_provider = pytest.importorskip("pytorchcv.model_provider")
    model = model_provider.get_model("bam_resnet50", pretrained=False)
    points = _plan(model, x=torch.zeros(1, 3, 224, 224))  # (its classifier pools a fixed 7x7)
    assert points and all(p.shape[-1] <= 224 // 16 for p in points)
    assert not [p for p in points if p.module.split(".")[1] in ("stage1", "stage2")]
