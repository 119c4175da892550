"""Lightning and Hugging Face callbacks: real (tiny, CPU) training runs follow the schedule, strip, resume."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import dropblock_inject as dbi
from dropblock_inject import injected_dropblocks

from _models import SmallResNet

RECIPE = {
    "dropblock": {"block_size": 3, "keep_prob": 0.9},
    "schedule": {"start_keep_prob": 1.0, "ramp_fraction": 1.0},
    "rules": [
        {"name": "group3", "modules": ["layer3.*"], "after": ["norm"], "shortcut": True, "drop_rate_scale": 0.25},
        {"name": "group4", "modules": ["layer4.*"], "after": ["norm"], "shortcut": True},
    ],
}


def SmallNet() -> SmallResNet:  # noqa: N802
    return SmallResNet((("layer3", (2,)), ("layer4", (2,))), num_classes=4, stem_norm=False, project=True)


def expected(step: int, total: int, scale: float, final: float = 0.9) -> float:
    return 1 - min(step / total, 1) * (1 - final) * scale


def check_trace(trace: list[tuple[int, list[float]]], scales: list[float], total: int, final: float = 0.9) -> None:
    for step, values in trace:
        want = [expected(step, total, s, final) for s in scales]
        assert values == pytest.approx(want, abs=1e-12), f"step {step}"


@pytest.fixture(autouse=True)
def _quiet_single_thread(caplog):
    """Quiet logs; one intra-op thread (tiny models run faster that way, and a busy CI box does not stall)."""
    caplog.set_level(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------
# Lightning


pl = pytest.importorskip("lightning.pytorch")
from dropblock_inject.integrations.lightning import DropBlockScheduleCallback as LightningCallback  # noqa: E402


class LitNet(pl.LightningModule):
    def __init__(self, n: int = 24) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = dbi.inject(SmallNet(), RECIPE)
        self.n = n
        self.trace: list[tuple[int, list[float]]] = []
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        dbs = injected_dropblocks(self.net)
        values = [db.keep_prob for db in dbs]
        assert [db.keep_prob_tensor.item() for db in dbs] == pytest.approx(values, abs=1e-7)
        self.trace.append((self.trainer.global_step, values))
        loss = F.cross_entropy(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(self.n, 3, 16, 16, generator=g), torch.randint(0, 4, (self.n,), generator=g))
        return DataLoader(data, batch_size=4)


def lightning_trainer(max_steps: int = -1, **kw) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


def scales(net: nn.Module) -> list[float]:
    return [db.point.drop_rate_scale for db in injected_dropblocks(net)]


def test_lightning_fit_follows_schedule_and_strips():
    model = LitNet()
    sc = scales(model.net)
    assert sorted(set(sc)) == [0.25, 1.0]
    cb = LightningCallback(strip_on_fit_end=True)
    lightning_trainer(max_steps=6, callbacks=[cb]).fit(model)
    assert [s for s, _ in model.trace] == list(range(6))
    assert cb.scheduler.total_steps == 6  # from trainer.estimated_stepping_batches
    check_trace(model.trace, sc, total=6)
    assert model.trace[3][1][sc.index(1.0)] == pytest.approx(0.95)
    assert all(torch.isfinite(torch.tensor(model.losses)))
    # stripped at the end of fit: original modules only
    assert injected_dropblocks(model) == []
    assert not any(isinstance(m, dbi.DropBlock2d) for m in model.modules())
    assert not any(hasattr(m, "dropblocks") for m in model.modules())


def test_lightning_epochs_accumulation_target_no_strip():
    model = LitNet(n=32)  # 8 batches per epoch, 2 per optimizer step: 4 steps per epoch
    cb = LightningCallback(target=0.7)
    lightning_trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[cb]).fit(model)
    assert cb.scheduler.total_steps == 8
    assert [s for s, _ in model.trace] == [s for s in range(8) for _ in range(2)]
    check_trace(model.trace, scales(model.net), total=8, final=0.7)
    assert len(injected_dropblocks(model)) == len(scales(model.net)) > 0  # not stripped


def test_lightning_checkpoint_round_trip(tmp_path):
    # an uninterrupted 8-step run, for reference
    full = LitNet()
    lightning_trainer(max_steps=8, callbacks=[LightningCallback()]).fit(full)
    check_trace(full.trace, scales(full.net), total=8)
    # the same run interrupted after 4 steps ...
    first = LitNet()
    trainer = lightning_trainer(max_steps=4, callbacks=[LightningCallback(total_steps=8)])
    trainer.fit(first)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"]["DropBlockScheduleCallback"]
    assert state == {"version": 1, "total_steps": 8, "target": None, "last_step": 3}
    # ... and resumed with a fresh callback: the stored total_steps (8) wins over the new estimate (10)
    second = LitNet()
    cb = LightningCallback()
    lightning_trainer(max_steps=10, callbacks=[cb]).fit(second, ckpt_path=ckpt)
    assert cb.scheduler.total_steps == 8
    assert [s for s, _ in second.trace] == list(range(4, 10))
    assert second.trace[:4] == full.trace[4:]
    check_trace(second.trace, scales(second.net), total=8)


def test_lightning_callback_state_without_trainer():
    model = LitNet()
    cb = LightningCallback(total_steps=20)
    assert cb.state_dict() == {}
    cb.load_state_dict({"version": 1, "total_steps": 40, "target": 0.8, "last_step": 10})
    assert cb.state_dict()["total_steps"] == 40  # pending until fit starts

    class FakeTrainer:
        global_step = 10
        estimated_stepping_batches = 20

    cb.on_fit_start(FakeTrainer(), model)
    assert cb.scheduler.total_steps == 40 and cb.scheduler.target == 0.8
    assert cb.scheduler.keep_prob == pytest.approx(0.95)  # 1 - 10/40 * 0.2
    cb.on_train_batch_start(FakeTrainer(), model, None, 0)
    assert cb.state_dict()["last_step"] == 10
    with pytest.raises(ValueError, match="total_steps"):
        LightningCallback(total_steps=0)

    class EndlessTrainer:
        global_step = 0
        estimated_stepping_batches = float("inf")

    with pytest.raises(ValueError, match="max_steps"):
        LightningCallback().on_fit_start(EndlessTrainer(), model)
    with pytest.raises(ValueError, match="dropblock_inject.inject"):
        LightningCallback(total_steps=5).on_fit_start(EndlessTrainer(), pl.LightningModule())


def test_lightning_callback_is_a_callback_of_both_namespaces():
    assert isinstance(LightningCallback(), pl.Callback)
    try:
        import pytorch_lightning
    except ImportError:
        return
    assert isinstance(LightningCallback(), pytorch_lightning.Callback)


def test_missing_framework_raises_install_hint(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    monkeypatch.delitem(sys.modules, "dropblock_inject.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install dropblock_inject\[lightning\]"):
        importlib.import_module("dropblock_inject.integrations.lightning")
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "transformers.trainer_callback", None)
    monkeypatch.delitem(sys.modules, "dropblock_inject.integrations.transformers", raising=False)
    with pytest.raises(ImportError, match=r"pip install dropblock_inject\[transformers\]"):
        importlib.import_module("dropblock_inject.integrations.transformers")


# ----------------------------------------------------------------------------------------------------------
# Hugging Face transformers


class HFNet(nn.Module):
    """A plain nn.Module in the Trainer's calling convention: keyword inputs in, a dict with the loss out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = dbi.inject(SmallNet(), RECIPE)
        self.forward_values: list[list[float]] = []

    def forward(self, pixel_values, labels=None):
        self.forward_values.append([db.keep_prob for db in injected_dropblocks(self.net)])
        logits = self.net(pixel_values)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Pixels(Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def hf_train(tmp_path: Path, callback, max_steps: int, resume: str | None = None, **kw):
    transformers = pytest.importorskip("transformers")

    class StepRecorder(transformers.TrainerCallback):
        def __init__(self):
            self.steps: list[int] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    recorder = StepRecorder()
    model = HFNet()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2, report_to=[],
        use_cpu=True, learning_rate=0.01, logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, **{"save_strategy": "no", **kw})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Pixels(),
                                   callbacks=[callback, recorder])
    trainer.train(resume_from_checkpoint=resume)
    return model, recorder.steps, trainer


