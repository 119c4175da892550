"""Placement facts derived from the recorded dataflow, on third-party models built offline with random
weights and on hand-written blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _models import ConvStemTransformer

from dropblock_inject.surgery.s10_dataflow import record
from dropblock_inject.surgery.s16_roles import Roles

torchvision = pytest.importorskip("torchvision")


def _roles(model: nn.Module, x) -> Roles:
    return Roles(record(model, x), model)


# -- backbone vs neck and head -----------------------------------------------------------------------

def test_yolov8n_pan_neck_and_head_are_not_backbone(yolo_net):
    model = yolo_net("yolov8n.yaml").eval()
    r = _roles(model, torch.zeros(1, 3, 256, 256))
    assert r.flow.how == "meta"
    with torch.no_grad():
        model(torch.zeros(1, 3, 256, 256))  # its head cached no meta anchors
    assert all(r.is_backbone(f"model.{i}") for i in range(10))
    assert not any(r.is_backbone(f"model.{i}") for i in range(10, 23))
    assert [r.stride(f"model.{i}") for i in (5, 6, 7, 8)] == [16, 16, 32, 32]
    assert r.not_a_cnn is None


def test_fpn_convs_are_not_backbone():
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=128, max_size=128,
        rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)
    r = _roles(model, [torch.zeros(3, 128, 128)])
    assert r.is_backbone("backbone.body.layer3") and r.is_backbone("backbone.body.layer4")
    # the deepest lateral and output convs run before the FPN's first upsampling: still not backbone
    fpn = [p for p, m in model.backbone.fpn.named_modules(prefix="backbone.fpn") if isinstance(m, nn.Conv2d)]
    assert len(fpn) == 8 and not any(r.is_backbone(p) for p in fpn)
    assert not r.is_backbone("rpn.head.conv")


def test_feature_extractor_levels_are_all_backbone():
    timm = pytest.importorskip("timm")
    model = timm.create_model("dla34", features_only=True, pretrained=False)
    r = _roles(model, torch.zeros(1, 3, 128, 128))
    # its blocks are passed their shortcut at the next stride: no fusion
    assert all(r.is_backbone(f"level{i}") for i in range(6))
    assert [r.stride(f"level{i}") for i in range(2, 6)] == [4, 8, 16, 32]
    assert r.not_a_cnn is None


# -- real stride ---------------------------------------------------------------------------------------

def test_dilated_trunk_counts_the_stride_it_replaced():
    model = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=True)
    r = _roles(model, torch.zeros(1, 3, 128, 128))
    assert [r.flow.values[r.flow.calls_of(p)[0].outputs[0]].stride for p in ("backbone.layer3", "backbone.layer4")
            ] == [8, 8]  # measured
    assert [r.stride(p) for p in ("backbone.layer2", "backbone.layer3.0", "backbone.layer3", "backbone.layer4.0",
                                  "backbone.layer4")] == [8, 16, 16, 32, 32]
    assert r.is_backbone("backbone.layer4") and not r.is_backbone("classifier.0")
    assert not r.is_backbone("aux_classifier.0") and r.stride("classifier.0") == 8  # ASPP's rates are no stride


def test_a_dilated_kernel_in_a_strided_stage_is_no_stride():
    """Selective Kernel blocks (timm's skresnet18) run a dilated 3x3 path beside a plain one in every stage,
    each stage downsampling as usual: the dilation widens the kernel and replaces no stride."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("skresnet18", pretrained=False)
    r = _roles(model, torch.zeros(1, 3, 224, 224))
    assert [r.stride(f"layer{i}") for i in range(1, 5)] == [4, 8, 16, 32]
    assert r.stride("layer2.0.conv1.paths.1") == 8


class _Gate(nn.Module):
    """A dilated spatial attention gate on the side of the trunk (as BAM's)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c, c // 4, 1)
        self.dilated = nn.Conv2d(c // 4, c // 4, 3, padding=4, dilation=4)
        self.out = nn.Conv2d(c // 4, 1, 1)

    def forward(self, x):
        return x * (1 + torch.sigmoid(self.out(self.dilated(self.reduce(x)))))


class _Res(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.a = nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation)
        self.b = nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation)
        self.proj = nn.Conv2d(cin, cout, 1, stride) if (cin, stride) != (cout, 1) else None

    def forward(self, x):
        skip = x if self.proj is None else self.proj(x)
        return torch.relu(self.b(torch.relu(self.a(x))) + skip)


class _GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.s4 = nn.Sequential(nn.MaxPool2d(2), _Res(16, 16), _Res(16, 16))
        self.gate = _Gate(16)
        self.s8 = nn.Sequential(_Res(16, 32, 2), _Res(32, 32))

    def forward(self, x):
        return self.s8(self.gate(self.s4(self.stem(x))))


def test_a_dilated_side_path_is_no_stride():
    r = _roles(_GatedNet(), torch.zeros(1, 3, 64, 64))
    assert r.stride("gate.dilated") == 4 and r.stride("gate") == 4 and r.stride("s8") == 8


def test_an_attention_gate_scaling_the_trunk_is_a_gate():
    """The gate's maps reach the outputs only through the sigmoid that scales the trunk: attention, not
    features; the trunk it scales and the blocks around it are no gate."""
    r = _roles(_GatedNet(), torch.zeros(1, 3, 64, 64))
    assert r.is_gate("gate.reduce") and r.is_gate("gate.dilated") and r.is_gate("gate.out")
    assert not r.is_gate("gate") and not r.is_gate("s4") and not r.is_gate("s8.0")


def test_a_dilated_attention_gate_in_a_zoo_model_is_no_stride():
    provider = pytest.importorskip("pytorchcv.model_provider")
    model = provider.get_model("bam_resnet50", pretrained=False)
    r = _roles(model, torch.zeros(1, 3, 224, 224))  # its final pool is a fixed 7x7
    assert [r.stride(f"features.stage{i}") for i in range(1, 5)] == [4, 8, 16, 32]
    gates = [p for p, m in model.named_modules() if ".bam." in p and isinstance(m, nn.Conv2d) and m.dilation[0] > 1]
    assert gates and sorted({r.stride(p) for p in gates}) == [4, 8, 16]  # measured: the gate traded nothing


def test_maps_an_se_gate_scales_are_not_pooled_maps():
    efficientnet = pytest.importorskip("efficientnet_pytorch")
    model = efficientnet.EfficientNet.from_name("efficientnet-b0")
    r = _roles(model, torch.zeros(1, 3, 128, 128))
    assert r.is_backbone("_blocks.10") and r.is_backbone("_blocks.15") and r.stride("_blocks.15") == 32
    assert r.not_a_cnn is None and not r.is_backbone("_fc")
    assert r.pooled & {v for c in r.flow.calls_of("_blocks.15._se_reduce") for v in c.outputs}


# -- attention -----------------------------------------------------------------------------------------

def test_yolo11_c2psa_attention_convs_are_attention(yolo_net):
    r = _roles(yolo_net("yolo11n.yaml"), torch.zeros(1, 3, 256, 256))
    attn = "model.10.m.0.attn"
    assert r.feeds_attention(f"{attn}.qkv") and r.feeds_attention(f"{attn}.qkv.conv")
    assert all(r.in_attention(f"{attn}.{p}") for p in ("qkv", "qkv.conv", "qkv.bn", "pe", "proj", "proj.bn"))
    assert not any(r.in_attention(p) for p in ("model.10.cv1", "model.10.m.0.ffn.0", "model.9", "model.8",
                                                "model.10"))
    assert r.is_backbone("model.10") and not r.is_backbone("model.11")


def test_detr_projection_into_the_transformer_is_attention_not_its_resnet():
    cfg, model = _detr()
    r = _roles(model, torch.zeros(1, 3, 128, 128))
    stages = "model.backbone.model.encoder.stages"
    assert r.feeds_attention("model.input_projection") and r.in_attention("model.input_projection")
    assert not r.is_backbone("model.input_projection")
    assert not any(r.in_attention(f"{stages}.{i}") or r.feeds_attention(f"{stages}.{i}") for i in range(4))
    assert r.is_backbone(f"{stages}.3") and r.stride(f"{stages}.2") == 16
    assert r.not_a_cnn is None


def _detr():
    pytest.importorskip("transformers")
    from tools.coverage.zoo_detect import hf_detr

    model = hf_detr("detr")
    return model.config, model


# -- norms by behaviour --------------------------------------------------------------------------------

def test_detr_frozen_norms_are_norms():
    _, model = _detr()
    r = _roles(model, torch.zeros(1, 3, 64, 64))
    frozen = {p for p, m in model.named_modules() if type(m).__name__ == "DetrFrozenBatchNorm2d"}
    assert frozen and r.norms == frozen


def test_rt_detr_frozen_norms_backbone_and_hybrid_encoder():
    pytest.importorskip("transformers")
    from tools.coverage.zoo_detect import hf_rt_detr

    model = hf_rt_detr()
    r = _roles(model, torch.zeros(1, 3, 128, 128))
    frozen = {p for p, m in model.named_modules() if type(m).__name__ == "RTDetrFrozenBatchNorm2d"}
    assert frozen and frozen <= r.norms
    stages = "model.backbone.model.encoder.stages"
    assert [r.stride(f"{stages}.{i}") for i in (2, 3)] == [16, 32] and r.is_backbone(f"{stages}.3")
    # the stride-32 projection feeds the encoder's attention; the neck's convs are not backbone, and only
    # the lateral conv reading the attention's result is attention
    assert r.in_attention("model.encoder_input_proj.2") and not r.in_attention("model.encoder_input_proj.1")
    assert not r.is_backbone("model.encoder.fpn_blocks.0") and not r.in_attention("model.encoder.fpn_blocks.0")
    assert r.in_attention("model.encoder.lateral_convs.0")


# -- live ----------------------------------------------------------------------------------------------

def test_pspnet_encoder_stages_it_throws_away_are_not_live():
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.PSPNet(encoder_name="mobilenet_v2", encoder_weights=None)  # encoder_depth 3: stride 8
    r = _roles(model, torch.zeros(1, 3, 64, 64))
    ran = [i for i in range(19) if r.ran(f"encoder.features.{i}")]
    live = [i for i in ran if r.is_live(f"encoder.features.{i}")]
    assert live == list(range(7)) and len(ran) > len(live)
    assert r.is_live("decoder") and r.is_live("segmentation_head")


# -- not a CNN -----------------------------------------------------------------------------------------

def test_a_transformer_with_a_conv_stem_and_decoder_is_not_a_cnn():
    r = _roles(ConvStemTransformer(), torch.zeros(1, 3, 128, 128))
    assert r.stride("dec") == 16 and r.residual_adds[-1].skip is not None
    assert r.not_a_cnn is not None and "stride 16 or 32" in r.not_a_cnn
    assert r.in_attention("stem.2") and not r.is_backbone("dec")
    assert _roles(torchvision.models.resnet18(), torch.zeros(1, 3, 64, 64)).not_a_cnn is None
