"""Forward + backward of DropBlock: ours against timm, torchvision and the ``dropblock`` package.

All candidates are timed in ONE run, interleaved round-robin (in a new random order every round) over many
repetitions after a warm-up; the tables report medians, which are robust to the noise of a shared machine.

Candidates: ours (``per_channel=True`` and ``False``), the per-channel peers (torchvision ``DropBlock2d``,
timm ``couple_channels=False``), the shared-mask peers (timm ``couple_channels=True``,
``dropblock.DropBlock2D``), and the *floor*: ``x * m`` with a precomputed fp32 mask ``m`` (what any DropBlock
must at least do, forward and backward). Eager on CPU, ours is also called through the registered op
(``torch.ops.dropblock_inject.drop_block``, what compile/export/fx run) to measure the dispatch cost.

Modes:

* default: eager;
* ``--compile``: every candidate, the floor included, compiled the same way (``torch.compile``, inductor,
  ``dynamic=False``; ours with ``fullgraph=True``), plus our eager op as a reference;
* ``--device cuda``: on the GPU (fails with a clear message when CUDA is absent).

Ratios (> 1 means we are faster) are given twice: of the medians, and *paired* (the median over rounds of
the other's time divided by ours in the same round), which cancels the drift of a shared machine's speed.
The run ends with the performance criteria, each with its paired value:

* eager CPU: the per-channel op >= 10x faster than the fastest per-channel peer, and <= 2x the floor;
* compiled: the per-channel op >= 5x faster than the fastest compiled per-channel peer (and, for information,
  its time over our eager op's);
* CUDA: per-channel op <= 2x the floor, and <= 1 byte per element kept for backward.

"Saved" is what autograd keeps for backward (unique storages seen by ``saved_tensors_hooks``, the input
itself excluded), in bytes per input element.

Usage::

    .venv/bin/python benchmarks/bench_op.py --threads 1              # eager CPU, all shapes
    .venv/bin/python benchmarks/bench_op.py --threads 1 --compile --rounds 15
    .venv/bin/python benchmarks/bench_op.py --device cuda [--compile]
    .venv/bin/python benchmarks/bench_op.py --quick                  # fewer repetitions, a smoke test

Timings are never asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from dropblock_inject import DropBlock2d

SHAPES = [(16, 256, 14, 14), (16, 1024, 14, 14), (16, 512, 7, 7), (16, 2048, 7, 7)]
KEEP_PROB = 0.9
BLOCK = 7

PER_CHANNEL, SHARED, FLOOR = "per-channel", "shared", "floor"
OURS, PEER, REFERENCE = "ours", "peer", "reference"


@dataclass
class Candidate:
    name: str
    mode: str  # PER_CHANNEL, SHARED or FLOOR
    role: str  # OURS, PEER or REFERENCE (the floor, our eager op beside compiled ones, the dispatched op)
    module: nn.Module
    times: list[float] = field(default_factory=list)
    saved: float = float("nan")


class Floor(nn.Module):
    """``x * m`` with a fixed fp32 keep mask already scaled: an elementwise product, forward and backward."""

    def __init__(self, shape: tuple[int, ...], device: torch.device) -> None:
        super().__init__()
        keep = (torch.rand(shape, device=device) >= 1 - KEEP_PROB).float()
        self.register_buffer("mask", keep / keep.mean())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask


class ThroughTheOp(nn.Module):
    """Our per-channel DropBlock called through ``torch.ops.dropblock_inject.drop_block`` (eager dispatch)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("keep_prob", torch.tensor(KEEP_PROB, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.dropblock_inject.drop_block(x, self.keep_prob, BLOCK, True, True)[0]


def candidates(shape: tuple[int, ...], device: torch.device, compiled: bool) -> list[Candidate]:
    """Every candidate, in training mode, on ``device``, compiled when asked (the ``dropblock`` package's only
    where it is installed: it is a dev extra, absent from a bare GPU image)."""
    import timm.layers
    import torchvision.ops

    drop = 1.0 - KEEP_PROB
    cands = [
        Candidate("ours per_channel=True", PER_CHANNEL, OURS, DropBlock2d(BLOCK, KEEP_PROB, per_channel=True)),
        Candidate("torchvision DropBlock2d", PER_CHANNEL, PEER,
                  torchvision.ops.DropBlock2d(p=drop, block_size=BLOCK)),
        Candidate("timm couple_channels=False", PER_CHANNEL, PEER,
                  timm.layers.DropBlock2d(drop_prob=drop, block_size=BLOCK, couple_channels=False)),
        Candidate("ours per_channel=False", SHARED, OURS, DropBlock2d(BLOCK, KEEP_PROB, per_channel=False)),
        Candidate("timm couple_channels=True", SHARED, PEER,
                  timm.layers.DropBlock2d(drop_prob=drop, block_size=BLOCK, couple_channels=True)),
        Candidate("floor x * mask", FLOOR, REFERENCE, Floor(shape, device)),
    ]
    try:
        import dropblock
    except ImportError:
        print("(the dropblock package is not installed: its candidate is left out)")
    else:
        cands.insert(-1, Candidate("dropblock DropBlock2D", SHARED, PEER,
                                   dropblock.DropBlock2D(drop_prob=drop, block_size=BLOCK)))
    for c in cands:
        c.module.to(device).train()
    if compiled:
        for c in cands:
            c.module = torch.compile(c.module, dynamic=False, fullgraph=c.role == OURS)
            c.name = f"compiled {c.name}"
        cands.append(Candidate("eager ours per_channel=True", PER_CHANNEL, REFERENCE,
                               DropBlock2d(BLOCK, KEEP_PROB).to(device).train()))
    elif device.type == "cpu":
        cands.append(Candidate("ours through torch.ops (dispatch)", PER_CHANNEL, REFERENCE, ThroughTheOp(device)))
    return cands


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_step(module: nn.Module, x: Tensor, grad: Tensor) -> float:
    _sync(x.device)
    t0 = time.perf_counter()
    x.grad = None
    module(x).backward(grad)
    _sync(x.device)
    return (time.perf_counter() - t0) * 1e3


def saved_bytes_per_element(module: nn.Module, x: Tensor) -> float:
    """Bytes autograd keeps for backward (unique storages, the input's excluded) per input element."""
    storages: dict[int, int] = {}
    input_ptr = x.untyped_storage().data_ptr()

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() != input_ptr:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    y.backward(torch.ones_like(y))
    x.grad = None
    return sum(storages.values()) / x.numel()


def bench_shape(shape: tuple[int, ...], device: torch.device, compiled: bool, rounds: int,
                warmup: int) -> list[Candidate]:
    cands = candidates(shape, device, compiled)
    x = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.randn(shape, device=device)
    order = random.Random(0)
    for r in range(warmup + rounds):
        # a fresh random order every round: no candidate always runs after the same one (whose memory traffic
        # decides what is left in the caches)
        for c in order.sample(cands, len(cands)):
            t = _time_step(c.module, x, grad)
            if r >= warmup:
                c.times.append(t)
    for c in cands:
        c.saved = saved_bytes_per_element(c.module, x)
    return cands


def ratio(slow: Candidate, fast: Candidate) -> tuple[float, float]:
    """(slow's median / fast's median, median over rounds of slow / fast in the same round)."""
    paired = statistics.median(s / f for s, f in zip(slow.times, fast.times))
    return statistics.median(slow.times) / statistics.median(fast.times), paired


def _find(cands: list[Candidate], mode: str, role: str) -> list[Candidate]:
    return [c for c in cands if c.mode == mode and c.role == role]


def print_table(shape: tuple[int, ...], cands: list[Candidate]) -> dict[str, tuple[float, float]]:
    """Prints one shape's table and returns its ratios by name."""
    print(f"\n### {tuple(shape)}  (fwd+bwd, fp32, keep_prob={KEEP_PROB}, block_size={BLOCK})\n")
    print("| candidate | mode | median ms | saved for backward (B/elem) |")
    print("|---|---|---:|---:|")
    for c in cands:
        label = f"**{c.name}**" if c.role == OURS else c.name
        print(f"| {label} | {c.mode} | {statistics.median(c.times):.3f} | {c.saved:.3f} |")
    out: dict[str, tuple[float, float]] = {}
    (ours_pc,) = _find(cands, PER_CHANNEL, OURS)
    (ours_sh,) = _find(cands, SHARED, OURS)
    (floor,) = _find(cands, FLOOR, REFERENCE)
    for mode, ours in ((PER_CHANNEL, ours_pc), (SHARED, ours_sh)):
        peers = _find(cands, mode, PEER)
        best = min(peers, key=lambda p: statistics.median(p.times))
        out[f"{mode} peer / ours"] = ratio(best, ours)
        print(f"\n{mode}: fastest peer ({best.name}) / ours: **{out[f'{mode} peer / ours'][0]:.2f}x** "
              f"(paired {out[f'{mode} peer / ours'][1]:.2f}x)", end="")
    out["ours / floor"] = ratio(ours_pc, floor)
    print(f"\nper-channel ours / floor: {out['ours / floor'][0]:.2f}x (paired {out['ours / floor'][1]:.2f}x)")
    for ref in _find(cands, PER_CHANNEL, REFERENCE):
        key = "ours / eager ours" if ref.name.startswith("eager") else "dispatched / direct"
        out[key] = ratio(ours_pc, ref) if key == "ours / eager ours" else ratio(ref, ours_pc)
        print(f"{key}: {out[key][0]:.3f}x (paired {out[key][1]:.3f}x)")
    out["saved"] = (ours_pc.saved, ours_pc.saved)
    return out


def print_goals(summary: list[tuple[tuple[int, ...], dict[str, tuple[float, float]]]], device: torch.device,
                compiled: bool) -> None:
    print("\n### Criteria, paired ratios\n")
    print("| shape | criterion | measured | met |")
    print("|---|---|---:|:---:|")
    for shape, r in summary:
        goals: list[tuple[str, float, bool]] = []
        peer = r["per-channel peer / ours"][1]
        if compiled:
            goals.append(("fastest compiled per-channel peer >= 5x compiled ours", peer, peer >= 5))
            goals.append(("(info) compiled ours / eager ours", r["ours / eager ours"][1], True))
        if device.type == "cpu" and not compiled:
            goals.append(("fastest per-channel peer >= 10x eager ours", peer, peer >= 10))
            goals.append(("eager ours <= 2x floor", r["ours / floor"][1], r["ours / floor"][1] <= 2))
        if device.type == "cuda":
            goals.append(("ours <= 2x floor", r["ours / floor"][1], r["ours / floor"][1] <= 2))
            goals.append(("saved for backward <= 1 B/elem", r["saved"][0], r["saved"][0] <= 1))
        if "dispatched / direct" in r:
            goals.append(("(info) op dispatch / direct call", r["dispatched / direct"][1], True))
        for goal, value, met in goals:
            print(f"| {tuple(shape)} | {goal} | {value:.2f} | {'yes' if met else '**no**'} |")


def first_call_check_cost(device: torch.device) -> None:
    """Prints what the Triton kernel's first-call check costs per dtype, rank and mask variant: the first
    check (Triton compiling the programs for the probe's shapes) and a second one (programs cached)."""
    from dropblock_inject.ops import _selfcheck
    from dropblock_inject.ops._dispatch import KERNELS

    kernel = KERNELS["triton"]
    print(f"\nfirst-call check of the {kernel.name} kernel on {device} (ms; the second with the programs cached)")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for ndim in (4, 5):
            for per_channel in (True, False):
                times = []
                for _ in range(2):
                    _selfcheck._results.clear()
                    _sync(device)
                    t0 = time.perf_counter()
                    passed = _selfcheck.passes(kernel, device, dtype, ndim, per_channel)
                    _sync(device)
                    times.append((time.perf_counter() - t0) * 1e3)
                variant = "per-channel" if per_channel else "shared"
                print(f"  {str(dtype):15s} {ndim}-D {variant:11s}: first {times[0]:8.1f}  cached {times[1]:7.1f}  "
                      f"{'passed' if passed else 'FAILED (the dense kernel would run)'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per shape (default 40, quick 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 5, quick 2)")
    parser.add_argument("--compile", action="store_true", help="compile every candidate (inductor)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--first-call", action="store_true",
                        help="only time the Triton kernel's first-call check (CPU: under Triton's interpreter)")
    parser.add_argument("--shapes", nargs="+", type=int, metavar="INDEX", default=None,
                        help=f"indices into {SHAPES} (default: all)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here (torch.cuda.is_available() is False; "
                     f"torch {torch.__version__}, built for CUDA {torch.version.cuda}); run it on a GPU machine")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, but got {args.device!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.first_call:
        first_call_check_cost(device)
        return
    rounds = args.rounds if args.rounds is not None else (5 if args.quick else 40)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    shapes = SHAPES if args.shapes is None else [SHAPES[i] for i in args.shapes]

    torch.manual_seed(0)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else platform.processor() or platform.machine())
    print(f"torch {torch.__version__}, {where}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{'compiled (inductor)' if args.compile else 'eager'}; {rounds} rounds after {warmup} warm-up, medians; "
          f"load average at start: {_load()}")
    summary = []
    for shape in shapes:
        summary.append((shape, print_table(shape, bench_shape(shape, device, args.compile, rounds, warmup))))
    print_goals(summary, device, args.compile)
    print(f"\nload average at end: {_load()} (other work on the machine makes every timing noisier)")


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()
