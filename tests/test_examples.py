"""Smoke tests of the examples (the full regularization experiment is documented in the README)."""

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "regularization_experiment.py"


@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location("regularization_experiment", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# one thread: the smoke test stays fast on a busy 2-core machine, where two threads oversubscribe
QUICK = ["--quick", "--threads", "1"]


def test_quick_run_prints_the_table(experiment, capsys):
    runs = experiment.main(QUICK)
    out = capsys.readouterr().out
    assert [r.arm for r in runs] == list(experiment.ARMS) and {r.seed for r in runs} == {0}
    for r in runs:
        assert 0.0 <= r.test_acc <= 1.0 and 0.0 <= r.train_acc <= 1.0
        # one epoch: the training loss is already below chance level, log(10) (eval accuracy needs more epochs
        # for BatchNorm's running statistics to settle)
        assert 0.0 < r.train_loss < math.log(10)
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| arm | test accuracy (%)") and rows[5] == "| arm | seed 0 |"
    assert [row.split(" | ")[0][2:] for row in rows[1:5]] == list(experiment.ARMS)
    for row, per_seed, run in zip(rows[1:5], rows[6:], runs):
        assert re.search(rf"\| {100 * run.test_acc:.2f} ± 0\.00 \|", row)
        assert per_seed == f"| {run.arm} | {100 * run.test_acc:.2f} |"
    assert "9 DropBlocks: 6 branch, 3 shortcut" in out  # the inline recipe's plan
    # chance-level accuracy after one epoch is expected, and the output says so
    assert out.rstrip().endswith("only checks the pipeline (inject, schedule, train, strip, evaluate): test accuracy "
                                 "near chance (10%) is expected, as BatchNorm's running statistics have not "
                                 "settled; compare the arms with the default 40 epochs")


def test_the_scheduled_arm_steps_the_scheduler_every_step(experiment, monkeypatch):
    import dropblock_inject as dbi

    seen = {}
    real_step = dbi.KeepProbScheduler.step

    def spy_step(self, global_step):
        seen.setdefault("steps", []).append(global_step)
        return real_step(self, global_step)

    monkeypatch.setattr(dbi.KeepProbScheduler, "step", spy_step)
    runs = experiment.main([*QUICK, "--arms", "dropblock+schedule"])
    assert len(runs) == 1 and runs[0].arm == "dropblock+schedule"
    steps_per_epoch = 449 // 64  # 1797 digits, a quarter for training
    # step(0) at construction, then once per training step
    assert seen["steps"] == [0, *range(steps_per_epoch)]


def test_table_pairs_by_seed(experiment):
    Run = experiment.Run
    runs = [Run("baseline", 0, 0.90, 1.0, 0.1, 1.0), Run("baseline", 1, 0.80, 1.0, 0.1, 1.0),
            Run("dropout", 0, 0.92, 0.99, 0.2, 1.0), Run("dropout", 1, 0.84, 0.98, 0.2, 1.0)]
    table = experiment.table(runs)
    assert "| baseline | 85.00 ± 7.07 | — | 100.00 ± 0.00 | 0.100 ± 0.000 | 2 |" in table
    assert "| dropout | 88.00 ± 5.66 | 3.00 ± 1.41 | 98.50 ± 0.71 | 0.200 ± 0.000 | 2 |" in table
    assert experiment.per_seed_table(runs[:3]).splitlines() == [
        "| arm | seed 0 | seed 1 |", "|---|---|---|", "| baseline | 90.00 | 80.00 |", "| dropout | 92.00 | — |"]


# ------------------------------------------------------------------------------------------------ fine-tune examples

EXAMPLES = EXAMPLE.parent
TINY = ["--steps", "3", "--batch-size", "8", "--image-size", "64"]  # 32 px leaves 1x1 maps in layer4


def _load_example(name, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as when run as a script: the examples import each other
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_finetune_plain_example_strips_and_exports(monkeypatch, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    result = _load_example("finetune_plain", monkeypatch).main([*TINY, "--onnx", str(tmp_path / "m.onnx")])
    assert (tmp_path / "m.onnx").stat().st_size > 0
    assert result["max_diff"] < 1e-4 and 0.0 <= result["accuracy"] <= 1.0
    out = capsys.readouterr().out
    assert "DropBlocks:" in out  # the plan table
    # the keep_prob the last step ran with, and where the ramp ends, as the docstring explains
    assert result["keep_prob"] == pytest.approx(1 - 2 / 3 * 0.1) and result["final_keep_prob"] == 0.9
    assert ("the last step (global step 2) ran at keep_prob 0.9333 (per DropBlock: [0.9333, 0.9833]); the ramp "
            "reaches 0.9 at step 3") in out


def _torchrun() -> list[str]:
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.slow  # two processes, each importing torch and training
def test_finetune_plain_example_under_torchrun_ddp():
    """The README's multi-process command, small: 2 CPU processes, DDP over gloo."""
    pytest.importorskip("onnxruntime")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    cmd = [*_torchrun(), "--standalone", "--nproc_per_node", "2", str(EXAMPLES / "finetune_plain.py"), *TINY]
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent)}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=EXAMPLES.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "2 processes (DDP, gloo), batch 8 per process" in out
    # the example gathers every rank's keep_probs and weights and checks they agree
    assert "all 2 ranks: the same keep_prob at every DropBlock and the same weights" in out
    assert out.count("trained 3 steps") == 1 and "onnxruntime vs PyTorch max |diff|" in out  # rank 0 only


@pytest.mark.slow
def test_finetune_lightning_example_strips_and_exports(monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("lightning")
    result = _load_example("finetune_lightning", monkeypatch).main(TINY)
    assert result["max_diff"] < 1e-4 and 0.0 <= result["accuracy"] <= 1.0
    assert result["keep_prob"] < 1.0  # the schedule ran


@pytest.mark.parametrize("name, model", [("finetune_plain", "ResNet-18"), ("finetune_lightning", "ResNet-18")])
def test_examples_use_the_recipe_made_for_their_model(name, model):
    """The examples fine-tune a torchvision ResNet-18: their default recipe must be the one written for it."""
    import dropblock_inject as dbi

    source = (EXAMPLES / f"{name}.py").read_text()
    assert "torchvision.models.resnet18(" in source
    default = re.search(r'add_argument\("--recipe", default="(\w+)"', source).group(1)
    assert model in dbi.load_recipe(default).description, default
