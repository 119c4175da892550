"""Time of plan/inject/strip on ResNet-50, larger classifiers and every torchvision detector (CPU). Prints
medians and how the example forward ran (empty batch, meta device or real), asserts nothing.

    python benchmarks/bench_inject.py --threads 1 [--repeats 5]

Goals: ResNet-50 ``paper_generic`` < 0.1 s, every torchvision detector, Ultralytics YOLOv8n and Hugging Face
DETR-R50 < 1 s (a detector on its natural input), also with both cores busy. Numbers are noisy on shared
machines. Ultralytics builds offline (``YOLO_OFFLINE=1``, set here for this script's process).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from typing import Any, Callable

import timm
import torch
import torchvision
from torch import nn

import dropblock_inject as dbi
from dropblock_inject.surgery.s12_shapes import ShapeLog

X = torch.randn(1, 3, 224, 224)
X640 = torch.randn(1, 3, 640, 640)


def yolov8n() -> nn.Module:
    """Ultralytics' YOLOv8n network from its YAML (random weights, nothing downloaded)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    with contextlib.redirect_stdout(None):
        from ultralytics.nn.tasks import DetectionModel

        return DetectionModel("yolov8n.yaml", verbose=False)


def detr_r50() -> nn.Module:
    """Hugging Face DETR with its default ResNet-50 backbone (transformers' own, random weights)."""
    import transformers as T

    return T.DetrForObjectDetection(T.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
                                                 backbone=None, backbone_config=T.ResNetConfig(
                                                     out_features=["stage4"])))
IMAGES = [torch.rand(3, 480, 640), torch.rand(3, 427, 640)]

CASES: list[tuple[str, Callable[[], nn.Module], str, Any]] = [
    ("torchvision resnet50", lambda: torchvision.models.resnet50(), "resnet50_paper", None),
    ("torchvision resnet50", lambda: torchvision.models.resnet50(), "paper_generic", None),
    ("torchvision resnet152", lambda: torchvision.models.resnet152(), "resnet_paper", None),
    ("timm seresnet50", lambda: timm.create_model("seresnet50", pretrained=False), "resnet50_paper", None),
    ("torchvision wide_resnet101_2", lambda: torchvision.models.wide_resnet101_2(), "resnet_paper", None),
    ("torchvision efficientnet_b3", lambda: torchvision.models.efficientnet_b3(), "paper_generic", None),
    ("torchvision deeplabv3_resnet50", lambda: torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None), "paper_generic", X),
]
CASES += [("ultralytics yolov8n", yolov8n, "paper_generic", X640),
          ("transformers DETR-R50", detr_r50, "paper_generic", X640)]
for _name in torchvision.models.list_models(module=torchvision.models.detection):
    CASES.append((f"torchvision {_name}", lambda n=_name: torchvision.models.get_model(
        n, weights=None, weights_backbone=None), "paper_generic", IMAGES))


def main(repeats: int = 5) -> None:
    print("| model | recipe | points | inject (s) | strip (s) | example forward |")
    print("|---|---|---|---|---|---|")
    for name, ctor, recipe, example in CASES:
        model = ctor().eval()
        inject_t, strip_t = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            dbi.inject(model, recipe, example_input=example)
            inject_t.append(time.perf_counter() - t)
            points = len(dbi.injected_dropblocks(model))
            t = time.perf_counter()
            dbi.strip(model)
            strip_t.append(time.perf_counter() - t)
        how = ShapeLog(model, X if example is None else example).how
        if recipe != "paper_generic" and example is None:
            how = "none (path recipe)"
        print(f"| {name} | {recipe} | {points} | {statistics.median(inject_t):.3f} | "
              f"{statistics.median(strip_t):.4f} | {how} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    main(args.repeats)
