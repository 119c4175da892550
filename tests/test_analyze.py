"""Stage 4, analysis (``surgery.s19_analyze``): residual additions, shortcut and branch sides."""


import pytest
import timm
import torch
from _models import AddStyleNet, X, set_keep

import dropblock_inject as dbi


@pytest.mark.parametrize("project", [False, True])
@pytest.mark.parametrize("style", ["add", "radd", "iadd", "torch.add", "method", "add_"])
def test_every_residual_add_style(style, project):
    model = AddStyleNet(style, project).eval()
    ref = model(X)
    points = dbi.plan(model, {"rules": [{"modules": ["block"], "after": ["norm"], "shortcut": True}]})
    kinds = [(p.after, p.kind) for p in points]
    assert kinds[:2] == [("bn1", "branch"), ("bn2", "branch")]
    assert kinds[2] == ("proj_1" if project else "x", "shortcut")
    assert len(kinds) == 3
    dbi.inject(model, {"rules": [{"modules": ["block"], "after": ["norm"], "shortcut": True}]})
    assert torch.equal(model(X), ref)
    model.train()
    set_keep(model, 0.5)
    model(X).sum().backward()


@pytest.mark.parametrize("name, size, block, shortcut", [
    ("xception41", 96, "blocks.2", "shortcut"),      # stack of SeparableConv2d vs a ConvNormAct projection
    ("ghostnet_100", 64, "blocks.5.0", "shortcut_3"),  # GhostModules vs a Sequential(dw conv, bn, conv, bn)
])
def test_shortcut_is_the_side_with_fewer_convolutions(name, size, block, shortcut):
    """Branches made of modules that hold convs without being conv/norm layers themselves (SeparableConv2d,
    GhostModule) used to count as empty, so the projection was taken for the branch and the branch's last
    module for the shortcut, which also held DropBlocks of its own."""
    model = timm.create_model(name, pretrained=False)
    points = dbi.plan(model, "paper_generic", example_input=torch.randn(1, 3, size, size))
    assert [p.after for p in points if p.module == block and p.kind == "shortcut"] == [shortcut]
    dbi.inject(model, "paper_generic", example_input=torch.randn(1, 3, size, size))
    from tools.coverage import _nested_dropblocks

    assert _nested_dropblocks(model) == ""