def test_transformers_trainer_follows_schedule_and_strips(tmp_path):
    from dropblock_inject.integrations.transformers import DropBlockScheduleCallback

    cb = DropBlockScheduleCallback(strip_on_train_end=True)
    model, steps, _ = hf_train(tmp_path, cb, max_steps=5)
    assert steps == list(range(5))
    assert cb.scheduler.total_steps == 5  # from state.max_steps
    sc = [db.point.drop_rate_scale for db in cb.scheduler.dropblocks]
    assert sorted(set(sc)) == [0.25, 1.0]
    check_trace(list(zip(steps, model.forward_values)), sc, total=5)
    assert injected_dropblocks(model) == []  # stripped at the end
    assert not any(isinstance(m, dbi.DropBlock2d) for m in model.modules())


def test_transformers_resume_from_checkpoint(tmp_path):
    from dropblock_inject.integrations.transformers import DropBlockScheduleCallback

    full, steps, _ = hf_train(tmp_path / "full", DropBlockScheduleCallback(target=0.8), max_steps=6)
    sc = [db.point.drop_rate_scale for db in injected_dropblocks(full)]
    check_trace(list(zip(steps, full.forward_values)), sc, total=6, final=0.8)

    out = tmp_path / "run"
    hf_train(out, DropBlockScheduleCallback(target=0.8), max_steps=6, save_strategy="steps", save_steps=3,
             save_only_model=False)
    ckpt = out / "checkpoint-3"
    stored = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]
    assert stored["DropBlockScheduleCallback"] == {
        "args": {"total_steps": 6, "target": 0.8, "strip_on_train_end": False}, "attributes": {}}
    # resume with a fresh callback: the schedule is a function of the restored global step
    cb = DropBlockScheduleCallback(target=0.8)
    resumed, steps, trainer = hf_train(out, cb, max_steps=6, resume=os.fspath(ckpt))
    assert steps == [3, 4, 5]
    assert resumed.forward_values == full.forward_values[3:]
    # restore_callback_states_from_checkpoint rebuilds the callback with the stored run length
    cb = DropBlockScheduleCallback(target=0.5)
    resumed, steps, trainer = hf_train(out, cb, max_steps=6, resume=os.fspath(ckpt),
                                       restore_callback_states_from_checkpoint=True)
    assert resumed.forward_values == full.forward_values[3:]


def test_transformers_callback_errors():
    from dropblock_inject.integrations.transformers import DropBlockScheduleCallback

    with pytest.raises(TypeError, match="total_steps"):
        DropBlockScheduleCallback(total_steps=2.5)
    with pytest.raises(ValueError, match="target"):
        DropBlockScheduleCallback(target=2)

    class State:
        global_step = 0
        max_steps = 0

    with pytest.raises(ValueError, match="max_steps"):
        DropBlockScheduleCallback().on_train_begin(None, State(), None, model=HFNet())
    with pytest.raises(ValueError, match="dropblock_inject.inject"):
        DropBlockScheduleCallback(total_steps=3).on_train_begin(None, State(), None, model=SmallNet())
