"""``dbi.check``: every stage on a model that passes, each failure reported with what to do, the model untouched."""

from __future__ import annotations

import sys

import pytest
import torch
import torchvision

import dropblock_inject as dbi

import dropblock_inject._check as check_module  # noqa: E402

STAGES = ["plan", "original model", "inject", "eval identity", "keep_prob 1 identity", "training step", "strip", "TorchScript", "ONNX"]


def _resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


def test_a_model_that_fits_passes_every_stage_and_is_left_unchanged():
    pytest.importorskip("onnxruntime")
    model = _resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    rng = torch.get_rng_state()
    report = dbi.check(model, "resnet_paper", x)
    assert [s.name for s in report.stages] == STAGES
    assert all(s.status == "ok" for s in report.stages), str(report)
    assert report.ok and str(report).endswith("verdict: PASS")
    assert len(report.points) == 12 and report.inject_seconds > 0
    assert "onnxruntime's output matches" in str(report)
    # the check worked on a copy: weights, BatchNorm statistics, gradients and the RNG are as they were
    assert not dbi.injected_dropblocks(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_recipe_that_selects_nothing_fails_at_plan_with_what_to_do():
    recipe = {"rules": [{"modules": ["layer9.*"]}]}
    report = dbi.check(_resnet18(), recipe, torch.randn(2, 3, 64, 64), export=False)
    assert not report.ok
    plan = report.stages[0]
    assert (plan.name, plan.status) == ("plan", "fail") and "RecipeError" in plan.detail
    assert "python -m dropblock_inject plan" in plan.fix
    assert all(s.status == "skipped" for s in report.stages[1:])
    text = str(report)
    assert "what to do:" in text and text.endswith("verdict: FAIL (1 failed: plan)")


def test_a_training_step_that_drops_nothing_fails():
    """At keep_prob 1 every DropBlock is the identity: the training step must say that nothing was dropped."""
    recipe = {"dropblock": {"keep_prob": 1.0}, "rules": [{"modules": ["layer3.*", "layer4.*"], "shortcut": True}]}
    report = dbi.check(_resnet18(), recipe, torch.randn(2, 3, 96, 96), export=False)
    step = next(s for s in report.stages if s.name == "training step")
    assert step.status == "fail" and "no DropBlock dropped anything" in step.detail, str(report)


def test_blocks_covering_the_whole_map_are_noted():
    report = dbi.check(_resnet18(), "resnet_paper", torch.randn(2, 3, 64, 64), export=False)
    assert report.ok
    assert any("12 DropBlocks see maps no larger than their block" in n for n in report.notes), report.notes
    assert len(report.dropblock_inputs) == 12 and (2, 512, 2, 2) in report.dropblock_inputs.values()


def test_a_strip_that_leaves_dropblocks_is_caught(monkeypatch):
    monkeypatch.setattr(check_module, "strip", lambda model: model)
    report = dbi.check(_resnet18(), "resnet_paper", torch.randn(2, 3, 64, 64), export=False)
    stage = next(s for s in report.stages if s.name == "strip")
    assert stage.status == "fail" and stage.detail == "DropBlocks are left after strip"
    assert "please report it" in stage.fix


def test_a_model_that_does_not_script_without_dropblock_is_skipped_not_failed(monkeypatch):
    class Unscriptable(torchvision.models.ResNet):
        def forward(self, x, *rest):  # TorchScript rejects *args
            return super().forward(x)

    torch.manual_seed(0)
    model = Unscriptable(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10).eval()
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    report = dbi.check(model, "resnet_paper", torch.randn(2, 3, 64, 64))
    script, onnx = report.stages[-2:]
    assert (script.name, script.status) == ("TorchScript", "skipped")
    assert "does not script without DropBlock either" in script.detail
    assert (onnx.name, onnx.status) == ("ONNX", "skipped") and "pip install onnx onnxruntime" in onnx.detail
    assert report.ok


def test_extra_checks_run_on_the_injected_model():
    seen = []

    def count(model, report):
        seen.append(len(dbi.injected_dropblocks(model)))
        return "" if seen[-1] == 12 else "wrong count"

    report = dbi.check(_resnet18(), "resnet_paper", torch.randn(2, 3, 64, 64), export=False,
                       extra_checks=[("count", count), ("always wrong", lambda m, r: "it is wrong")])
    assert seen == [12]
    assert [(s.name, s.status) for s in report.stages[-3:]] == [("count", "ok"), ("always wrong", "fail"),
                                                                 ("strip", "skipped")]
