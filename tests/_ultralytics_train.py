"""Subprocess driver of the Ultralytics end-to-end tests: trains a YOLO with DropBlock and records what happened.

Run as ``python tests/_ultralytics_train.py SCENARIO WORKDIR`` with the environment the test sets (offline,
Ultralytics' settings and HOME in the temporary directory); writes ``WORKDIR/SCENARIO.json``. A separate process
because Ultralytics reads its settings directory when it is first imported. Every network connection is refused
and recorded. Scenarios:

* ``train``: fine-tuning from a checkpoint for 2 epochs, interrupted after the first checkpoint, then resumed from ``last.pt`` with ``resume=True``,
  then exported to ONNX. Records, per training batch, the global iteration and every DropBlock's keep_prob, what
  forward hooks on the DropBlocks saw, whether the EMA held DropBlocks when checkpoints were written, and the
  number of DropBlocks left in the trainer's model after each run.
* ``ddp_file``: writes Ultralytics' multi-GPU launch files (``generate_ddp_file``) for a trainer with DropBlock
  callbacks, and runs the generated script as one plain CPU process, as each DDP worker runs it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ATTEMPTS: list[str] = []


def _refuse_network() -> None:
    def refuse(*args, **kwargs):
        ATTEMPTS.append(repr(args[:2])[:200])
        raise OSError("network disabled by the test")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.getaddrinfo = refuse  # type: ignore[assignment]
    socket.create_connection = refuse  # type: ignore[assignment]


def load_example():
    """The example script as a module (its dataset writer and offline settings helper)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_ultralytics", REPO / "examples" / "finetune_ultralytics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Interrupt(Exception):
    """Stops the first run after its first checkpoint, as a killed job would."""


def _train_args(data: Path, workdir: Path) -> dict:
    return dict(data=str(data), epochs=2, imgsz=64, batch=4, device="cpu", workers=0, plots=False, amp=False,
                project=str(workdir / "runs"), name="train", exist_ok=True, seed=0, deterministic=False,
                verbose=False, warmup_epochs=0)


def scenario_train(workdir: Path, data: Path) -> dict:
    import torch
    from ultralytics import YOLO

    import dropblock_inject as dbi
    from dropblock_inject.integrations.ultralytics import add_dropblock

    record: dict = {"batches": [], "hooks": [], "ema_dropblocks_at_save": [], "trainer_dropblocks_after": [],
                    "saved": []}

    def instrument(yolo, dropblock, stop_after_first_save: bool) -> None:
        hooks = {"train_calls": 0, "eval_calls": 0, "eval_changed": 0, "dropped": 0, "nonzero": 0}
        record["hooks"].append(hooks)

        def hook(module, inputs, output):
            x = inputs[0]
            if not module.training:
                hooks["eval_calls"] += 1
                hooks["eval_changed"] += int(not torch.equal(x, output))
                return
            hooks["train_calls"] += 1
            live = x != 0
            hooks["nonzero"] += int(live.sum())
            hooks["dropped"] += int((live & (output == 0)).sum())

        def on_train_start(trainer):  # runs after DropBlockCallbacks.on_pretrain_routine_end
            record["n_dropblocks"] = len(dbi.injected_dropblocks(trainer.model))
            record["points"] = [[db.point.module, db.point.kind, db.point.drop_rate_scale]
                                for db in dropblock.dropblocks]
            record["total_steps"] = dropblock.scheduler.total_steps
            record["nb"] = len(trainer.train_loader)
            for db in dropblock.dropblocks:
                db.register_forward_hook(hook)

        def on_train_batch_start(trainer):  # runs after DropBlockCallbacks.on_train_batch_start
            record["batches"].append({"epoch": trainer.epoch, "step": dropblock.step,
                                      "keep_probs": [db.keep_prob for db in dropblock.dropblocks]})

        def on_model_save(trainer):
            record["ema_dropblocks_at_save"].append(len(dbi.injected_dropblocks(trainer.ema.ema)))
            ckpt = torch.load(trainer.last, map_location="cpu", weights_only=False)
            record["saved"].append({"epoch": ckpt["epoch"], "has_optimizer": ckpt["optimizer"] is not None,
                                    "modules": sorted({type(m).__module__ for m in ckpt["ema"].modules()})})
            if stop_after_first_save:
                raise Interrupt(f"stopped after epoch {trainer.epoch}")

        yolo.add_callback("on_train_start", on_train_start)
        yolo.add_callback("on_train_batch_start", on_train_batch_start)
        yolo.add_callback("on_model_save", on_model_save)

    # fine-tuning from a checkpoint, the usual case: the trainer loads its weights into a model of its own, which
    # then also becomes yolo.model until training ends
    pretrained = workdir / "pretrained.pt"
    YOLO("yolov8n.yaml").save(str(pretrained))
    yolo = YOLO(str(pretrained))
    dropblock = add_dropblock(yolo, "paper_generic", target=0.5)
    instrument(yolo, dropblock, stop_after_first_save=True)
    yolo.add_callback("on_train_start", lambda trainer: record.update(
        yolo_model_is_trainer_model=yolo.model is trainer.model,
        yolo_model_dropblocks_during=len(dbi.injected_dropblocks(yolo.model))))
    try:
        yolo.train(**_train_args(data, workdir))
    except Interrupt as e:
        record["interrupted"] = str(e)
    record["trainer_dropblocks_after"].append(len(dbi.injected_dropblocks(yolo.trainer.model)))
    record["yolo_model_dropblocks_after_failure"] = len(dbi.injected_dropblocks(yolo.model))
    last = workdir / "runs" / "train" / "weights" / "last.pt"

    yolo = YOLO(str(last))
    dropblock = add_dropblock(yolo, "paper_generic", target=0.5)
    instrument(yolo, dropblock, stop_after_first_save=False)
    yolo.train(resume=True, data=str(data))
    record["trainer_dropblocks_after"].append(len(dbi.injected_dropblocks(yolo.trainer.model)))
    record["yolo_model_dropblocks"] = len(dbi.injected_dropblocks(yolo.model))
    record["onnx"] = str(yolo.export(format="onnx", imgsz=64, simplify=False, device="cpu"))
    record["weights"] = [str(last), str(last.with_name("best.pt"))]
    return record


def scenario_ddp_file(workdir: Path, data: Path) -> dict:
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file

    from dropblock_inject.integrations.ultralytics import add_dropblock

    args = {**_train_args(data, workdir), "model": "yolov8n.yaml", "epochs": 1, "name": "ddp"}
    trainer = DetectionTrainer(overrides=args)
    add_dropblock(trainer, "paper_generic", target=0.5)
    file = generate_ddp_file(trainer)
    try:  # what torch.distributed.run starts on each rank, here once and without a process group (RANK unset)
        run = subprocess.run([sys.executable, file], capture_output=True, text=True, timeout=600)
    finally:
        ddp_cleanup(trainer, file)
    return {"returncode": run.returncode, "output": (run.stdout + run.stderr)[-20000:],
            "weights": [str(workdir / "runs" / "ddp" / "weights" / "last.pt")]}


def main() -> None:
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    _refuse_network()
    data = load_example().write_synthetic_dataset(workdir / "data", n_train=8, n_val=4, imgsz=64)
    result = {"train": scenario_train, "ddp_file": scenario_ddp_file}[scenario](workdir, data)
    result["network_attempts"] = ATTEMPTS
    (workdir / f"{scenario}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
