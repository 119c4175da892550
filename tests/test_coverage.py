"""Zoo coverage: models of torchvision, timm and other libraries (random weights) through ``check_model``, which
runs ``dropblock_inject.check`` and the sweep's own checks."""

import pytest
import torch

from tools import coverage

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

SLOW = pytest.mark.slow  # by default one model per library; the others, and the big ones, in the long set
FAST_TV = ["resnet18", pytest.param("mobilenet_v3_small", marks=SLOW)]
FAST_TIMM = ["resnet10t", pytest.param("regnetx_002", marks=SLOW), pytest.param("efficientnet_b0", marks=SLOW)]


@pytest.mark.parametrize("name", FAST_TV)
def test_torchvision_sample(name):
    row = coverage.check_model(name, lambda: torchvision.models.get_model(name, weights=None),
                               family=coverage._tv_family(name), library="torchvision")
    assert row.status == "ok", row.reason
    assert row.branch > 0
    if name == "resnet18":  # layer3 + layer4: 4 BasicBlocks, 2 branch points + 1 shortcut each
        assert (row.branch, row.shortcut) == (8, 4)


@pytest.mark.parametrize("name", FAST_TIMM)
def test_timm_sample(name):
    row = coverage.check_model(name, lambda: timm.create_model(name, pretrained=False),
                               family=coverage._timm_family(name), library="timm")
    assert row.status == "ok", row.reason
    assert row.branch > 0


def test_check_model_reports_failures_without_raising():
    def broken():
        raise RuntimeError("no such model\nsecond line")

    row = coverage.check_model("broken", broken)
    assert row.status == "fail" and row.reason == "build: RuntimeError: no such model"

    row = coverage.check_model("linear", lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2)))
    assert row.status == "fail" and row.reason.startswith("plan:")


def test_report_table(tmp_path):
    rows = [coverage.CoverageRow("a", "resnet", 8, 4, 0.1, "ok", "", "torchvision"),
            coverage.CoverageRow("b", "squeezenet", 0, 0, float("nan"), "fail", "plan: x | y", "torchvision"),
            coverage.CoverageRow("vit_b_16", "vision_transformer", status="skipped: not a CNN", library="torchvision"),
            coverage.CoverageRow("c", "dla", 1, 1, 0.2, "ok", "", "timm")]
    assert coverage.pass_rates(rows) == {"torchvision": (1, 2), "timm": (1, 1)}
    out = tmp_path / "coverage.md"
    coverage.write_report(rows, out)
    text = out.read_text()
    assert "torchvision: 1/2 CNNs pass (50.0%)" in text and "timm: 1/1 CNNs pass (100.0%)" in text
    assert "| torchvision | b | squeezenet | 0 | 0 |  | fail | plan: x \\| y |" in text
    coverage.write_report([coverage.CoverageRow("dla34", "dla", 17, 6, 0.2, "ok", "", "timm")], out)
    assert "| timm | dla34 | dla | 17 | 6 | 0.200 | ok | known limit: the projection" in out.read_text()


def test_video_r3d_recipe():
    row = coverage.check_video_model("r3d_18", lambda: torchvision.models.get_model("r3d_18", weights=None),
                                     shape=(1, 3, 4, 32, 32))
    assert row.status == "ok", row.reason
    assert (row.branch, row.shortcut) == (8, 4)


@pytest.mark.slow
@pytest.mark.parametrize("name", coverage.VIDEO_MODELS)
def test_video_models(name):
    row = coverage.check_video_model(name, lambda: torchvision.models.get_model(name, weights=None))
    assert row.status == "ok", row.reason


@pytest.mark.slow
def test_zoo_sweep_pass_rates(tmp_path):
    # the whole timm sample, every torchvision classifier but the heaviest (coverage.TV_HEAVY), and the
    # detection, segmentation, Hugging Face, timm features_only and smp families, with every row's reason
    rows = coverage.sweep(light=True, report=tmp_path / "coverage.md", log=None)
    rates = coverage.pass_rates(rows)
    failures = "\n".join(f"{r.library} {r.model}: {r.reason}" for r in rows if r.status == "fail")
    passed, checked = rates["torchvision"]
    assert passed >= 0.95 * checked, failures
    passed, checked = rates["timm"]
    assert passed >= 0.90 * checked, failures
    for lib in coverage.FAMILIES:
        passed, checked = rates[lib]
        assert checked and passed >= 0.95 * checked, failures  # each further family at 95%
    assert all(r.reason for r in rows if r.status == "fail")
    text = (tmp_path / "coverage.md").read_text()
    assert all(f"| {lib} |" in text for lib in coverage.FAMILIES)


