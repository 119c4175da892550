"""Time of plan/inject/strip on ResNet-50 and a few larger models (CPU). Prints medians, asserts nothing.

    python benchmarks/bench_inject.py
"""

from __future__ import annotations

import statistics
import time

import timm
import torchvision

import dropblock_inject as dbi

CASES = [
    ("torchvision resnet50", lambda: torchvision.models.resnet50(), "resnet50_paper"),
    ("torchvision resnet50", lambda: torchvision.models.resnet50(), "paper_generic"),
    ("torchvision resnet152", lambda: torchvision.models.resnet152(), "resnet_paper"),
    ("timm seresnet50", lambda: timm.create_model("seresnet50", pretrained=False), "resnet50_paper"),
    ("torchvision wide_resnet101_2", lambda: torchvision.models.wide_resnet101_2(), "resnet_paper"),
    ("torchvision efficientnet_b3", lambda: torchvision.models.efficientnet_b3(), "paper_generic"),
]


def main(repeats: int = 5) -> None:
    print("| model | recipe | points | inject (s) | strip (s) |")
    print("|---|---|---|---|---|")
    for name, ctor, recipe in CASES:
        model = ctor()
        inject_t, strip_t = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            dbi.inject(model, recipe)
            inject_t.append(time.perf_counter() - t)
            points = len(dbi.injected_dropblocks(model))
            t = time.perf_counter()
            dbi.strip(model)
            strip_t.append(time.perf_counter() - t)
        print(f"| {name} | {recipe} | {points} | {statistics.median(inject_t):.3f} | {statistics.median(strip_t):.4f} |")


if __name__ == "__main__":
    main()
