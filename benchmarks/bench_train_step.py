"""ResNet-50 training step, eager or compiled, CPU or CUDA: the cost of DropBlock, ours against the peers'.

One train step = forward, cross-entropy loss, ``zero_grad``, backward, SGD (momentum 0.9) step, on a fixed
random batch (default 8 x 3 x 160 x 160). Candidates, each a separate model with its own optimizer:

* ``tv plain``           torchvision ``resnet50`` (the baseline of the ``tv`` rows);
* ``tv + dbi``           the same with ``dropblock_inject.inject(model, "resnet50_paper")``: 36 DropBlocks
                         (27 branch + 9 shortcut, layer3 + layer4), keep_prob at the paper's target
                         (0.9 in layer4, 0.975 in layer3), block 7, per-channel masks;
* ``tv + tv.ops``        the same placement wired by hand with ``torchvision.ops.DropBlock2d`` (``p`` =
                         1 - keep_prob, block 7): bn1/bn2/bn3 become ``Sequential(bn, DropBlock2d)``, the
                         projection shortcut gets a DropBlock after its BN, and an identity shortcut becomes
                         the DropBlock itself (``Bottleneck`` applies ``downsample`` to the shortcut);
* ``timm plain``         timm ``resnet50`` (the baseline of the ``timm`` rows);
* ``timm drop_block``    timm ``resnet50(drop_block_rate=0.1)``: timm's own placement, one shared-channel
                         DropBlock after bn2 of each layer3 (block 5, gamma x 0.25) and layer4 (block 3) block:
                         9 DropBlocks, not the paper's 36;
* ``timm + dbi``         timm ``resnet50`` with ``resnet50_paper`` (36 DropBlocks, as ``tv + dbi``).

Time: all candidates run in one process, interleaved after a warm-up. Every round draws a new random order
and runs it forwards then backwards (A B C C B A), so each candidate's two steps of a round sit symmetrically
in it and a drift of the machine's speed that is linear over the round weighs on all candidates alike. The
table reports the median step time, its overhead over the plain model of the same family, and the *paired*
overhead: the median over rounds of (candidate's two steps / baseline's two steps of the same round), with
a 95% bootstrap interval for that median (how far the run resolves the difference; it narrows with more
rounds) and the quartiles of the ratios (the round-to-round spread, which does not).

Time inside the DropBlocks: for the ``dbi`` candidates, a few extra steps time every injected DropBlock
directly, forward (module hooks) and backward (hooks on its autograd node), and report the sum per step as
a share of the baseline's median step. That is the op's own cost, measured with far less noise than the
difference of two whole steps; it leaves out indirect costs such as caches the op evicts for the next layer.

Memory: one extra step of each candidate under ``torch.profiler`` with ``profile_memory=True``; the peak of
the running sum of every CPU tensor allocation and free during the step (forward, backward, optimizer step,
gradients freed before it starts) is the "step peak": activations saved for backward, gradients, transient
buffers. "Total peak" adds what is live before the step (parameters, buffers, momentum). Both are exact byte
counts of tensor memory (no allocator caching, no RSS noise) and do not depend on machine load.

Usage::

    .venv/bin/python benchmarks/bench_train_step.py                       # batch 8 at 160 px, 15 rounds
    .venv/bin/python benchmarks/bench_train_step.py --batch 16 --size 224 --rounds 10
    .venv/bin/python benchmarks/bench_train_step.py --only "tv plain" "tv + dbi" --profile "tv + dbi"

``--profile NAME`` prints a torch.profiler table (top ops by self CPU time) of one step of that candidate.

``--compile`` compiles every candidate's model the same way (``torch.compile``, inductor, default options)
before the warm-up (the first warm-up step compiles); the optimizer still steps the same parameters. The
"inside DropBlocks" column needs module hooks, which compiled graphs do not run: it is skipped then.
``--device cuda`` runs on the GPU (it fails with a clear message when CUDA is absent); every timed step
ends with ``torch.cuda.synchronize()``, the memory columns are ``torch.cuda.max_memory_allocated`` deltas,
and the inside column is skipped (host-side hooks do not time asynchronous kernels).

The run ends with the criterion for the step, eager or compiled: each ``dbi`` candidate's paired overhead
over its plain model <= 3% (at the paper's 36 sites), with its 95% bootstrap interval.
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
import torch.nn.functional as F
from torch import nn

import dropblock_inject as dbi

KEEP_PROB = 0.9  # the paper's target in layer4; layer3 drops a quarter of that rate
BLOCK = 7


@dataclass
class Candidate:
    name: str
    baseline: str  # the plain model of the same family ("" for a baseline itself)
    model: nn.Module
    device: torch.device = torch.device("cpu")
    compiled: bool = False
    opt: torch.optim.Optimizer = field(init=False)
    run: nn.Module = field(init=False)  # the model, or its compiled wrapper
    times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.model.to(self.device).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.run = torch.compile(self.model) if self.compiled else self.model

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.run(x), y)
        loss.backward()
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ------------------------------------------------------------------------------------------------ models


def tv_resnet50() -> nn.Module:
    import torchvision

    torch.manual_seed(0)  # the same initial weights for every torchvision candidate
    return torchvision.models.resnet50()


def timm_resnet50(**kwargs) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet50", pretrained=False, **kwargs)


def with_dropblock_inject(model: nn.Module) -> nn.Module:
    """``resnet50_paper``; inject leaves every DropBlock at its final keep_prob (0.9 / 0.975)."""
    dbi.inject(model, "resnet50_paper")
    keep = sorted({round(m.keep_prob, 6) for m in dbi.injected_dropblocks(model)})
    assert len(dbi.injected_dropblocks(model)) == 36 and keep == [0.9, 0.975], keep
    return model


def with_torchvision_dropblock(model: nn.Module) -> nn.Module:
    """The paper's placement with ``torchvision.ops.DropBlock2d``, wired by hand (see the module docstring)."""
    from torchvision.ops import DropBlock2d

    count = 0
    for layer, drop in (("layer3", (1 - KEEP_PROB) / 4), ("layer4", 1 - KEEP_PROB)):
        for block in getattr(model, layer):
            for bn in ("bn1", "bn2", "bn3"):
                setattr(block, bn, nn.Sequential(getattr(block, bn), DropBlock2d(drop, BLOCK)))
            if block.downsample is None:
                block.downsample = DropBlock2d(drop, BLOCK)  # identity shortcut: downsample(x) = DropBlock(x)
            else:
                block.downsample.append(DropBlock2d(drop, BLOCK))
            count += 4
    assert count == 36
    return model


