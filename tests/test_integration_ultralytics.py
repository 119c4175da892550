"""Ultralytics integration: DropBlock in the model that YOLO.train trains, checkpoints and exports free of it.

The training runs go through ``tests/_ultralytics_train.py`` in a subprocess: Ultralytics fixes its settings
directory when first imported, so only a fresh process can be kept off the home directory and the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from _ultralytics_train import load_example
from tools.coverage.zoo_detect import ultralytics_offline

pytest.importorskip("cv2")


_SETTINGS = tempfile.TemporaryDirectory(prefix="ultralytics_settings_")  # removed when the interpreter exits


if "ultralytics" not in sys.modules:  # it reads its settings directory and offline flag once, on import
    with ultralytics_offline(_SETTINGS.name):
        pytest.importorskip("ultralytics")

import dropblock_inject as dbi  # noqa: E402
from dropblock_inject.integrations.ultralytics import DropBlockCallbacks, add_dropblock  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "_ultralytics_train.py"


def _offline_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a subprocess that keeps Ultralytics, matplotlib and HOME inside ``tmp_path``."""
    config = load_example().offline_config_dir(tmp_path / "config")
    (tmp_path / "home").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(HOME=str(tmp_path / "home"), MPLCONFIGDIR=str(tmp_path / "mpl"), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1", YOLO_OFFLINE="1", YOLO_AUTOINSTALL="false", YOLO_CONFIG_DIR=str(config))
    return env


def _drive(scenario: str, tmp_path: Path) -> dict:
    env = _offline_env(tmp_path)
    run = subprocess.run([sys.executable, str(DRIVER), scenario, str(tmp_path)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    result = json.loads((tmp_path / f"{scenario}.json").read_text())
    assert result["network_attempts"] == []
    assert list((tmp_path / "home").iterdir()) == []  # nothing written to the home directory
    return result


_LOAD_WITHOUT_DROPBLOCK_INJECT = textwrap.dedent("""
    import importlib.abc, json, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "dropblock_inject":
                raise ImportError("dropblock_inject must not be imported to load a checkpoint")

    sys.meta_path.insert(0, Refuse())
    import torch
    from ultralytics import YOLO

    out = {}
    for path in sys.argv[1:]:
        yolo = YOLO(path)
        net = yolo.model.float().eval()
        with torch.no_grad():
            y = net(torch.rand(2, 3, 64, 64))
        y = y[0] if isinstance(y, (list, tuple)) else y
        out[path] = {"modules": sorted({type(m).__module__ for m in net.modules()}), "finite": bool(y.isfinite().all()),
                     "shape": list(y.shape)}
    out["imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "dropblock_inject")
    print(json.dumps(out))
""")


def _load_without_dropblock_inject(paths: list[str], env: dict[str, str], cwd: Path) -> dict:
    env = {**env, "PYTHONPATH": ""}  # not even findable from the checkout
    run = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_DROPBLOCK_INJECT, *paths], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _assert_plain_checkpoints(paths: list[str], tmp_path: Path) -> None:
    loaded = _load_without_dropblock_inject(paths, _offline_env(tmp_path), tmp_path)
    assert loaded.pop("imported") == []
    for path in paths:
        assert Path(path).is_file()
        assert not any(m.startswith("dropblock_inject") for m in loaded[path]["modules"]), loaded[path]["modules"]
        assert loaded[path]["finite"] and loaded[path]["shape"][0] == 2


# --------------------------------------------------------------------------------------------------------------
# registration (no training)


def test_add_dropblock_registers_its_callbacks_once():
    from ultralytics import YOLO

    yolo = YOLO("yolov8n.yaml")
    cb = add_dropblock(yolo, "paper_generic", target=0.8)
    assert isinstance(cb, DropBlockCallbacks) and cb.scheduler is None and cb.dropblocks == ()
    assert cb.recipe.name == "paper_generic" and cb.target == 0.8
    for event in ("on_pretrain_routine_end", "on_train_batch_start", "on_train_end", "teardown"):
        assert any(getattr(f, "__self__", None) is cb for f in yolo.callbacks[event]), event
    assert dbi.injected_dropblocks(yolo.model) == []  # nothing injected before a trainer builds its model
    with pytest.raises(ValueError, match="already has DropBlock callbacks"):
        add_dropblock(yolo)


def test_add_dropblock_rejects_what_it_cannot_drive():
    from ultralytics import YOLO

    yolo = YOLO("yolov8n.yaml")
    with pytest.raises(TypeError, match=r"got DetectionModel \(it is a torch module"):
        add_dropblock(yolo.model)
    with pytest.raises(dbi.RecipeError, match="no_such_recipe"):
        add_dropblock(yolo, "no_such_recipe")
    with pytest.raises(ValueError, match="target must be a keep_prob in"):
        add_dropblock(yolo, target=1.5)
    with pytest.raises(ValueError, match="imgsz must be a positive int"):
        add_dropblock(yolo, imgsz=0)
    assert not any(isinstance(getattr(f, "__self__", None), DropBlockCallbacks)
                   for fs in yolo.callbacks.values() for f in fs)  # a failed call registers nothing


def test_missing_ultralytics_raises_install_hint(monkeypatch):
    import importlib

    for name in ("ultralytics", "ultralytics.engine.model", "ultralytics.engine.trainer", "ultralytics.utils",
                 "ultralytics.utils.torch_utils"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    monkeypatch.delitem(sys.modules, "dropblock_inject.integrations.ultralytics")
    with pytest.raises(ImportError, match=r"pip install dropblock_inject\[ultralytics\]"):
        importlib.import_module("dropblock_inject.integrations.ultralytics")


@pytest.mark.filterwarnings("ignore:cannot trace module")
def test_callbacks_pickle_with_their_configuration_only():
    """The multi-GPU launch cloudpickles the callbacks: the configuration travels, a past run's model does not."""
    cloudpickle = pytest.importorskip("cloudpickle")
    from ultralytics import YOLO

    yolo = YOLO("yolov8n.yaml")
    cb = add_dropblock(yolo, "paper_generic", target=0.7, total_steps=12)
    net = dbi.inject(yolo.model, "paper_generic", example_input=torch.zeros(1, 3, 64, 64))
    cb.scheduler = dbi.KeepProbScheduler(net, 12)  # as after a run
    cb.step = 5
    events = cloudpickle.loads(cloudpickle.dumps(yolo.callbacks))
    copy = events["on_train_batch_start"][-1].__self__
    assert isinstance(copy, DropBlockCallbacks) and copy is not cb
    assert (copy.recipe, copy.target, copy.total_steps) == (cb.recipe, 0.7, 12)
    assert copy.scheduler is None and copy.step == -1
    assert all(f.__self__ is copy for e, fs in events.items() for f in fs
               if isinstance(getattr(f, "__self__", None), DropBlockCallbacks))


# --------------------------------------------------------------------------------------------------------------
# the callbacks against a stand-in trainer: the attributes of ultralytics.engine.trainer.BaseTrainer they read


def _trainer(epochs: int = 2, batches: int = 3):
    from types import SimpleNamespace

    import torchvision
    from ultralytics.utils.torch_utils import ModelEMA

    model = torchvision.models.resnet18(weights=None, num_classes=4)
    return SimpleNamespace(model=model, ema=ModelEMA(model), epochs=epochs, epoch=0, train_loader=[None] * batches,
                           args=SimpleNamespace(imgsz=64), device=torch.device("cpu"))


def _run_epoch(cb, trainer, epoch: int, batches: int | None = None) -> list[int]:
    trainer.epoch = epoch
    cb.on_train_epoch_start(trainer)
    steps = []
    for _ in range(len(trainer.train_loader) if batches is None else batches):
        cb.on_train_batch_start(trainer)
        steps.append(cb.step)
        cb.on_train_batch_end(trainer)
    return steps


def test_keep_prob_follows_the_trainers_iteration_and_run_length():
    trainer = _trainer(epochs=2, batches=3)
    cb = DropBlockCallbacks("resnet50_paper", target=0.5)
    cb.on_pretrain_routine_end(trainer)
    assert len(cb.dropblocks) == len(dbi.injected_dropblocks(trainer.model)) > 0
    assert cb.scheduler.total_steps == 6 and cb.dropblocks[-1].keep_prob == 1.0
    assert _run_epoch(cb, trainer, 0) == [0, 1, 2]
    assert cb.scheduler.keep_prob == pytest.approx(1 - 2 / 6 * 0.5)
    # the trainer restarts an epoch after an out-of-memory error with half the batch: twice the batches
    assert _run_epoch(cb, trainer, 1, batches=2) == [3, 4]
    trainer.train_loader = [None] * 6
    assert _run_epoch(cb, trainer, 1) == [6, 7, 8, 9, 10, 11] and cb.scheduler.total_steps == 12
    # time= re-estimates the number of epochs after each one
    trainer.epochs = 4
    assert _run_epoch(cb, trainer, 2)[0] == 12 and cb.scheduler.total_steps == 24
    assert cb.scheduler.keep_prob == pytest.approx(1 - 17 / 24 * 0.5)


def test_a_given_run_length_is_kept():
    trainer = _trainer(epochs=2, batches=3)
    cb = DropBlockCallbacks("resnet50_paper", total_steps=4)
    cb.on_pretrain_routine_end(trainer)
    _run_epoch(cb, trainer, 0)
    _run_epoch(cb, trainer, 1)
    assert cb.scheduler.total_steps == 4 and cb.step == 5 and cb.scheduler.keep_prob == pytest.approx(0.9)


def test_an_ema_rebuilt_from_the_injected_model_is_stripped_before_the_checkpoint():
    """The trainer's NaN recovery rebuilds its EMA from the (injected) model; checkpoints pickle that EMA."""
    from ultralytics.utils.torch_utils import ModelEMA

    trainer = _trainer()
    cb = DropBlockCallbacks("resnet50_paper")
    cb.on_pretrain_routine_end(trainer)
    assert dbi.injected_dropblocks(trainer.ema.ema) == []  # copied before the injection
    trainer.ema = ModelEMA(trainer.model)
    assert len(dbi.injected_dropblocks(trainer.ema.ema)) == len(cb.dropblocks)
    cb.on_train_epoch_end(trainer)
    assert dbi.injected_dropblocks(trainer.ema.ema) == []
    # the EMA still averages the trained model, key by key
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    trainer.ema.update(trainer.model)
    ema, model = trainer.ema.ema.state_dict(), trainer.model.state_dict()
    assert ema.keys() == model.keys()
    assert torch.allclose(ema["fc.weight"], model["fc.weight"], atol=1e-2)  # moved to the model (decay ~5e-4)


def test_the_trainers_model_is_stripped_at_the_end_or_on_failure():
    for event in ("on_train_end", "teardown"):
        trainer = _trainer()
        cb = DropBlockCallbacks("resnet50_paper")
        cb.on_pretrain_routine_end(trainer)
        getattr(cb, event)(trainer)
        assert dbi.injected_dropblocks(trainer.model) == [], event
        getattr(cb, event)(trainer)  # twice (teardown follows on_train_end): a no-op
    trainer = _trainer()
    cb = DropBlockCallbacks("resnet50_paper", strip_on_train_end=False)
    cb.on_pretrain_routine_end(trainer)
    cb.on_train_end(trainer)
    cb.teardown(trainer)
    assert len(dbi.injected_dropblocks(trainer.model)) == len(cb.dropblocks) > 0


def test_a_batch_before_the_setup_callback_is_an_error():
    cb = DropBlockCallbacks("resnet50_paper")
    with pytest.raises(RuntimeError, match="before on_pretrain_routine_end"):
        cb.on_train_batch_start(_trainer())


# --------------------------------------------------------------------------------------------------------------
# end to end, through YOLO.train


def _expected_keep(step: int, total: int, target: float, scale: float) -> float:
    return 1.0 - min(step / total, 1.0) * (1.0 - target) * scale


def test_train_resume_checkpoints_and_export(tmp_path):  # about 30 s on two busy cores
    r = _drive("train", tmp_path)
    nb, total = r["nb"], r["total_steps"]
    assert r["n_dropblocks"] > 0 and len(r["points"]) == r["n_dropblocks"]
    assert total == 2 * nb  # epochs * batches per epoch

    # the first run stopped after epoch 0's checkpoint; the second resumed at epoch 1 and ran to the end
    assert r["interrupted"] == "stopped after epoch 0"
    assert [b["epoch"] for b in r["batches"]] == [0] * nb + [1] * nb
    assert [b["step"] for b in r["batches"]] == list(range(2 * nb))  # epoch * nb + i, continued on resume
    for b in r["batches"]:
        for (_, _, scale), keep in zip(r["points"], b["keep_probs"]):
            assert keep == pytest.approx(_expected_keep(b["step"], total, 0.5, scale), abs=1e-9)
    assert min(b["keep_probs"][0] for b in r["batches"]) < 1.0

    # DropBlocks ran in training mode and dropped; nothing ran them in eval (validation uses the plain EMA)
    for hooks in r["hooks"]:
        assert hooks["train_calls"] == nb * r["n_dropblocks"]  # each DropBlock once per batch
        assert hooks["eval_calls"] == 0
    resumed = r["hooks"][1]  # keep_prob 0.75 .. 0.625 at scale 1
    assert 0.01 < resumed["dropped"] / resumed["nonzero"] < 0.5

    # the EMA never held a DropBlock when checkpoints were written; checkpoints hold only Ultralytics/torch modules
    assert r["ema_dropblocks_at_save"] == [0, 0]
    assert [s["epoch"] for s in r["saved"]] == [0, 1] and r["saved"][0]["has_optimizer"]
    for saved in r["saved"]:
        assert not any(m.startswith("dropblock_inject") for m in saved["modules"])

    # fine-tuning trains the model yolo.model points to; stripped after the interrupted run (teardown) and after
    # the finished one (on_train_end, and yolo.model is then best.pt)
    assert r["yolo_model_is_trainer_model"] and r["yolo_model_dropblocks_during"] == r["n_dropblocks"]
    assert r["trainer_dropblocks_after"] == [0, 0] and r["yolo_model_dropblocks_after_failure"] == 0
    assert r["yolo_model_dropblocks"] == 0
    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(onnx.load(r["onnx"]))
    _assert_plain_checkpoints(r["weights"], tmp_path)


@pytest.mark.slow
def test_the_multi_gpu_launch_script_runs_the_callbacks(tmp_path):
    """Ultralytics' DDP workers rebuild the trainer from a cloudpickled state: they inject and train too."""
    pytest.importorskip("cloudpickle")
    r = _drive("ddp_file", tmp_path)
    assert r["returncode"] == 0, r["output"]
    assert "DropBlock: " in r["output"] and "inserted by recipe 'paper_generic'" in r["output"]
    _assert_plain_checkpoints(r["weights"], tmp_path)


@pytest.mark.slow
def test_example_runs_offline(tmp_path):
    env = _offline_env(tmp_path)
    run = subprocess.run([sys.executable, str(REPO / "examples" / "finetune_ultralytics.py"), "--workdir",
                          str(tmp_path / "work")], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    assert "trained with " in run.stdout and "DropBlocks; keep_prob at the last iteration (3)" in run.stdout
    assert Path(run.stdout.split("ONNX: ")[-1].strip()).is_file()
    assert list((tmp_path / "home").iterdir()) == []
