"""What the fused CUDA kernel costs per element, read from its machine code: no GPU needed.

No GPU may be at hand, and a timing needs one. What can be counted without one is the work: every launch the
op makes for an input (recorded by ``tools/_triton_aot.py`` on meta tensors) is compiled for a
GPU target with the ``ptxas`` Triton ships, disassembled with its ``cuobjdump``, and its SASS instructions
counted. The kernels' loops are unrolled (``tl.static_range``), so a program's instruction count is what each
thread executes (up to the branches of a 64-bit division, counted both ways), and

    thread-instructions per element = instructions x threads launched / input elements.

The same is counted for the floor, a Triton kernel computing ``x * m`` with a precomputed fp32 mask (one
read of each, one write), once forward and once backward. Loads (``LDG``) per element are shown too. An H100
issues about 34 T thread-instructions/s and moves 3.35 TB/s, so an fp32 elementwise kernel (12 bytes per
element) is bound by memory below ~120 instructions per element; the figures are counts, not times.

Usage::

    python benchmarks/triton_sass.py                 # sm_90, the ResNet-50 group 3/4 shapes of bench_op.py
    python benchmarks/triton_sass.py --arch 80 --dtype bfloat16 --channels-last
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # _triton_aot: dev tooling

SHAPES = [(16, 256, 14, 14), (16, 1024, 14, 14), (16, 512, 7, 7), (16, 2048, 7, 7)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"\bBRA\s+(?:`\()?(0x[0-9a-f]+)")


def floor_kernel():
    """``out = x * m``, the elementwise floor, as a Triton program (masked, 1024 elements per program)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _floor(x_ptr, m_ptr, out_ptr, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < numel
        x = tl.load(x_ptr + offs, mask=live)
        tl.store(out_ptr + offs, (x * tl.load(m_ptr + offs, mask=live)).to(out_ptr.dtype.element_ty), mask=live)

    return _floor


def sass(kernel) -> list[tuple[int, str]]:
    """The SASS instructions of a compiled kernel with their addresses (cuobjdump, from Triton's NVIDIA
    backend)."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    code = []
    for m in map(LINE.match, out.splitlines()):
        if m:
            address, op = int(m.group(1), 16), m.group(2)
            target = BRANCH.search(op)
            if target and int(target.group(1), 16) == address:  # the trap after EXIT; alignment NOPs follow
                break
            code.append((address, op))
    return code


def count(launch, arch: int, numel: int) -> tuple[float, float]:
    """Thread-instructions and loads per input element of one launch.

    Raises:
        RuntimeError: the program has a loop (a branch back), so its instruction count is not what a thread
            executes.
    """
    from _triton_aot import compile_launch

    kernel = compile_launch(launch, arch)
    code = sass(kernel)
    for address, op in code:
        target = BRANCH.search(op)
        if target and int(target.group(1), 16) < address:
            raise RuntimeError(f"{launch.name}: a loop at {address:#x} ({op}): the count would not be per thread")
    threads = launch.grid[0] * kernel.metadata.num_warps * 32
    loads = sum(op.split()[1 if op.startswith("@") else 0].startswith("LDG") for _, op in code)
    return len(code) * threads / numel, loads * threads / numel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80: A100, 90: H100)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--channels-last", action="store_true", help="channels-last inputs and gradients")
    parser.add_argument("--block-size", type=int, default=7)
    args = parser.parse_args()

    from _triton_aot import Launch, launches

    dtype = DTYPES[args.dtype]
    layout = "channels_last" if args.channels_last else "contiguous"
    floor = floor_kernel()
    print(f"sm_{args.arch}, {args.dtype}, {layout}, "
          f"block {args.block_size}, per-channel masks; thread-instructions per input element (LDG per element)")
    print("| shape | seeds | rows | mask | apply | forward + backward | floor, fwd + bwd | ours / floor "
          "| compiled graph's mask op (seeds, rows, mask, scale) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        numel = torch.Size(shape).numel()
        per = collections.defaultdict(float)
        loads = 0.0
        for launch in launches(shape, dtype, block_size=args.block_size, layout=layout):
            n, ld = count(launch, args.arch, numel)
            per[launch.name] += n
            loads += ld
        total = sum(per.values())
        meta = torch.empty(numel, dtype=dtype, device="meta")
        grid = (-(-numel // 1024),)
        one = Launch("floor", floor, grid, (meta, meta, meta, numel), {"BLOCK": 1024})
        floor_n, floor_ld = count(one, args.arch, numel)
        mask_only = sum(count(launch, args.arch, numel)[0]
                        for launch in launches(shape, dtype, block_size=args.block_size, compiled=True))
        print(f"| {shape} | {per['seeds']:.1f} | {per['rows']:.1f} | {per['mask']:.1f} | {per['apply']:.1f} "
              f"| {total:.1f} ({loads:.2f}) | {2 * floor_n:.1f} ({2 * floor_ld:.2f}) | {total / (2 * floor_n):.2f}x "
              f"| {mask_only:.1f} |")


if __name__ == "__main__":
    main()
