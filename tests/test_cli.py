"""The command line: output, one-line user errors with exit status 2, the demo's phases, help and prog."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dropblock_inject.cli import main

ROOT = Path(__file__).resolve().parents[1]
TORCHVISION = ["--model", "torchvision:resnet18", "--recipe", "resnet50_paper"]


def test_plan_prints_table_and_totals(capsys):
    assert main(["plan", *TORCHVISION, "--input", "1x3x64x64"]) == 0
    out = capsys.readouterr().out
    assert "12 DropBlocks: 8 branch, 4 shortcut, in 4 modules" in out
    assert "layer3.0" in out and "downsample_1" in out


def test_recipes_and_show(capsys):
    assert main(["recipes"]) == 0
    assert "resnet50_paper" in capsys.readouterr().out
    assert main(["show", "resnet50_paper"]) == 0
    assert "drop_rate_scale: 0.25" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ user errors

ERRORS = [  # argv, what the one line must say
    (["plan", "--model", "torchvision:resnet18", "--recipe", "nope"], "unknown recipe 'nope'"),
    (["plan", "--model", "resnet18", "--recipe", "resnet50_paper"], "must look like torchvision:resnet50"),
    (["plan", "--model", "torchvision:resnet5O", "--recipe", "resnet50_paper"],
     "unknown torchvision model 'resnet5O'; did you mean 'resnet50'"),
    (["plan", "--model", "timm:resnet5O", "--recipe", "resnet50_paper"],
     "unknown timm model 'resnet5O'; did you mean 'resnet50'"),
    (["plan", "--model", "timm:resnet18.a1_in1kk", "--recipe", "resnet50_paper"],
     "timm cannot build 'resnet18.a1_in1kk': Invalid pretrained tag (a1_in1kk) for resnet18; did you mean "
     "'resnet18.a1_in1k'"),
    (["plan", "--model", "torchvison:resnet50", "--recipe", "resnet50_paper"],
     "'torchvison' was read as a Python module path (not torchvision/timm): No module named 'torchvison'; "
     "did you mean 'torchvision:resnet50'?"),
    (["plan", "--model", "torch.nn:Linaer", "--recipe", "resnet50_paper"],
     "module 'torch.nn' has no callable 'Linaer'; did you mean 'Linear'"),
    (["plan", *TORCHVISION, "--input", "1x3xA"], "argument --input: must be 4 or 5 positive sizes"),
    (["plan", *TORCHVISION, "--input", "1x3x-5x224"], "got '1x3x-5x224'"),
    (["plan", *TORCHVISION, "--input", "0x3x224x224"], "got '0x3x224x224'"),
    (["plan", *TORCHVISION, "--input", "3x224x224"], "got '3x224x224'"),
    (["plan", "--model", "torchvision:resnet18"], "the following arguments are required: --recipe"),
    (["demo", "--steps", "0"], "argument --steps: must be a positive integer, got '0'"),
    (["demo", "--batch", "-1"], "argument --batch: must be a positive integer, got '-1'"),
    (["demo", "--size", "x"], "argument --size: must be a positive integer, got 'x'"),
    (["viz", "--out", "unused", "--steps", "0"], "argument --steps: must be a positive integer"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]
DEMO_32PX = ["demo", "--steps", "2", "--batch", "2", "--size", "32"]


def _status(argv: list[str]) -> int:
    try:
        return main(argv, prog="dbi")
    except SystemExit as e:  # argparse's errors
        return e.code


@pytest.mark.parametrize("argv, message", ERRORS, ids=[" ".join(a)[:60] for a, _ in ERRORS])
def test_user_errors_are_one_line_with_exit_status_2(capsys, argv, message):
    assert _status(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("dbi")
    assert message in captured.err
    assert captured.out == ""  # nothing was done before the error (demo --steps 0 neither plans nor injects)


def test_multi_line_errors_are_joined_on_one_line(capsys, monkeypatch):
    import dropblock_inject.cli as cli

    def fail(spec):
        raise cli.SurgeryError("cannot trace layer3.0\nfx says: something\n")

    monkeypatch.setattr(cli, "build_model", fail)
    assert _status(["plan", *TORCHVISION]) == 2
    assert capsys.readouterr().err == "dbi: error: cannot trace layer3.0; fx says: something\n"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "dropblock_inject", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["plan", "--model", "timm:resnet5O", "--recipe", "resnet50_paper"], "did you mean 'resnet50'"),
    (["plan", *TORCHVISION, "--input", "0x3x224x224"], "must be 4 or 5 positive sizes"),
    (["demo", "--steps", "0"], "must be a positive integer"),
])
def test_user_errors_from_a_real_process(args, message):
    result = _run(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert result.stderr.startswith("python -m dropblock_inject") and message in result.stderr
    assert result.stdout == ""


# ------------------------------------------------------------------------------------------------ help and prog

def test_help_is_plain_text_and_names_the_program():
    result = _run("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m dropblock_inject ")
    assert "``" not in result.stdout and "Insert DropBlock into an existing PyTorch CNN" in result.stdout
    script = Path(sys.executable).with_name("dropblock-inject")
    if script.exists():
        result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and result.stdout.startswith("usage: dropblock-inject ")


def test_demo_help_describes_every_option_with_its_default(capsys):
    assert _status(["demo", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--steps STEPS training steps (keep_prob ramps over them) (default: 4)" in out
    assert "--batch BATCH images per training step (default: 4)" in out
    assert "--size SIZE side of the square synthetic images, in pixels (default: 96)" in out


# ------------------------------------------------------------------------------------------------ demo

PHASES = ["building torchvision resnet50", "planning resnet50_paper", "injecting resnet50_paper",
          "training 2 steps, batch 2, 64 px", "step 0:", "step 1:",
          "(the ramp reaches keep_prob 0.9 at step 2 = total_steps", "stripping DropBlock"]


def _in_order(out: str, phrases: list[str]) -> bool:
    positions = [out.find(p) for p in phrases]
    return -1 not in positions and positions == sorted(positions)


@pytest.mark.slow  # ~20 s on 2 busy cores, most of it the ONNX export of ResNet-50
def test_demo_says_what_it_does_and_checks_onnx(capsys):
    pytest.importorskip("onnxruntime")
    assert main(["demo", "--steps", "2", "--batch", "2", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert _in_order(out, [*PHASES, "exporting the stripped model to ONNX", "running it in onnxruntime",
                           "onnxruntime vs PyTorch: max |diff|", "demo OK"]), out


def test_demo_without_onnxruntime_skips_the_check_and_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: import fails
    assert main(["demo", "--steps", "2", "--batch", "2", "--size", "64"]) == 0
    out = capsys.readouterr().out
    note = ('skipped the ONNX export and onnxruntime check: onnxruntime not installed (install the dev extra: '
            'pip install -e ".[dev]")')
    assert _in_order(out, [*PHASES, note, "demo OK"]), out
    assert "exporting" not in out


@pytest.mark.slow  # ~20 s on 2 busy cores for a corner case
def test_demo_on_images_too_small_for_resnet50_says_so(capsys):
    """At 32 px the eval output of the trained (plain torchvision) ResNet-50 overflows; no false ONNX alarm."""
    assert _status(DEMO_32PX) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eval output is not finite" in err and "the default 96 works" in err
