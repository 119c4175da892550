"""Placement decided from the recorded dataflow: properties of the plan on models users train (built offline
with random weights), not counts alone."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import dropblock_inject as dbi
from _models import ConvStemTransformer

torchvision = pytest.importorskip("torchvision")


def _plan(model: nn.Module, recipe="paper_generic", x=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small maps at the test's input size
        return dbi.plan(model, recipe, example_input=x)


def _index(point) -> int:
    """The index of the Ultralytics layer ``model.<i>`` a point is in (or after, for the root's own points)."""
    return int(point.module.split(".")[1] if point.module else point.after.split("_")[1])


# -- backbone only, no attention, live maps only ---------------------------------------------------------

def test_yolov8n_points_only_in_its_backbone(yolo_net):
    points = _plan(yolo_net("yolov8n.yaml"), x=torch.zeros(1, 3, 256, 256))
    # the backbone is model.0-9; the PAN neck (model.10-21) and the Detect head (model.22) get none
    assert points and max(map(_index, points)) <= 9
    assert {_index(p) for p in points} >= {6, 8}


def test_yolov8n_backbone_convs_and_c2f_blocks_get_their_points_without_warnings(yolo_net):
    """fx traces the whole DetectionModel (``forward(self, x, *args, **kwargs)``, called with the image only) and
    its C2f blocks (``list(self.cv1(x).chunk(2, 1))``): no module is skipped, the root's stride-16/32
    downsampling convs (``model.5``, ``model.7``) and the backbone's C2f blocks get their points."""
    model = yolo_net("yolov8n.yaml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dbi.inject(model, "paper_generic", example_input=torch.zeros(1, 3, 256, 256))
    assert not [str(w.message) for w in caught if "cannot trace module" in str(w.message)]
    plan = {(p.module, p.after) for p in _plan(yolo_net("yolov8n.yaml"), x=torch.zeros(1, 3, 256, 256))}
    assert {("", "model_5"), ("", "model_7"), ("model.6", "cv1"), ("model.6", "cv2"), ("model.8", "cv1"),
            ("model.8", "cv2")} <= plan


def test_yolo11n_no_point_in_neck_head_or_attention(yolo_net):
    model = yolo_net("yolo11n.yaml")
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
    with pytest.raises(dbi.RecipeError, match=r"largest stride found is 8 \(in 'encoder\.features\.[0-6]"):
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


def test_a_decoder_block_fusing_several_maps_gets_no_point():
    """smp's MAnet: its first decoder block convolves the encoder's deepest map before it upsamples and fuses
    it with a skip; a layer of a module that fuses maps of several sizes and computes no backbone map is no
    backbone, so the points are the encoder's alone, as on the same encoder under a U-Net."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    x = torch.zeros(1, 3, 64, 64)
    manet = _plan(smp.MAnet("resnet18", encoder_weights=None, classes=3), x=x)
    unet = _plan(smp.Unet("resnet18", encoder_weights=None, classes=3), x=x)
    assert manet and all(p.module.startswith("encoder.") for p in manet), [p.module for p in manet]
    assert [(p.module, p.after, p.kind) for p in manet] == [(p.module, p.after, p.kind) for p in unet]


def test_a_projection_shortcut_module_gets_no_branch_point_inside():
    """pytorchcv GhostNet's downsampling units project their skip path with a depthwise-separable
    ``identity_conv``: its output gets the shortcut point, and no branch point goes inside it (two DropBlocks
    in series on the skip path, which is no residual branch)."""
    pytorchcv = pytest.importorskip("pytorchcv.model_provider")
    model = pytorchcv.get_model("ghostnet", pretrained=False)
    points = _plan(model, x=torch.zeros(1, 3, 224, 224))
    shortcuts = {f"{p.module}.{p.after}" for p in points if p.kind == "shortcut" and p.after == "identity_conv"}
    assert shortcuts  # the projections' outputs are dropped as shortcuts
    inside = [p for p in points if any(p.module == s or p.module.startswith(s + ".") for s in shortcuts)]
    assert not inside, inside


def _feeds_norm_only(model: nn.Module, x: torch.Tensor) -> set[str]:
    """The conv modules whose output the example forward hands to a norm module and nothing else."""
    norms = {p for p, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    convs = {p for p, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    made: dict[int, tuple[str, torch.Tensor]] = {}  # holds each output, so that no id is reused
    read: dict[str, set[str]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, p=p: made.__setitem__(id(o), (p, o)))
             for p, m in model.named_modules() if p in convs]
    hooks += [m.register_forward_pre_hook(
        lambda m, i, p=p: read.setdefault(made[id(i[0])][0], set()).add(p) if id(i[0]) in made else None)
        for p, m in model.named_modules() if p in norms or p in convs]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {conv for conv, readers in read.items() if readers <= norms}


@pytest.mark.parametrize("name, shortcuts", [("preresnet10", 2), ("densenet121", 0)])
def test_pre_activation_units_get_their_points_after_the_next_norm(name, shortcuts):
    """Pre-activation units (``bn-act-conv``, pytorchcv PreResNet and DenseNet): a conv whose output the next
    unit's norm reads gets no point, that norm does (after the norm of a conv-norm pair, across modules); a
    pre-activation projection unit's ``identity_conv`` (fed from its body's pre-activation, returned as a tuple)
    is the shortcut, not a branch."""
    pytorchcv = pytest.importorskip("pytorchcv.model_provider")
    model = pytorchcv.get_model(name, pretrained=False).eval()
    x = torch.zeros(1, 3, 224, 224)
    points = _plan(model, x=x)
    at = {f"{p.module}.{p.after}" for p in points if p.kind == "branch"}
    before_norm = {c for c in _feeds_norm_only(model, x) if c.startswith(("features.stage3", "features.stage4"))}
    assert before_norm and not at & before_norm
    norms_after = {c.rsplit(".", 2)[0] + "." + _next(c) + ".bn" for c in before_norm}
    assert norms_after <= at
    assert all(p.after == "identity_conv" for p in points if p.kind == "shortcut")
    assert sum(p.kind == "shortcut" for p in points) == shortcuts
    assert not any(p.after == "identity_conv" for p in points if p.kind == "branch")


def _next(conv: str) -> str:
    """``...unit1.body.conv1.conv`` -> ``conv2``: the pre-activation block after the one holding ``conv``."""
    block = conv.rsplit(".", 2)[1]
    return block[:-1] + str(int(block[-1]) + 1)


def test_dpn_projection_split_into_the_skip_gets_the_shortcut_point_only():
    """DPN's first unit of a stage splits its projection ``conv_proj`` into the residual skip and the dense
    path: the residual part gets the shortcut point and the projection no branch point (two DropBlocks in
    series on the skip path)."""
    pytorchcv = pytest.importorskip("pytorchcv.model_provider")
    points = _plan(pytorchcv.get_model("dpn68", pretrained=False).eval(), x=torch.zeros(1, 3, 224, 224))
    assert {p.module for p in points if p.kind == "shortcut"} >= {"features.stage3.unit1", "features.stage4.unit1"}
    assert not [p for p in points if ".conv_proj" in f"{p.module}.{p.after}"]


def test_dla34_features_only_gets_the_classifier_block_points():
    timm = pytest.importorskip("timm")
    x = torch.zeros(1, 3, 128, 128)
    key = lambda p: (p.module, p.after, p.kind)  # noqa: E731
    features = {key(p) for p in _plan(timm.create_model("dla34", features_only=True, pretrained=False), x=x)}
    classifier = {key(p) for p in _plan(timm.create_model("dla34", pretrained=False), x=x)}
    assert len(classifier) == 23 and features == classifier


def test_hrnet_fusing_stages_are_backbone():
    """HRNet fuses its multi-resolution branches in every stage, then opens a deeper branch of residual
    blocks: its stride-16 and stride-32 branches are its groups 3 and 4 (each BasicBlock: both norms and its
    shortcut), also as a feature extractor; its classification head (which fuses the last stage's branches)
    gets none."""
    timm = pytest.importorskip("timm")
    x = torch.zeros(1, 3, 224, 224)
    points = _plan(timm.create_model("hrnet_w18_small", pretrained=False), x=x)
    assert points and {224 // p.shape[-1] for p in points} == {16, 32}
    blocks = {p.module for p in points if p.module.startswith(("stage3.0.branches", "stage4.0.branches"))}
    assert blocks == {f"stage{s}.0.branches.{b}.{i}" for s, b in ((3, 2), (4, 2), (4, 3)) for i in (0, 1)}
    for block in blocks:
        assert sorted((p.after, p.kind) for p in points if p.module == block) == [
            ("bn1", "branch"), ("bn2", "branch"), ("x", "shortcut")]
    assert not [p for p in points if p.module.startswith(("incre", "downsamp", "final", "stage4.0.fuse"))]
    # a fuse layer sums maps of two branches, each deep: no skip path, no shortcut point
    assert {p.module for p in points if p.kind == "shortcut"} == blocks
    features = _plan(timm.create_model("hrnet_w18_small", features_only=True, pretrained=False), x=x)
    assert {p.module for p in features} >= blocks


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


def test_detr_resnet_backbone_gets_the_paper_placement():
    """Each bottleneck of groups 3 and 4 (HF's stages 2 and 3): a point after each of its three conv-norm
    units, the first one included although it runs at the stride before the block's (as torchvision's
    ``layer3.0.conv1``), and its shortcut; a block's points all take its group's rule."""
    points = _plan(_detr(), x=torch.zeros(1, 3, 128, 128))
    stages = "model.backbone.model.encoder.stages"
    for stage in (2, 3):
        block = f"{stages}.{stage}.layers.0"
        mine = [p for p in points if p.module.startswith(block)]
        assert sorted((p.module, p.after, p.kind) for p in mine) == [(block, "shortcut", "shortcut")] + [
            (f"{block}.layer.{k}", "normalization", "branch") for k in range(3)], stage
        assert len({(p.rule, p.keep_prob) for p in mine}) == 1, stage
    first = next(p for p in points if p.module == f"{stages}.2.layers.0.layer.0")
    assert first.shape[-1] == 128 // 8  # the stride-8 map the stride-16 block starts from
    assert len(points) == 8


def test_maskformer_points_only_in_its_backbone():
    """Hugging Face MaskFormer projects the backbone's last map with a conv that feeds its transformer
    decoder's attention (``transformer_module.input_projection``): no point there nor in the pixel decoder,
    the backbone's groups 3 and 4 get theirs (its dataflow is recorded on meta: the attention ran there)."""
    pytest.importorskip("transformers")
    from tools.coverage.zoo_detect import hf_mask2former

    points = _plan(hf_mask2former(maskformer=True).eval(), x=torch.zeros(1, 3, 128, 128))
    backbone = "model.pixel_level_module.encoder.encoder.stages."
    assert points and all(p.module.startswith(backbone) for p in points), [p.module for p in points]
    assert {p.module[len(backbone)] for p in points} == {"2", "3"}


def test_resnet50_paper_placement_unchanged():
    for recipe in ("resnet50_paper", "paper_generic"):
        points = _plan(torchvision.models.resnet50(), recipe)
        assert len(points) == 36 and sum(p.kind == "branch" for p in points) == 27, recipe
        assert {p.module.split(".")[0] for p in points} == {"layer3", "layer4"}


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

def test_a_transformer_with_a_conv_stem_and_decoder_is_told_it_is_not_a_cnn():
    model = ConvStemTransformer().eval()
    x = torch.zeros(1, 3, 128, 128)
    for call in (dbi.plan, dbi.inject):  # both refuse, with the reason and what to write instead
        with pytest.raises(dbi.RecipeError, match=r"not a CNN.*stride 16 or 32.*attention.*modules: \[\.\.\.\]"):
            call(model, "paper_generic", example_input=x)
    assert not dbi.injected_dropblocks(model)
    # naming the modules still places DropBlock where asked (the decoder's layers, called by the model itself)
    assert _plan(model, {"rules": [{"types": ["ConvStemTransformer"], "after": ["unit"]}]}, x)


@pytest.mark.parametrize("name", ["levit_128s", "unetr"])
def test_zoo_transformers_with_conv_stems_or_decoders_are_not_cnns(name):
    """timm's LeViT (a conv stem, attention stages with conv-like projections) and MONAI's UNETR (a ViT
    encoder, a residual conv decoder at stride 1-16): told they are no CNN the recipe fits, no point."""
    if name == "levit_128s":
        model, x = pytest.importorskip("timm").create_model(name, pretrained=False), torch.zeros(1, 3, 224, 224)
    else:
        pytest.importorskip("einops")  # MONAI's attention blocks need it
        nets = pytest.importorskip("monai.networks.nets")
        model, x = nets.UNETR(in_channels=1, out_channels=2, img_size=(32, 32, 32)), torch.zeros(1, 1, 32, 32, 32)
    for call in (dbi.plan, dbi.inject):
        with pytest.raises(dbi.RecipeError, match=r"not a CNN the recipe fits.*no residual convolution stage"):
            call(model.eval(), "paper_generic", example_input=x)
    assert not dbi.injected_dropblocks(model)


def test_plan_lists_exactly_what_inject_installs():
    """Both run the same plan phase: a model that does not take the default example input (one channel) and
    a recipe that names modules give the same points from plan and inject, neither refusing."""
    recipe = {"rules": [{"modules": ["3", "4"], "after": ["unit"], "shortcut": True}]}
    model = _net(_ChainedStage, channels=1)
    planned = [(p.module, p.after, p.kind) for p in _plan(model, recipe)]
    dbi.inject(model, recipe)
    installed = [(d.point.module, d.point.after, d.point.kind) for d in dbi.injected_dropblocks(model)]
    assert planned and sorted(installed) == sorted(planned)


class _Inner(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn(self.conv(x))


class _Outer(nn.Module):
    """A block with a conv-norm of its own, then a residual block nested in it."""

    def __init__(self, cin: int, c: int) -> None:
        super().__init__()
        self.conv, self.bn, self.inner = nn.Conv2d(cin, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), _Inner(c)

    def forward(self, x):
        return self.inner(torch.relu(self.bn(self.conv(x))))


def test_a_glob_reaches_blocks_nested_in_a_block_it_matches():
    recipe = {"rules": [{"modules": ["**"], "after": ["norm"], "shortcut": True}]}
    points = {(p.module, p.after, p.kind) for p in _plan(nn.Sequential(_Outer(3, 8), _Outer(8, 16)), recipe)}
    for i in ("0", "1"):  # each block's own norm, and the nested block's norm and shortcut
        assert {(i, "bn", "branch"), (f"{i}.inner", "bn", "branch"), (f"{i}.inner", "x", "shortcut")} <= points


def test_a_glob_reaches_the_bottlenecks_of_ultralytics_c2f_blocks(yolo_net):
    """``model.**`` matches each C2f and the Bottlenecks inside it: both get their points (the C2f after its
    own cv1 and cv2, each Bottleneck its branch and shortcut)."""
    model = yolo_net("yolov8n.yaml")
    recipe = {"rules": [{"modules": ["model.**"], "after": ["unit"], "shortcut": True}]}
    points = _plan(model, recipe, x=torch.zeros(1, 3, 256, 256))
    blocks = {p.module for p in points}
    assert {"model.2.m.0", "model.4.m.0", "model.4.m.1", "model.6.m.0", "model.6.m.1", "model.8.m.0"} <= blocks
    assert {(p.after, p.kind) for p in points if p.module == "model.6.m.0"} == {
        ("cv1", "branch"), ("cv2", "branch"), ("x", "shortcut")}
    assert {(p.after, p.kind) for p in points if p.module == "model.6"} == {("cv1", "branch"), ("cv2", "branch")}


def test_a_cifar_style_net_is_told_its_largest_stride_and_the_rule_to_write():
    """A ResNet for 32x32 inputs (3x3 stem at stride 1, no max-pool, three stages): its deepest stage runs at
    stride 4, so the stride rules select nothing; the error says so and names a path rule that works."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1, model.maxpool, model.layer4 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity(), nn.Identity()
    model.fc = nn.Linear(256, 10)
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(dbi.RecipeError, match=r"largest stride found is 4 \(in 'layer3'\); write a path rule .*"
                                              r"modules: \['layer3\.\*'\]$"):
        _plan(model, x=x)
    points = _plan(model, {"rules": [{"modules": ["layer3.*"], "after": ["norm"], "shortcut": True}]}, x)
    assert {p.module for p in points} == {"layer3.0", "layer3.1"}


def test_a_rule_naming_a_container_says_which_modules_to_name():
    """``layer3`` is a Sequential, never rewritten: the error names the blocks inside it; a Sequential of
    layers inside a block (``downsample``) names the block that calls them."""
    model = torchvision.models.resnet18()
    with pytest.raises(dbi.RecipeError, match=r"'layer3' is a Sequential.*modules: \['layer3\.\*'\]"):
        _plan(model, {"rules": [{"modules": ["layer3"]}]})
    with pytest.raises(dbi.RecipeError, match=r"layers that 'layer3\.0' calls: name that module"):
        _plan(model, {"rules": [{"modules": ["layer3.0.downsample"]}]})


def test_plan_refuses_a_bare_sequential_as_inject_does():
    """A model that is a plain ``nn.Sequential`` of layers cannot hold a DropBlock (its forward runs every
    child): plan and inject refuse it alike, with the same message, and the model is left as it was."""
    layers = [m for a, b in ((3, 8), (8, 16), (16, 32), (32, 64), (64, 64))
              for m in (nn.Conv2d(a, b, 3, 2, 1), nn.BatchNorm2d(b), nn.ReLU())]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    messages = []
    for call in (dbi.plan, dbi.inject):
        with pytest.raises(dbi.SurgeryError, match=r"'<root>': it is a Sequential") as info:
            call(model, "paper_generic")
        messages.append(str(info.value))
    assert messages[0] == messages[1] and not dbi.injected_dropblocks(model)


# -- real stride ------------------------------------------------------------------------------------------

def test_a_dilated_attention_gate_is_no_stride_16_or_32_stage_and_no_point():
    """pytorchcv's BAM-ResNet50 computes a spatial attention gate with dilated convs after stages 1-3: at
    strides 4 and 8 they are no stride-16/32 maps, whatever their dilation, and no gate gets a point."""
    model_provider = pytest.importorskip("pytorchcv.model_provider")
    model = model_provider.get_model("bam_resnet50", pretrained=False)
    points = _plan(model, x=torch.zeros(1, 3, 224, 224))  # (its classifier pools a fixed 7x7)
    first = "features.stage3.unit1.res_unit.body"  # group 3's first conv, at stride 8 as in the paper's ResNet
    assert points and all(p.shape[-1] <= 224 // 16 for p in points if p.module != first)
    assert not [p for p in points if p.module.split(".")[1] in ("stage1", "stage2")]
    # the gate after stage 3 runs at stride 16, yet its maps only scale the trunk through a sigmoid: no point
    assert not [p for p in points if ".bam." in p.module]
    # the paper's 27 + 9 of its ResNet-50: the first conv of group 3's first block (its ``body``, the whole
    # residual branch as one module) runs at stride 8 and counts in its block's group
    assert (len(points), sum(p.kind == "branch" for p in points)) == (36, 27)
    assert [p.shape[-1] for p in points if p.module == first] == [28, 14, 14]


def test_a_dilated_selective_kernel_path_gives_no_stride_8_point():
    """skresnet18's blocks have a dilated kernel path in every stage: groups 3 and 4 are still its stride-16
    and stride-32 stages (layer3, layer4), with no point on layer2's stride-8 maps."""
    timm = pytest.importorskip("timm")
    points = _plan(timm.create_model("skresnet18", pretrained=False), x=torch.zeros(1, 3, 224, 224))
    assert {p.module.split(".")[0] for p in points} == {"layer3", "layer4"}
    assert {p.shape[-1] for p in points} == {14, 7}


_SEEDED_PLAN = """
import json, sys, warnings, torch
warnings.simplefilter("ignore")
import dropblock_inject as dbi
from monai.networks.nets import DenseNet121
from pytorchcv.model_provider import get_model
models = [DenseNet121(spatial_dims=2, in_channels=3, out_channels=4), get_model("dpn68", pretrained=False)]
print(json.dumps([[(p.module, p.after, p.kind, p.keep_prob) for p in dbi.plan(
    m.eval(), "paper_generic", example_input=torch.zeros(1, 3, 224, 224))] for m in models]))
"""


@pytest.mark.slow
def test_the_plan_does_not_depend_on_the_string_hash_seed():
    """Placement iterates no set of names in an order that decides anything: the same plan under two
    ``PYTHONHASHSEED`` values (each a fresh process)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("monai")
    pytest.importorskip("pytorchcv")
    plans = [subprocess.run([sys.executable, "-c", _SEEDED_PLAN], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert plans[0] and plans[0] == plans[1]


def test_pan_decoder_fusing_the_dilated_stage_with_the_one_before_gets_no_point():
    """smp PAN's encoder keeps stride 16 in its last stage (dilated): its first attention upsampling block
    (``decoder.gau3``) fuses that stage's map with the previous stage's at one resolution, without
    resampling; it is decoder, not a continuation of the stride-32 stage. No point gets a one-channel map
    (the feature pyramid attention's sums)."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    points = _plan(smp.PAN(encoder_name="resnet18", encoder_weights=None).eval(), x=torch.zeros(2, 3, 128, 128))
    assert not [p for p in points if p.module.startswith("decoder.gau")]
    assert all(p.shape is not None and p.shape[1] > 1 for p in points)
    assert {p.module for p in points if p.module.startswith("encoder.layer4")}
