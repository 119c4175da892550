"""The command line."""

import pytest

from dropblock_inject.cli import main


def test_plan_prints_table_and_totals(capsys):
    assert main(["plan", "--model", "torchvision:resnet18", "--recipe", "resnet50_paper", "--input", "1x3x64x64"]) == 0
    out = capsys.readouterr().out
    assert "12 DropBlocks: 8 branch, 4 shortcut, in 4 modules" in out
    assert "layer3.0" in out and "downsample_1" in out


def test_recipes_and_show(capsys):
    assert main(["recipes"]) == 0
    assert "resnet50_paper" in capsys.readouterr().out
    assert main(["show", "resnet50_paper"]) == 0
    assert "drop_rate_scale: 0.25" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["plan", "--model", "torchvision:resnet18", "--recipe", "nope"], "unknown recipe 'nope'"),
    (["plan", "--model", "resnet18", "--recipe", "resnet50_paper"], "must look like"),
    (["plan", "--model", "torchvision:resnet18", "--recipe", "resnet50_paper", "--input", "1x3xA"], "--input"),
])
def test_errors_are_one_line_with_nonzero_exit(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
