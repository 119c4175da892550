"""Does DropBlock help? Baseline vs dropout vs DropBlock (fixed keep_prob) vs DropBlock with the linear schedule.

A small residual CNN is trained from scratch on scikit-learn's bundled handwritten digits (1797 8x8 images,
no download), upscaled to 32x32, on the CPU. A fixed stratified split keeps only a quarter of the images (449)
for training, so that there is something to regularize, and tests on the other 1348. Four arms share
everything but the regularizer, and each seed gives every arm the same initial weights and the same batch
order (a paired comparison):

* ``baseline``: the plain network;
* ``dropout``: ``nn.Dropout`` before the classifier;
* ``dropblock``: DropBlock injected by :func:`dropblock_inject.inject` with an inline recipe (layer3 on 8x8
  maps and layer4 on 4x4 maps, after every conv-BN of the residual branch and on the shortcut, block 3),
  at its final keep_prob from the first step;
* ``dropblock+schedule``: the same, with keep_prob ramped linearly from 1 by
  :class:`dropblock_inject.KeepProbScheduler`, as in the paper.

It prints a markdown table of test and train accuracy (mean ± std over seeds) and the paired test-accuracy
difference from the baseline.

    python examples/regularization_experiment.py                    # 4 arms x 3 seeds x 40 epochs
    python examples/regularization_experiment.py --seeds 3 --epochs 20
    python examples/regularization_experiment.py --quick            # 1 seed, 1 epoch: checks the pipeline only
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock
from tqdm import tqdm

import dropblock_inject as dbi

ARMS = ("baseline", "dropout", "dropblock", "dropblock+schedule")


def recipe(keep_prob: float, block_size: int) -> dict:
    """The paper's placement scaled down: groups 3 and 4 (8x8 and 4x4 maps here), group 3 at a quarter rate."""
    return {
        "description": "small ResNet: layer3 (8x8) and layer4 (4x4), branch and shortcut",
        "dropblock": {"block_size": block_size, "keep_prob": keep_prob, "per_channel": True},
        "schedule": {"start_keep_prob": 1.0, "ramp_fraction": 1.0},
        "rules": [
            {"name": "group3", "modules": ["layer3.*"], "after": ["norm"], "shortcut": True,
             "drop_rate_scale": 0.25},
            {"name": "group4", "modules": ["layer4.*"], "after": ["norm"], "shortcut": True},
        ],
    }


class SmallResNet(nn.Module):
    """Stem and four stages of torchvision ``BasicBlock``s: 32x32 -> 32, 16, 8, 4; global pool; linear head."""

    def __init__(self, num_classes: int = 10, width: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(BasicBlock(w, w))
        self.layer2 = nn.Sequential(self._down(w, 2 * w))
        self.layer3 = nn.Sequential(self._down(2 * w, 4 * w), BasicBlock(4 * w, 4 * w))
        self.layer4 = nn.Sequential(self._down(4 * w, 8 * w))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(8 * w, num_classes)

    @staticmethod
    def _down(cin: int, cout: int) -> BasicBlock:
        projection = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))
        return BasicBlock(cin, cout, stride=2, downsample=projection)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


