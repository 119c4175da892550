"""The two phases: ``make_plan`` returns an immutable plan holding everything the install needs; installing
it traces and analyses nothing; ``plan`` returns that plan's points."""

import dataclasses

import pytest
import timm
import torch
import torchvision
from torch.utils.checkpoint import checkpoint

import dropblock_inject as dbi
from dropblock_inject.surgery import s19_analyze as analyze, s25_blueprint as blueprint, s28_rewrite as rewrite, s22_select as select, s24_sequentials as sequentials, s18_trace as trace, s06_tracer as tracer
from dropblock_inject.surgery.s25_blueprint import make_plan
from dropblock_inject.surgery.s28_rewrite import install


def _refuse(*args, **kwargs):
    raise AssertionError("the install phase traced or analysed")


class _Stage(torch.nn.Module):
    """A block that checkpoints its convolution while ``grad_checkpointing`` is on: a second graph to trace."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.grad_checkpointing = False

    def forward(self, x):
        y = checkpoint(self.conv, x, use_reentrant=False) if self.grad_checkpointing else self.conv(x)
        return x + self.bn(y)


CASES = {"timm resnet18": (lambda: timm.create_model("resnet18", pretrained=False, num_classes=4), "paper_generic"),
         "vgg11 (delegated Sequential)": (lambda: torchvision.models.vgg11(), "paper_generic"),
         "checkpointing variant": (lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), _Stage()), {"rules": [
             {"modules": ["1"], "after": ["norm"]}]})}


@pytest.mark.parametrize("case", CASES)
def test_install_traces_nothing(case, monkeypatch):
    ctor, recipe = CASES[case]
    model = ctor()
    plan = make_plan(model, recipe)
    assert all(isinstance(s, blueprint.ScopePlan) for s in plan.scopes)
    if case.startswith("vgg"):
        assert plan.scopes[0].delegated
    if case.startswith("checkpointing"):
        assert plan.scopes[0].flags == ("grad_checkpointing",) and plan.scopes[0].variants
    for module, attr in ((tracer.Tracer, "trace"), (trace, "trace_scope"), (trace, "trace_variant"),
                         (analyze, "analyze"), (select, "build_plan"), (sequentials, "trace_scope")):
        monkeypatch.setattr(module, attr, _refuse)
    install(plan)
    assert [db.point for db in dbi.injected_dropblocks(model)] == plan.points
    model.train()(torch.randn(2, 3, 64, 64)).sum().backward()


def test_the_plan_is_immutable_and_plan_returns_its_points():
    model = timm.create_model("resnet18", pretrained=False, num_classes=4)
    built = make_plan(model, "paper_generic")
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.scopes = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.scopes[0].points = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        built.scopes[0].variants[(True,)] = "x"  # type: ignore[index]
    assert dbi.plan(model, "paper_generic") == built.points
    dbi.inject(model, "paper_generic")
    assert [db.point for db in dbi.injected_dropblocks(model)] == built.points
