"""Stage 3, shapes (``surgery.s12_shapes``): the example forward and what it records."""


import pytest
import torch
import torch.nn.functional as F
import torchvision
from _models import OPTIONAL_RECIPE, CachingNet, OptionalNet, SmallResNet, hook_state
from torch import nn

from dropblock_inject.surgery.s12_shapes import ShapeLog

import dropblock_inject as dbi


def test_example_forward_failing_falls_back_to_signature_defaults():
    # no example input, and the default 1x3x224x224 does not fit (1 input channel): defaults are used, so
    # b1 is traced with shortcut=None, and its real calls (with a shortcut) run the original forward
    model = OptionalNet(in_channels=1)
    dbi.inject(model, OPTIONAL_RECIPE)
    assert [(d.point.module, d.point.after) for d in dbi.injected_dropblocks(model)][2] == ("b1", "x")
    model.train()
    with pytest.warns(UserWarning, match="'OptionalShortcutBlock b1' was rewritten"):
        model(torch.randn(2, 1, 16, 16)).sum().backward()
    dbi.strip(model)
    with pytest.raises(dbi.SurgeryError, match="example input"):  # an explicit example input must work
        dbi.plan(model, OPTIONAL_RECIPE, example_input=torch.randn(1, 3, 16, 16))


def test_user_hooks_do_not_fire_during_the_example_forward():
    import torchvision
    from torch.nn.modules.module import register_module_forward_hook

    model = torchvision.models.resnet18().eval()
    calls = []
    model.layer3[0].register_forward_hook(lambda m, a, o: calls.append("module"))
    model.register_forward_pre_hook(lambda m, a: calls.append("pre"))
    handle = register_module_forward_hook(lambda m, a, o: calls.append("global"))
    try:
        before = hook_state(model)
        dbi.plan(model, "paper_generic")
        dbi.inject(model, "paper_generic", example_input=torch.randn(1, 3, 64, 64))
        assert calls == []
        dbi.strip(model)
        assert hook_state(model) == before
        model(torch.randn(1, 3, 64, 64))
        assert "module" in calls and "pre" in calls and "global" in calls  # still there, and they fire
    finally:
        handle.remove()


class _Raises(nn.Module):
    def forward(self, x):
        raise ValueError("boom")


@pytest.mark.parametrize("make", ["script", "raises", "bad_recipe"])
def test_failed_plan_leaves_no_hook_or_attribute(make):
    """ScriptModules are leaves, never hooked; a forward that raises or a bad recipe leaves the model as it
    was: no hook, attribute or buffer behind, and the same on a second try."""
    model = SmallResNet().eval()
    recipe = "resnet_paper"
    if make == "script":
        model.layer3[0].conv1 = torch.jit.script(model.layer3[0].conv1)
        model.layer4[1] = torch.jit.script(model.layer4[1])
    elif make == "raises":
        model.stem.append(_Raises())
    else:
        recipe = {"rules": [{"modules": ["nothing.*"]}]}
    before = hook_state(model)
    for _ in range(2):
        try:
            dbi.plan(model, recipe, example_input=torch.randn(1, 3, 64, 64))
        except (dbi.RecipeError, dbi.SurgeryError):
            assert make != "script"
        assert hook_state(model) == before


def test_shape_pass_on_an_empty_batch_keeps_the_example_shapes():
    model = CachingNet().eval()
    log = ShapeLog(model, torch.randn(2, 3, 64, 64))
    assert log.how == "empty batch"
    assert log.module_output("layer3") == (2, 16, 32, 32)
    assert "last_shape" not in model.__dict__  # what the forward assigned is undone


def test_strides_relative_to_the_first_convolution():
    """A model that resizes its input before the first conv: strides are the network's own."""

    class Resizing(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torchvision.models.resnet18()

        def forward(self, x):
            return self.net(F.interpolate(x, size=(64, 64)))

    points = dbi.plan(Resizing().eval(), "paper_generic", example_input=torch.randn(1, 3, 200, 200))
    assert {p.module.split(".")[1] for p in points} == {"layer3", "layer4"} and len(points) == 12


def test_space_to_depth_stem_counts_its_stride():
    """A stem that folds 2x2 pixels into channels before the first convolution (TResNet's SpaceToDepth):
    the strides still count from the input image."""
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(12, 64, 7, 1, 3, bias=False)  # stride 2 taken by the unshuffle instead
    model = nn.Sequential(nn.PixelUnshuffle(2), net).eval()
    points = dbi.plan(model, "paper_generic", example_input=torch.randn(1, 3, 128, 128))
    assert {p.module.split(".")[1] for p in points} == {"layer3", "layer4"} and len(points) == 12
