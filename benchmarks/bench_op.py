"""Forward + backward of DropBlock on CPU: ours against timm, torchvision and the ``dropblock`` package.

All candidates are timed in ONE run, interleaved round-robin (in a new random order every round) over many
repetitions after a warm-up; the tables report medians, which are robust to the noise of a shared machine.

Ratios (> 1 means we are faster):

* per-channel mode: fastest per-channel peer (torchvision ``DropBlock2d``, timm ``couple_channels=False``)
  divided by ours with ``per_channel=True``;
* shared mode: fastest shared-mask peer (timm ``couple_channels=True``, ``dropblock.DropBlock2D``) divided
  by ours with ``per_channel=False``.

Each ratio is given twice: of the medians, and *paired* (the median over rounds of the peer's time divided by
ours in the same round), which cancels the drift of a shared machine's speed between rounds.

"Saved" is what autograd keeps for backward (unique storages seen by ``saved_tensors_hooks``, the input
itself excluded), in bytes per input element.

Usage::

    .venv/bin/python benchmarks/bench_op.py            # full run
    .venv/bin/python benchmarks/bench_op.py --quick    # fewer repetitions, for a smoke test

Timings are never asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from typing import Callable

import torch
from torch import Tensor, nn

from dropblock_inject import DropBlock2d

SHAPES = [(16, 256, 14, 14), (16, 1024, 14, 14), (16, 512, 7, 7), (16, 2048, 7, 7)]
KEEP_PROB = 0.9
BLOCK = 7

PER_CHANNEL = "per-channel"
SHARED = "shared"


def _candidates() -> list[tuple[str, str, bool, nn.Module]]:
    """(name, mode, is_ours, module), all in training mode."""
    import dropblock
    import timm.layers
    import torchvision.ops

    drop = 1.0 - KEEP_PROB
    cands = [
        ("ours per_channel=True", PER_CHANNEL, True, DropBlock2d(BLOCK, KEEP_PROB, per_channel=True)),
        ("torchvision DropBlock2d", PER_CHANNEL, False, torchvision.ops.DropBlock2d(p=drop, block_size=BLOCK)),
        ("timm couple_channels=False", PER_CHANNEL, False,
         timm.layers.DropBlock2d(drop_prob=drop, block_size=BLOCK, couple_channels=False)),
        ("ours per_channel=False", SHARED, True, DropBlock2d(BLOCK, KEEP_PROB, per_channel=False)),
        ("timm couple_channels=True", SHARED, False,
         timm.layers.DropBlock2d(drop_prob=drop, block_size=BLOCK, couple_channels=True)),
        ("dropblock DropBlock2D", SHARED, False, dropblock.DropBlock2D(drop_prob=drop, block_size=BLOCK)),
    ]
    for _, _, _, m in cands:
        m.train()
    return cands


def _step(module: nn.Module, x: Tensor, grad: Tensor) -> None:
    x.grad = None
    module(x).backward(grad)


def _time_once(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
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


def bench_shape(shape: tuple[int, ...], rounds: int, warmup: int) -> dict[str, dict]:
    cands = _candidates()
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    times: dict[str, list[float]] = {name: [] for name, *_ in cands}
    order = random.Random(0)
    for r in range(warmup + rounds):
        # a fresh random order every round: no candidate always runs after the same one (whose memory traffic
        # decides what is left in the caches)
        for name, _, _, m in order.sample(cands, len(cands)):
            t = _time_once(lambda: _step(m, x, grad))
            if r >= warmup:
                times[name].append(t)
    results: dict[str, dict] = {}
    for name, mode, ours, m in cands:
        results[name] = {
            "mode": mode,
            "ours": ours,
            "median_ms": statistics.median(times[name]),
            "times": times[name],
            "saved": saved_bytes_per_element(m, x),
        }
    return results


def _ratio(results: dict[str, dict], mode: str) -> tuple[float, float, str]:
    """(fastest peer's median / ours, median over rounds of that peer's time / ours in the same round, peer)."""
    peers = {n: r for n, r in results.items() if r["mode"] == mode and not r["ours"]}
    ours = next(r for r in results.values() if r["mode"] == mode and r["ours"])
    best = min(peers, key=lambda n: peers[n]["median_ms"])
    paired = statistics.median(p / o for p, o in zip(peers[best]["times"], ours["times"]))
    return float(peers[best]["median_ms"]) / float(ours["median_ms"]), paired, best


def print_table(shape: tuple[int, ...], results: dict[str, dict]) -> tuple[float, float, float, float]:
    print(f"\n### {tuple(shape)}  (fwd+bwd, fp32, keep_prob={KEEP_PROB}, block_size={BLOCK})\n")
    print("| candidate | mode | median ms | saved for backward (B/elem) |")
    print("|---|---|---:|---:|")
    for name, r in results.items():
        label = f"**{name}**" if r["ours"] else name
        print(f"| {label} | {r['mode']} | {r['median_ms']:.3f} | {r['saved']:.3f} |")
    pc, pc_paired, pc_peer = _ratio(results, PER_CHANNEL)
    sh, sh_paired, sh_peer = _ratio(results, SHARED)
    print(f"\nper-channel speed-up: **{pc:.1f}x** (paired {pc_paired:.1f}x, vs {pc_peer}); "
          f"shared speed-up: **{sh:.2f}x** (paired {sh_paired:.2f}x, vs {sh_peer})")
    return pc, pc_paired, sh, sh_paired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per shape (default 40, quick 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 5, quick 2)")
    args = parser.parse_args()
    rounds = args.rounds if args.rounds is not None else (5 if args.quick else 40)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs; {rounds} rounds after {warmup} warm-up, "
          f"medians; load average at start: {_load()}")
    summary = []
    for shape in SHAPES:
        summary.append((shape, *print_table(shape, bench_shape(shape, rounds, warmup))))
    print("\n### Summary\n")
    print("| shape | per-channel: fastest peer / ours | paired | shared: fastest peer / ours | paired |")
    print("|---|---:|---:|---:|---:|")
    for shape, pc, pc_paired, sh, sh_paired in summary:
        print(f"| {tuple(shape)} | {pc:.1f}x | {pc_paired:.1f}x | {sh:.2f}x | {sh_paired:.2f}x |")
    print(f"\nload average at end: {_load()} (other work on the machine makes every timing noisier)")


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()
