"""Stage 3, shapes (``surgery.shapes``): the example forward and what it records."""


import pytest
import torch
from _models import OPTIONAL_RECIPE, OptionalNet

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