@pytest.mark.parametrize("library, name, expected", [
    pytest.param("torchvision-detection", "retinanet_resnet50_fpn", (27, 9), marks=SLOW),
    pytest.param("torchvision-segmentation", "deeplabv3_resnet50", (27, 9), marks=SLOW),
    pytest.param("transformers", "ResNetForImageClassification", (27, 9), marks=SLOW),
    ("timm-features", "resnet18 (features_only)", (8, 4)),
    pytest.param("smp", "Unet(resnet18)", (8, 4), marks=SLOW),
])
def test_new_families(library, name, expected):
    """One model of each new family through the whole check, with the paper's counts."""
    entry = next(e for e in coverage.FAMILIES[library](False) if e[0] == name)
    row = coverage.check_model(name, entry[2], size=entry[3], family=entry[1], library=library)
    assert row.status == "ok", row.reason
    assert (row.branch, row.shortcut) == expected


@pytest.mark.slow  # a DeepLabV3-ResNet-50 through every check
def test_check_rejects_points_in_a_head():
    """The check itself catches a DropBlock in a neck or head (here: a rule naming DeepLab's ASPP by path)."""
    from torchvision.models import segmentation

    recipe = {"rules": [{"modules": ["classifier.0"], "after": ["unit"]}]}
    ctor = lambda: segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None)  # noqa: E731
    row = coverage.check_model("deeplabv3", ctor, recipe=recipe, size=96, library="torchvision-segmentation")
    assert row.status == "fail" and "neck or head" in row.reason, row.reason


def test_check_requires_shortcut_and_branch_points_of_residual_blocks():
    """A residual block of groups 3/4 with branch points but no shortcut point (or the reverse) fails the check."""
    import torchvision

    import dropblock_inject as dbi
    from tools.coverage.blocks import missing_points
    from dropblock_inject.surgery.shapes import ShapeLog

    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 64, 64)
    points = dbi.plan(model, "paper_generic", example_input=x)
    log = ShapeLog(model, x)
    assert missing_points(model, points, "paper_generic", log) == ""
    no_shortcut = [p for p in points if not (p.kind == "shortcut" and p.module == "layer4.1")]
    assert "'layer4.1' (Bottleneck) has branch points but no shortcut point" in missing_points(
        model, no_shortcut, "paper_generic", log)
    no_branch = [p for p in points if not (p.kind == "branch" and p.module == "layer3.2")]
    assert "'layer3.2' got a shortcut point but no branch point" in missing_points(
        model, no_branch, "paper_generic", log)
    branch_only = {"name": "b", "dropblock": {"block_size": 7, "keep_prob": 0.9},
                   "rules": [{"name": "s", "stride": [16, 32], "after": ["unit"]}]}
    assert missing_points(model, [p for p in points if p.kind == "branch"], branch_only, log) == ""


@pytest.mark.slow  # two sweeps of timm's EfficientNet-B0
def test_check_requires_the_whole_model_fx_graph_to_hold_every_dropblock(monkeypatch):
    """Where fx traces the plain model, the injected model's training graph must hold every DropBlock, or the
    trace be refused: timm EfficientNet's point after bn2 is in its top module's own code (fx traces the class's
    forward), so the training trace is refused, which passes; with the refusal switched off that point goes
    missing from the graph, and the check says so."""
    import timm

    from dropblock_inject.surgery import roottrace

    ctor = lambda: timm.create_model("efficientnet_b0", pretrained=False)  # noqa: E731
    assert coverage.check_model("efficientnet_b0", ctor, library="timm").status == "ok"
    monkeypatch.setattr(roottrace, "fx_tracing", lambda: False)
    row = coverage.check_model("efficientnet_b0", ctor, library="timm")
    assert row.status == "fail" and "holds 39 of the 40 DropBlocks" in row.reason, row.reason


class _DeadBranch(torch.nn.Module):
    """A conv whose output the forward computes and throws away."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        self.b(x)
        return self.a(x)


def test_placement_check_finds_points_before_a_norm_and_on_dead_maps():
    """The sweep's dataflow check flags a point between a conv and its norm (a frozen-norm class no registry
    names: HF DETR) and one on a map that never reaches the outputs; the plan's own points pass it."""
    transformers = pytest.importorskip("transformers")
    from dropblock_inject.surgery.points import InsertionPoint
    from tools.coverage.placement import misplaced

    import dropblock_inject as dbi

    cfg = transformers.DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone=None,
        backbone_config=transformers.ResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 256],
                                                  embedding_size=16, layer_type="bottleneck",
                                                  out_features=["stage4"]),
        d_model=32, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        num_queries=5, encoder_layers=1, decoder_layers=1)
    model = transformers.DetrForObjectDetection(cfg)
    x = torch.zeros(1, 3, 128, 128)
    assert misplaced(model, dbi.plan(model, "paper_generic", example_input=x), x) == ""
    conv = InsertionPoint("model.backbone.model.encoder.stages.2.layers.0.layer.1", "convolution", "branch", 7,
                          None, 0.9)
    assert "before a norm" in misplaced(model, [conv], x)
    dead = InsertionPoint("", "b", "branch", 3, None, 0.9)
    assert "dead map" in misplaced(_DeadBranch(), [dead], torch.zeros(1, 3, 16, 16))
