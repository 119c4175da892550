"""Fine-tune a ResNet with DropBlock under Lightning, strip it at the end of fit, export to ONNX.

    inject -> Trainer(callbacks=[DropBlockScheduleCallback(strip_on_fit_end=True)]).fit -> ONNX -> onnxruntime

The callback reads the global step and the run length from the Trainer (``estimated_stepping_batches``),
sets every DropBlock's keep_prob before each training batch, saves its state in Lightning checkpoints and,
here, strips the DropBlocks when fit ends so the module can be exported at once. Runs offline on the CPU:
scikit-learn's bundled digits upscaled to 3-channel images, a torchvision ResNet-18 built without weights
(load pretrained weights in a real fine-tune). The defaults took 34 s in all (15 s of training) with
--threads 1 on a 2-core VM shared with other jobs (load average about 4). As in the plain-loop example, the
last of the 30 steps runs at keep_prob 0.9033: the ramp reaches the target at step 30 (global step
``total_steps``), as the paper's code does.

    python examples/finetune_lightning.py                     # defaults: 30 steps, batch 32, 64 px
    python examples/finetune_lightning.py --steps 300 --ckpt-dir ckpts
    python examples/finetune_lightning.py --steps 300 --resume ckpts/last.ckpt   # after an interruption
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader

import dropblock_inject as dbi
from dropblock_inject.integrations.lightning import DropBlockScheduleCallback
from finetune_plain import digits, export_onnx  # the same data and exporter as the plain-loop example

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone namespace works too
    import pytorch_lightning as pl


class DigitsClassifier(pl.LightningModule):
    def __init__(self, recipe: dict, lr: float) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(weights=None, num_classes=10)
        dbi.inject(self.net, recipe)  # in place: same modules, same parameters, same state_dict keys
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        schedule = next(cb for cb in self.trainer.callbacks if isinstance(cb, DropBlockScheduleCallback))
        self.log("loss", loss, prog_bar=True)
        self.log("keep_prob", schedule.scheduler.keep_prob, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)
        steps = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default: 30)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--recipe", default="resnet_paper", help="recipe name or YAML path (default: %(default)s, the ResNet-18..152 one)")
    parser.add_argument("--block-size", type=int, default=3, help="override the recipe's block size (0: keep it)")
    parser.add_argument("--target", type=float, default=None, help="final keep_prob (default: the recipe's)")
    parser.add_argument("--ckpt-dir", default=None, help="save a checkpoint at the end of each epoch here")
    parser.add_argument("--resume", default=None, help="checkpoint of an interrupted run to resume, with the same --steps (the "
                        "keep_prob schedule and the LR schedule resume from it)")
    parser.add_argument("--onnx", default=None, help="where to write the ONNX model (default: a temp file)")
    parser.add_argument("--dynamo", action="store_true", help="use the torch.export-based ONNX exporter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # in-memory data needs none
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning internals on recent PyTorch

    train, val = digits(args.image_size, args.seed)
    recipe = dbi.load_recipe(args.recipe).to_dict()
    if args.block_size:
        recipe["dropblock"]["block_size"] = args.block_size
    model = DigitsClassifier(recipe, args.lr)
    print(f"{len(dbi.injected_dropblocks(model))} DropBlocks injected with recipe {args.recipe!r}")

    schedule = DropBlockScheduleCallback(target=args.target, strip_on_fit_end=True)
    callbacks: list[pl.Callback] = [schedule, pl.callbacks.TQDMProgressBar()]
    if args.ckpt_dir:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=args.ckpt_dir, save_last=True))
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=bool(args.ckpt_dir), callbacks=callbacks,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True),
                DataLoader(val, batch_size=256), ckpt_path=args.resume)
    last_keep_prob = schedule.scheduler.keep_prob

    # stripped by the callback at the end of fit: the original ResNet-18 with the trained weights
    assert not dbi.injected_dropblocks(model) and not any(isinstance(m, dbi.DropBlock2d) for m in model.modules())
    net = model.net.eval()
    x_val, y_val = val.tensors
    with torch.no_grad():
        logits = net(x_val)
    acc = (logits.argmax(1) == y_val).float().mean().item()

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = args.onnx or os.path.join(tmp, "model.onnx")
        export_onnx(net, x_val[:1], path, args.dynamo)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        (onnx_out,) = session.run(None, {"images": x_val[:64].numpy()})
    max_diff = float(np.abs(onnx_out - logits[:64].numpy()).max())
    assert max_diff < 1e-4, f"onnxruntime differs from PyTorch by {max_diff}"
    print(f"global step {trainer.global_step}, last keep_prob {last_keep_prob:.4f}, validation accuracy {acc:.3f}; "
          f"onnxruntime vs PyTorch max |diff| = {max_diff:.2e}" + (f"; ONNX at {args.onnx}" if args.onnx else ""))
    return {"accuracy": acc, "max_diff": max_diff, "keep_prob": last_keep_prob}


if __name__ == "__main__":
    main()
