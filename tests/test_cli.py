"""The command line: output, one-line user errors with exit status 2 (the user's own model included), models built
offline, inputs, warnings, check, the demo's phases, help, start-up time and prog."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
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
     "no module named 'torchvison' (--model torchvison:resnet50 is read as module.path:factory); "
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
    from dropblock_inject import SurgeryError

    def fail(spec):
        raise SurgeryError("cannot trace layer3.0\nfx says: something\n")

    monkeypatch.setattr(cli, "build_model", fail)
    assert _status(["plan", *TORCHVISION]) == 2
    assert capsys.readouterr().err == "dbi: error: cannot trace layer3.0; fx says: something\n"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "dropblock_inject", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


@pytest.mark.parametrize("args, message", [
    pytest.param(["plan", "--model", "timm:resnet5O", "--recipe", "resnet50_paper"], "did you mean 'resnet50'",
                 marks=pytest.mark.slow),  # each case starts a process that imports torch: one is enough by default
    (["plan", *TORCHVISION, "--input", "0x3x224x224"], "must be 4 or 5 positive sizes"),
    pytest.param(["demo", "--steps", "0"], "must be a positive integer", marks=pytest.mark.slow),
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
    out, err = capsys.readouterr()
    assert "covers the whole" not in err, err  # the demo's block size fits its 64-px maps (block 2 at 2x2)
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


# ------------------------------------------------------------------------------------------------ your own model

USER_MODULE = '''
import warnings
import torch
import torchvision

def build():
    return torchvision.models.resnet18(weights=None)

def needs_argument(depth):
    return torchvision.models.resnet18(weights=None)

def raises():
    raise KeyError("no such config")

def returns_int():
    return 3

class Warns(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torchvision.models.resnet18(weights=None)

    def forward(self, x):
        warnings.warn("input is not normalised")
        return self.net(x)

def warns():
    return Warns()
'''


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A directory holding the user's modules, made the current directory (and forgotten afterwards)."""
    name = f"usermodels_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    (tmp_path / "broken_syntax.py").write_text("def build(:\n    pass\n")
    (tmp_path / "missing_dependency.py").write_text("import no_such_package_xyz\n")
    monkeypatch.chdir(tmp_path)
    yield tmp_path, name
    for module in (name, "broken_syntax", "missing_dependency"):
        sys.modules.pop(module, None)


@pytest.mark.parametrize("factory, message", [
    ("{m}:needs_argument", "{m}:needs_argument cannot be called without arguments (missing a required argument: "
                           "'depth'); --model takes a function that needs none"),
    ("{m}:raises", "{m}:raises() raised KeyError: 'no such config'"),
    ("{m}:returns_int", "{m}:returns_int() returned an object of type int, not a torch.nn.Module"),
    ("broken_syntax:build", "importing 'broken_syntax' failed: SyntaxError: "),
    ("missing_dependency:build", "importing 'missing_dependency' failed: ModuleNotFoundError: No module named "
                                 "'no_such_package_xyz' (a module it imports is missing: install it, or add its "
                                 "directory to PYTHONPATH)"),
    ("no_such_module_xyz:build", "no module named 'no_such_module_xyz' (--model no_such_module_xyz:build is read "
                                 "as module.path:factory); run from the directory that holds it, or add that "
                                 "directory to PYTHONPATH"),
])
def test_errors_of_the_users_model_are_one_line_with_exit_status_2(capsys, user_dir, factory, message):
    _, module = user_dir
    assert _status(["plan", "--model", factory.format(m=module), "--recipe", "resnet_paper"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dbi: error: ") and message.format(m=module) in err, err


def test_warnings_name_the_program_not_a_library_line(capsys, user_dir):
    _, module = user_dir
    assert _status(["plan", "--model", f"{module}:warns", "--recipe", "paper_generic", "--input", "1x3x64x64"]) == 0
    err = capsys.readouterr().err
    assert "dbi: warning: input is not normalised\n" in err
    assert ".py:" not in err  # no file:line of the library (nor of the user's module): the call was the command


CONSOLE_SCRIPT = "import sys\nfrom dropblock_inject.cli import main\nsys.exit(main())\n"  # what pip writes


def test_the_console_script_imports_the_users_module_from_the_current_directory(tmp_path, user_dir):
    """pip's console script runs with its own directory, not the current one, first on sys.path."""
    directory, module = user_dir
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dropblock-inject").write_text(CONSOLE_SCRIPT)
    result = subprocess.run([sys.executable, str(bin_dir / "dropblock-inject"), "plan", "--model", f"{module}:build",
                             "--recipe", "resnet_paper", "--input", "1x3x64x64"], capture_output=True, text=True,
                            cwd=directory, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "12 DropBlocks: 8 branch, 4 shortcut" in result.stdout


# ------------------------------------------------------------------------------------------------ models and inputs

def test_every_torchvision_builder_is_asked_for_no_weights_at_all():
    import torchvision

    from dropblock_inject._cli_models import torchvision_kwargs

    for name in torchvision.models.list_models():
        builder = torchvision.models.get_model_builder(name)
        kwargs = torchvision_kwargs(builder)
        weights = [p for p in inspect.signature(builder).parameters if p.startswith("weights")]
        assert weights and kwargs == dict.fromkeys(weights), name


def test_a_detector_is_built_offline(monkeypatch):
    """weights_backbone=None: torchvision would otherwise download the ImageNet backbone."""
    import torch.hub

    import dropblock_inject.cli as cli

    def no_network(*args, **kwargs):
        raise AssertionError(f"download attempted: {args}")

    import torchvision.models._api

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)  # cached or not, weights load here
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    model = cli.build_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn")
    assert type(model).__name__ == "FasterRCNN" and not model.training


def test_a_video_model_gets_a_video_input_by_default(capsys):
    assert main(["plan", "--model", "torchvision:r3d_18", "--recipe", "video_r3d"]) == 0
    out = capsys.readouterr().out
    assert "1x256x4x14x14" in out and "12 DropBlocks" in out  # the default clip, 1x3x16x112x112


def test_an_image_input_for_a_video_model_gets_a_hint(capsys):
    assert _status(["plan", "--model", "torchvision:r3d_18", "--recipe", "video_r3d", "--input", "1x3x64x64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(this model has 3-D convolutions: give it (N, C, T, H, W) clips, e.g. " \
                                   "--input 1x3x16x112x112)" in err, err


def test_the_recipe_is_checked_before_the_model_is_built(capsys, monkeypatch):
    import dropblock_inject.cli as cli

    def build(spec):
        raise AssertionError("the model was built before the recipe was checked")

    monkeypatch.setattr(cli, "build_model", build)
    assert _status(["plan", "--model", "torchvision:resnet152", "--recipe", "resnet_papr"]) == 2
    assert "unknown recipe 'resnet_papr'; did you mean 'resnet_paper'" in capsys.readouterr().err


def test_an_unknown_recipe_key_gets_did_you_mean(capsys, tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("dropblock:\n  blok_size: 5\nrules:\n  - modules: ['layer3.*']\n")
    assert _status(["show", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'dropblock.blok_size': unknown key" in err
    assert err.rstrip().endswith("did you mean 'block_size'?"), err


# ------------------------------------------------------------------------------------------------ check

def test_check_prints_a_report_with_a_verdict(capsys):
    assert main(["check", "--model", "torchvision:resnet18", "--recipe", "resnet_paper", "--input", "2x3x64x64",
                 "--no-export"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("checking torchvision:resnet18 with resnet_paper on a random 2x3x64x64 input ...")
    for stage in ("plan", "inject", "eval identity", "keep_prob 1 identity", "training step", "strip"):
        assert f"OK      {stage}" in out
    assert out.rstrip().endswith("verdict: PASS")


def test_check_exits_1_when_a_stage_fails(capsys, tmp_path):
    recipe = tmp_path / "keep_all.yaml"
    recipe.write_text("dropblock:\n  keep_prob: 1.0\nrules:\n  - modules: ['layer4.*']\n")
    assert main(["check", "--model", "torchvision:resnet18", "--recipe", str(recipe), "--input", "2x3x64x64",
                 "--no-export"]) == 1
    out = capsys.readouterr().out
    assert "FAIL    training step" in out and "what to do:" in out and "verdict: FAIL" in out


# ------------------------------------------------------------------------------------------------ start-up time

HELP_WITHOUT_THE_PACKAGE = """
import sys, time, types
start = time.perf_counter()
package = types.ModuleType("dropblock_inject")  # the command line alone, without the package's __init__
package.__path__ = [sys.argv[1]]
sys.modules["dropblock_inject"] = package
from dropblock_inject import cli
try:
    cli.main(["--help"])
except SystemExit:
    pass
print("torch" in sys.modules, time.perf_counter() - start)
"""


def test_the_command_line_imports_torch_only_for_commands_that_need_it():
    result = subprocess.run([sys.executable, "-c", HELP_WITHOUT_THE_PACKAGE, str(ROOT / "dropblock_inject")],
                            capture_output=True, text=True, timeout=300)
    imported, seconds = result.stdout.split()[-2:]
    assert imported == "False" and "usage:" in result.stdout, result.stdout + result.stderr
    assert float(seconds) < 0.5


def test_help_answers_in_half_a_second():
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dropblock_inject", "--help"], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0 and time.perf_counter() - start < 0.5


def test_plan_totals_are_grammatical(capsys, tmp_path):
    recipe = tmp_path / "one_block.yaml"
    recipe.write_text("rules:\n  - modules: ['layer4.1']\n    shortcut: true\n")
    assert main(["plan", "--model", "torchvision:resnet18", "--recipe", str(recipe), "--input", "1x3x64x64"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("3 DropBlocks: 2 branch, 1 shortcut, in 1 module")
