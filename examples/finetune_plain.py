"""Fine-tune a ResNet with DropBlock in a plain PyTorch loop, then strip it and export to ONNX.

    inject -> KeepProbScheduler -> train -> strip -> torch.onnx.export -> onnxruntime parity

Runs offline on the CPU in well under a minute: the data are scikit-learn's bundled 8x8 handwritten digits,
upscaled to 3-channel images, and the network is a torchvision ResNet-18 built without weights (in a real
fine-tune, load pretrained weights and replace the classifier; nothing else changes).

    python examples/finetune_plain.py                 # defaults: 30 steps, batch 32, 64 px
    python examples/finetune_plain.py --steps 200 --target 0.85 --onnx resnet18_digits.onnx
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import dropblock_inject as dbi


def digits(image_size: int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits (1797 images, shipped with the package) as normalized 3xSxS tensors."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    train, val = perm[:split], perm[split:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def endless(loader: DataLoader):
    while True:
        yield from loader


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    return (model(x).argmax(1) == y).float().mean().item()


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str, dynamo: bool) -> None:
    """Export with a dynamic batch axis; the TorchScript exporter is ~10x faster for a ResNet on CPU."""
    if dynamo:
        batch = torch.export.Dim("batch")
        torch.onnx.export(model, (example,), path, dynamo=True, input_names=["images"], output_names=["logits"],
                          dynamic_shapes=({0: batch},), verbose=False)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
        torch.onnx.export(model, (example,), path, dynamo=False, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default: 30)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64, help="side of the upscaled digits (default: 64)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--recipe", default="resnet50_paper", help="recipe name, YAML path (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=3,
                        help="override the recipe's block size; small images have small maps (0: keep it)")
    parser.add_argument("--target", type=float, default=None, help="final keep_prob (default: the recipe's)")
    parser.add_argument("--onnx", default=None, help="where to write the ONNX model (default: a temp file)")
    parser.add_argument("--dynamo", action="store_true",
                        help="use the torch.export-based ONNX exporter (slower here) instead of the TorchScript one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    train, val = digits(args.image_size, args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))

    # 1. the model, as it would come from a model zoo; then surgery in place
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    recipe = dbi.load_recipe(args.recipe).to_dict()
    if args.block_size:
        recipe["dropblock"]["block_size"] = args.block_size
    example = torch.zeros(1, 3, args.image_size, args.image_size)
    print(dbi.format_plan(dbi.plan(model, recipe, example_input=example)))
    dbi.inject(model, recipe)

    # 2. the schedule: keep_prob ramps linearly from the recipe's start to its target over the run
    sched = dbi.KeepProbScheduler(model, total_steps=args.steps, target=args.target)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps)

    # 3. train
    model.train()
    batches = endless(loader)
    start = time.perf_counter()
    with tqdm(range(args.steps), desc="train", unit="step") as bar:
        for step in bar:
            sched.step(step)  # idempotent: sets every DropBlock's keep_prob for this global step
            x, y = next(batches)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", keep_prob=f"{sched.keep_prob:.4f}")
    train_time = time.perf_counter() - start
    acc_injected = accuracy(model, val)

    # 4. strip: the original modules, with the trained weights; eval behaviour is unchanged
    x_val = val.tensors[0][:64]
    with torch.no_grad():
        before = model.eval()(x_val)
    dbi.strip(model)
    assert not dbi.injected_dropblocks(model) and not any(isinstance(m, dbi.DropBlock2d) for m in model.modules())
    with torch.no_grad():
        after = model.eval()(x_val)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    acc = accuracy(model, val)
    assert acc == acc_injected

    # 5. export and check onnxruntime against PyTorch
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = args.onnx or os.path.join(tmp, "model.onnx")
        export_onnx(model, x_val[:1], path, dynamo=args.dynamo)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        (onnx_out,) = session.run(None, {"images": x_val.numpy()})
    max_diff = float(np.abs(onnx_out - after.numpy()).max())
    assert max_diff < 1e-4, f"onnxruntime differs from PyTorch by {max_diff}"

    print(f"trained {args.steps} steps in {train_time:.1f} s; last keep_prob {sched.keep_prob:.4f} "
          f"(per DropBlock: {sorted({round(db.keep_prob, 6) for db in sched.dropblocks})})")
    print(f"validation accuracy {acc:.3f}; onnxruntime vs PyTorch max |diff| = {max_diff:.2e}"
          + (f"; ONNX written to {args.onnx}" if args.onnx else ""))
    return {"accuracy": acc, "max_diff": max_diff, "keep_prob": sched.keep_prob}


if __name__ == "__main__":
    main()
