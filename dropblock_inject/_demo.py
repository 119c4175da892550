"""``python -m dropblock_inject demo``: the whole job on a ResNet-50, saying what it does before each slow phase."""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from . import KeepProbScheduler, format_plan, inject, load_recipe, plan, strip

__all__ = ["block_size_for", "run_demo", "missing_onnx_packages"]

RECIPE = "resnet50_paper"
DEV_EXTRA = 'pip install -e ".[dev]"'


def missing_onnx_packages() -> list[str]:
    """The packages of the ONNX parity check (``onnx``, ``onnxruntime``) that are not installed.

    Returns:
        Their names, in that order; empty when both are importable.
    """
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            found = importlib.util.find_spec(name) is not None
        except ValueError:  # a module set to None in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing


def _say(message: str) -> None:
    print(message, flush=True)


def _synthetic_data(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blobs whose class sets their colour channel and vertical position: learnable, no download."""
    labels = torch.randint(0, 10, (n,))
    images = torch.randn(n, 3, size, size) * 0.5
    for i, y in enumerate(labels.tolist()):
        images[i, y % 3, (y * size) // 10:(y * size) // 10 + max(size // 4, 1)] += 2.0
    return images, labels


def _onnx_parity(model: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> float:
    """Export ``model`` to ONNX, run it in onnxruntime, and return the largest difference from ``ref``."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet50.onnx"
        _say("exporting the stripped model to ONNX ...")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
        _say("running it in onnxruntime and comparing with PyTorch ...")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        onnx_out = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    return (onnx_out - ref).abs().max().item()


def block_size_for(size: int) -> tuple[dict, int]:
    """``resnet50_paper`` with its block size scaled to ``size``-px images: the paper's block 7 covers group 4's
    7x7 maps at 224 px; at 96 px those maps are 3x3 and block 3 does the same.

    Args:
        size: the images' side in pixels.

    Returns:
        The recipe as a dict, and its block size.
    """
    recipe = load_recipe(RECIPE).to_dict()
    block = max(1, min(7, -(-size // 32)))  # group 4's map side (stride 32), at most the paper's 7
    recipe["dropblock"]["block_size"] = block
    return recipe, block


def run_demo(args: argparse.Namespace) -> None:
    """ResNet-50 + resnet50_paper: plan, inject, a few scheduled training steps, strip, ONNX export and parity.

    Args:
        args: ``steps``, ``batch`` and ``size`` (positive ints, checked by the parser).

    Raises:
        ValueError: the trained model's eval output is not finite (images too small, e.g. 32 px).
        SystemExit: onnxruntime's output differs from PyTorch's.
    """
    import torchvision

    torch.manual_seed(0)
    steps, batch, size = args.steps, args.batch, args.size
    images, labels = _synthetic_data(batch * steps, size)
    _say("building torchvision resnet50 (random weights, 10 classes) ...")
    model = torchvision.models.resnet50(weights=None, num_classes=10)
    recipe, block = block_size_for(size)
    _say(f"planning {RECIPE} at {size} px with block_size {block}, the paper's 7 at 224 px scaled to the input "
         f"(nothing changes yet) ...\n")
    print(format_plan(plan(model, recipe, example_input=images[:1])))
    _say(f"\ninjecting {RECIPE} ...")
    start = time.perf_counter()
    inject(model, recipe, example_input=images[:1])
    _say(f"injected in {time.perf_counter() - start:.3f} s")
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    sched = KeepProbScheduler(model, total_steps=steps)
    model.train()
    _say(f"\ntraining {steps} steps, batch {batch}, {size} px, keep_prob ramping linearly "
         f"(the first step is the slowest) ...")
    for step in range(steps):
        sched.step(step)
        x, y = images[step * batch:(step + 1) * batch], labels[step * batch:(step + 1) * batch]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _say(f"step {step}: keep_prob={sched.keep_prob:.4f} loss={loss.item():.4f}")
    _say(f"(the ramp reaches keep_prob {sched.keep_prob_at(steps):g} at step {steps} = total_steps, one past the "
         f"last step run, as in the paper's code)")
    _say("\nstripping DropBlock (original modules back, trained weights kept) ...")
    strip(model).eval()
    x = images[:batch]
    with torch.no_grad():
        ref = model(x)
    if not torch.isfinite(ref).all():  # not DropBlock's doing: the plain torchvision model does the same
        raise ValueError(f"the trained model's eval output is not finite: after {steps} steps at {size} px from "
                         f"random weights, BatchNorm's running statistics do not fit the activations; use a "
                         f"larger --size (the default 96 works)")
    missing = missing_onnx_packages()
    if missing:
        _say(f"skipped the ONNX export and onnxruntime check: {' and '.join(missing)} not installed "
             f"(install the dev extra: {DEV_EXTRA})")
    else:
        diff = _onnx_parity(model, x, ref)
        _say(f"onnxruntime vs PyTorch: max |diff| = {diff:.2e}")
        if not diff <= 1e-4 + 1e-4 * ref.abs().max().item():
            raise SystemExit("demo: ONNX output does not match PyTorch")
    _say("demo OK")