def digits(image_size: int, test_fraction: float) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """scikit-learn's digits as (N, 1, S, S) tensors, normalized by train statistics; fixed stratified split."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.tensor(data.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                                           stratify=data.target, random_state=0)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(512), y.split(512))) / len(y)


@dataclass
class Run:
    arm: str
    seed: int
    test_acc: float
    train_acc: float
    train_loss: float  # mean training loss (train mode, regularizer on) over the last epoch
    seconds: float


def train_one(arm: str, seed: int, data: tuple, args: argparse.Namespace, bar: tqdm) -> Run:
    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(seed)  # same initial weights in every arm for this seed
    model = SmallResNet(width=args.width, dropout=args.dropout if arm == "dropout" else 0.0)
    steps_per_epoch = len(y_train) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    sched = None
    if arm.startswith("dropblock"):
        dbi.inject(model, recipe(args.keep_prob, args.block_size))  # every DropBlock at its final keep_prob
        if arm == "dropblock+schedule":
            sched = dbi.KeepProbScheduler(model, total_steps=total_steps)  # ramps from 1 to the target
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total_steps)
    order = torch.Generator().manual_seed(seed)  # same batch order in every arm for this seed
    start = time.perf_counter()
    step, last_losses = 0, []
    model.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(y_train), generator=order)
        last_losses = []
        for i in range(steps_per_epoch):
            if sched is not None:
                sched.step(step)
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_sched.step()
            step += 1
            last_losses.append(loss.item())
            bar.update(1)
        bar.set_postfix(arm=arm, seed=seed, epoch=epoch + 1, loss=f"{statistics.fmean(last_losses):.3f}")
    seconds = time.perf_counter() - start
    if arm.startswith("dropblock"):
        dbi.strip(model)  # evaluate the plain network, as it would be exported
    return Run(arm, seed, accuracy(model, x_test, y_test), accuracy(model, x_train, y_train),
               statistics.fmean(last_losses), seconds)


def mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(runs: list[Run]) -> str:
    """Markdown table: test and train accuracy (%), last-epoch training loss, paired test difference."""
    baseline = {r.seed: r.test_acc for r in runs if r.arm == "baseline"}
    lines = ["| arm | test accuracy (%) | Δ test vs baseline (points, paired) | train accuracy (%) "
             "| last-epoch train loss | seeds |",
             "|---|---|---|---|---|---|"]
    for arm in ARMS:
        rs = [r for r in runs if r.arm == arm]
        if not rs:
            continue
        if arm == "baseline":
            delta = "—"
        else:
            delta = mean_std([r.test_acc - baseline[r.seed] for r in rs if r.seed in baseline]) if baseline else "n/a"
        lines.append(f"| {arm} | {mean_std([r.test_acc for r in rs])} | {delta} | "
                     f"{mean_std([r.train_acc for r in rs])} | {mean_std([r.train_loss for r in rs], 1.0, 3)} | "
                     f"{len(rs)} |")
    return "\n".join(lines)


def per_seed_table(runs: list[Run]) -> str:
    """Markdown table of every run's test accuracy (%), one column per seed."""
    seeds = sorted({r.seed for r in runs})
    lines = ["| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for arm in ARMS:
        by_seed = {r.seed: r.test_acc for r in runs if r.arm == arm}
        if by_seed:
            lines.append(f"| {arm} | " + " | ".join(f"{100 * by_seed[s]:.2f}" if s in by_seed else "—" for s in seeds)
                         + " |")
    return "\n".join(lines)


QUICK_CHECK_EPOCHS = 10  # below this, the accuracies say nothing about the regularizers


def pipeline_only_note(epochs: int) -> str:
    """What a run of a few epochs shows: that the pipeline works, not how the arms compare."""
    return (f"note: {epochs} epoch(s) only checks the pipeline (inject, schedule, train, strip, evaluate): test "
            f"accuracy near chance (10%) is expected, as BatchNorm's running statistics have not settled; "
            f"compare the arms with the default 40 epochs")


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds, 0..N-1 (default: 3; 1 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: 40; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test of the pipeline: 1 seed, 1 epoch (chance accuracy expected)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms to run (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--width", type=int, default=8, help="channels of the first stage (default: 8)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the upscaled digits (default: 32)")
    parser.add_argument("--test-fraction", type=float, default=0.75,
                        help="held-out share of the data (default: 0.75: a small training set, where regularization "
                             "matters most)")
    parser.add_argument("--dropout", type=float, default=0.3, help="dropout rate of the dropout arm (default: 0.3)")
    parser.add_argument("--keep-prob", type=float, default=0.9, help="DropBlock's final keep_prob in layer4 "
                                                                     "(layer3: a quarter of the drop rate)")
    parser.add_argument("--block-size", type=int, default=3, help="DropBlock's block size (default: 3)")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    args.epochs = args.epochs if args.epochs is not None else (1 if args.quick else 40)
    if seeds < 1 or args.epochs < 1:
        parser.error("--seeds and --epochs must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    data = digits(args.image_size, args.test_fraction)
    n_train, n_test = len(data[0][1]), len(data[1][1])
    steps_per_epoch = n_train // args.batch_size
    print(f"digits {args.image_size}x{args.image_size}: {n_train} train / {n_test} test; {len(args.arms)} arms x "
          f"{seeds} seeds x {args.epochs} epochs x {steps_per_epoch} steps; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(dbi.format_plan(dbi.plan(SmallResNet(width=args.width), recipe(args.keep_prob, args.block_size),
                                   example_input=torch.zeros(1, 1, args.image_size, args.image_size))))
    runs = []
    start = time.perf_counter()
    total = len(args.arms) * seeds * args.epochs * steps_per_epoch
    with tqdm(total=total, desc="training", unit="step") as bar:
        for seed in range(seeds):
            for arm in args.arms:
                runs.append(train_one(arm, seed, data, args, bar))
    elapsed = time.perf_counter() - start
    print()
    print(table(runs))
    print(f"\ntest accuracy (%) of every run ({len(data[1][1])} test images):\n")
    print(per_seed_table(runs))
    print(f"\n{len(runs)} runs in {elapsed:.0f} s ({elapsed / len(runs):.1f} s per run)")
    if args.epochs < QUICK_CHECK_EPOCHS:
        print(pipeline_only_note(args.epochs))
    return runs


if __name__ == "__main__":
    main()