FACTORIES: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "tv plain": ("", tv_resnet50),
    "tv + dbi": ("tv plain", lambda: with_dropblock_inject(tv_resnet50())),
    "tv + tv.ops": ("tv plain", lambda: with_torchvision_dropblock(tv_resnet50())),
    "timm plain": ("", timm_resnet50),
    "timm drop_block": ("timm plain", lambda: timm_resnet50(drop_block_rate=0.1)),
    "timm + dbi": ("timm plain", lambda: with_dropblock_inject(timm_resnet50())),
}


# ------------------------------------------------------------------------------------------------ measurements


def state_bytes(c: Candidate) -> int:
    """Bytes of the tensors live between steps: parameters, buffers, optimizer state (gradients excluded)."""
    tensors = {t.data_ptr(): t.numel() * t.element_size()
               for t in [*c.model.parameters(), *c.model.buffers()] if t.numel()}
    for state in c.opt.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor) and t.numel():
                tensors[t.data_ptr()] = t.numel() * t.element_size()
    return sum(tensors.values())


def step_peak_bytes(c: Candidate, x: torch.Tensor, y: torch.Tensor) -> int:
    """Peak of the running sum of tensor allocations during one step, above what was live at its start."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    c.opt.zero_grad(set_to_none=True)  # before profiling: frees of earlier blocks are not reported
    if c.device.type == "cuda":
        torch.cuda.synchronize(c.device)
        torch.cuda.reset_peak_memory_stats(c.device)
        start = torch.cuda.memory_allocated(c.device)
        c.step(x, y)
        return torch.cuda.max_memory_allocated(c.device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = F.cross_entropy(c.run(x), y)
        loss.backward()
        c.opt.step()
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            allocs.append((e.start_time_ns, e.extra_fields.alloc_size))
    allocs.sort()
    live = peak = 0
    for _, size in allocs:
        live += size
        peak = max(peak, live)
    return peak


def time_inside_dropblocks(c: Candidate, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Median seconds per step spent inside the injected DropBlocks, forward and backward.

    Forward: from a module's pre-hook to its hook. Backward: from the pre-hook of the autograd node that
    produced the module's output to that node's hook (the op's whole backward is that one node).
    """
    pc = time.perf_counter
    started: dict[object, float] = {}
    input_node: dict[nn.Module, object] = {}
    spent = [0.0]

    def before(key: object) -> None:
        started[key] = pc()

    def after(key: object) -> None:
        spent[0] += pc() - started.pop(key)

    def on_input(module: nn.Module, args: tuple) -> None:
        input_node[module] = args[0].grad_fn
        before(module)

    def on_output(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        after(module)
        node = out.grad_fn
        if node is not None and node is not input_node.pop(module):  # not an identity (e.g. keep_prob 1)
            node.register_prehook(lambda grads, node=node: before(node))
            node.register_hook(lambda grads_in, grads_out, node=node: after(node))

    handles = []
    for m in dbi.injected_dropblocks(c.model):
        handles += [m.register_forward_pre_hook(on_input), m.register_forward_hook(on_output)]
    per_step = []
    try:
        for _ in range(steps):
            spent[0] = 0.0
            c.step(x, y)
            per_step.append(spent[0])
    finally:
        for h in handles:
            h.remove()
    return statistics.median(per_step)


def median_interval(values: list[float], level: float = 0.95, resamples: int = 2000) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of ``values``, seeded (the same data give the same interval).

    Resamples whole rounds, so it treats the rounds' paired ratios as independent: the pairing within a round
    is what removes the machine's drift between rounds.
    """
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = round((1 - level) / 2 * resamples)
    return medians[tail], medians[resamples - 1 - tail]


def profile_step(c: Candidate, x: torch.Tensor, y: torch.Tensor, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    c.step(x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        c.step(x, y)
    print(f"\n### torch.profiler, one step of {c.name!r} (self CPU time)\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=160, help="input height and width")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (two steps per candidate each)")
    parser.add_argument("--inside-steps", type=int, default=5,
                        help="steps timing the inside of the DropBlocks of the dbi candidates (0: skip)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per candidate first (>= 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--only", nargs="+", choices=list(FACTORIES), help="run these candidates only")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--profile", nargs="+", default=[], choices=list(FACTORIES),
                        help="print a torch.profiler table of one step of these candidates")
    parser.add_argument("--compile", action="store_true", help="torch.compile every candidate (inductor)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here (torch.cuda.is_available() is False; "
                     f"torch {torch.__version__}, built for CUDA {torch.version.cuda}); run it on a GPU machine")
    if args.compile or device.type == "cuda":
        args.inside_steps = 0  # hooks do not run inside compiled graphs, nor time asynchronous kernels

    args.warmup = max(args.warmup, 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals in a slowly trained net would time the FPU, not the model
    names = args.only or list(FACTORIES)
    for n in list(names):  # a candidate's baseline always runs too
        base = FACTORIES[n][0]
        if base and base not in names:
            names.insert(0, base)
    cands = [Candidate(n, FACTORIES[n][0], FACTORIES[n][1](), device, args.compile) for n in names]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)

    where = (f"CUDA: {torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"CPU: {platform.processor() or platform.machine()}")
    print(f"# ResNet-50 train step{' (compiled, inductor)' if args.compile else ''}, {where}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch} x 3 x {args.size} x {args.size}, {args.rounds} interleaved rounds "
          f"(+{args.warmup} warm-up), load average before: {os.getloadavg()[0]:.2f}")
    for c in list(cands):  # the first warm-up step; a candidate that cannot run this shape is dropped
        try:
            c.step(x, y)
        except Exception as e:  # noqa: BLE001 - e.g. torchvision's DropBlock2d and an even clipped block
            print(f"skipping {c.name!r}: {type(e).__name__}: {e}")
            cands.remove(c)
            for d in [d for d in cands if d.baseline == c.name]:
                d.baseline = ""
    for _ in range(args.warmup - 1):
        for c in cands:
            c.step(x, y)
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = rng.sample(cands, len(cands))
        for c in order + order[::-1]:
            t = time.perf_counter()
            c.step(x, y)
            c.times.append(time.perf_counter() - t)
    load_after = os.getloadavg()[0]

    inside = {c.name: time_inside_dropblocks(c, x, y, args.inside_steps)
              for c in cands if args.inside_steps and dbi.injected_dropblocks(c.model)}

    mem = {}
    if not args.no_memory:
        for c in cands:
            mem[c.name] = (step_peak_bytes(c, x, y), state_bytes(c))

    by_name = {c.name: c for c in cands}
    med = {c.name: statistics.median(c.times) for c in cands}
    goals: list[str] = []
    print(f"load average after: {load_after:.2f}\n")
    print("| candidate | DropBlocks | median step (s) | min (s) | time overhead | paired overhead [95% CI] (quartiles) "
          "| inside DropBlocks | step peak (MiB) | step peak overhead | total peak (MiB) | total peak overhead |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in cands:
        n_db = sum(isinstance(m, dbi.DropBlock2d) or type(m).__name__ == "DropBlock2d" for m in c.model.modules())
        if c.baseline:
            base = by_name[c.baseline].times
            over = f"{100 * (med[c.name] / med[c.baseline] - 1):+.1f}%"
            pairs = [(t1 + t2) / (b1 + b2) for t1, t2, b1, b2 in
                     zip(c.times[::2], c.times[1::2], base[::2], base[1::2])]
            q1, q2, q3 = statistics.quantiles(pairs, n=4) if len(pairs) >= 2 else [pairs[0]] * 3
            lo, hi = median_interval(pairs)
            paired = (f"{100 * (q2 - 1):+.1f}% [{100 * (lo - 1):+.1f}%, {100 * (hi - 1):+.1f}%] "
                      f"({100 * (q1 - 1):+.1f}%, {100 * (q3 - 1):+.1f}%)")
            if "dbi" in c.name:
                verdict = "met" if hi <= 1.03 else ("not met" if lo > 1.03 else "not resolved (interval spans 3%)")
                goals.append(f"{c.name} over {c.baseline}: paired {100 * (q2 - 1):+.1f}% "
                             f"[{100 * (lo - 1):+.1f}%, {100 * (hi - 1):+.1f}%]: {verdict}")
        else:
            over = paired = "baseline"
        if c.name in inside:
            ref = med[c.baseline] if c.baseline else med[c.name]
            share = f"{1e3 * inside[c.name]:.1f} ms = {100 * inside[c.name] / ref:.2f}%"
        else:
            share = "-"
        row = f"| {c.name} | {n_db} | {med[c.name]:.3f} | {min(c.times):.3f} | {over} | {paired} | {share} |"
        if mem:
            peak, state = mem[c.name]
            if c.baseline:
                bpeak, bstate = mem[c.baseline]
                p_over = f"{100 * (peak / bpeak - 1):+.2f}%"
                t_over = f"{100 * ((peak + state) / (bpeak + bstate) - 1):+.2f}%"
            else:
                p_over = t_over = "baseline"
            row += f" {peak / 2**20:.1f} | {p_over} | {(peak + state) / 2**20:.1f} | {t_over} |"
        else:
            row += " - | - | - | - |"
        print(row)
    spread = {c.name: (statistics.quantiles(c.times, n=4) if len(c.times) >= 4 else [min(c.times)] * 3)
              for c in cands}
    print("\nquartiles of step time (s): " + "; ".join(
        f"{n}: {q[0]:.3f}/{q[1]:.3f}/{q[2]:.3f}" for n, q in spread.items()))

    if goals:
        kind = "compiled" if args.compile else "eager"
        print(f"\ncriterion ({kind} step overhead <= 3%, paired, 95% bootstrap interval): " + "; ".join(goals))

    for n in args.profile:
        profile_step(by_name.get(n) or Candidate(n, FACTORIES[n][0], FACTORIES[n][1](), device, args.compile), x, y)


if __name__ == "__main__":
    main()
