"""Command line: ``python -m dropblock_inject {demo,plan,recipes,show,viz}``."""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .surgery import SurgeryError, format_plan, inject, plan, strip
from .recipe import RecipeError, available_recipes, load_recipe

__all__ = ["main", "build_model"]


def build_model(spec: str) -> nn.Module:
    """Build a model with random weights from ``torchvision:NAME``, ``timm:NAME`` or ``module.path:factory``.

    Args:
        spec: the model specification.

    Returns:
        The model, in eval mode.
    """
    source, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"model spec {spec!r} must look like torchvision:resnet50, timm:NAME or module.path:factory")
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None).eval()
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False).eval()
    module = importlib.import_module(source)
    return getattr(module, name)().eval()


def _parse_input(text: str) -> torch.Tensor:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--input must look like 1x3x224x224, got {text!r}") from None
    return torch.randn(shape)


def _cmd_plan(args: argparse.Namespace) -> None:
    model = build_model(args.model)
    print(format_plan(plan(model, args.recipe, example_input=_parse_input(args.input))))


def _cmd_recipes(args: argparse.Namespace) -> None:
    names = available_recipes()
    width = max(len(n) for n in names)
    for name in names:
        description = load_recipe(name).description
        print(f"{name.ljust(width)}  {description.split('. ')[0].split(': ')[0]}")


def _cmd_show(args: argparse.Namespace) -> None:
    import yaml

    print(yaml.safe_dump(load_recipe(args.recipe).to_dict(), sort_keys=False), end="")


def _cmd_demo(args: argparse.Namespace) -> None:
    """ResNet-50 + resnet50_paper: plan, a few scheduled training steps, strip, ONNX export and parity."""
    import torchvision

    from .schedule import KeepProbScheduler

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None, num_classes=10)
    print("== plan: resnet50_paper on torchvision resnet50 ==")
    print(format_plan(plan(model, "resnet50_paper")))
    start = time.perf_counter()
    inject(model, "resnet50_paper")
    print(f"\ninjected in {time.perf_counter() - start:.3f} s")
    # synthetic data that needs no download: blobs whose class sets the colour and position
    n, size = args.batch * args.steps, args.size
    labels = torch.randint(0, 10, (n,))
    images = torch.randn(n, 3, size, size) * 0.5
    for i, y in enumerate(labels.tolist()):
        images[i, y % 3, (y * size) // 10:(y * size) // 10 + size // 4] += 2.0
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    sched = KeepProbScheduler(model, total_steps=args.steps)
    model.train()
    print(f"\n== training {args.steps} steps, batch {args.batch}, {size}px ==")
    for step in range(args.steps):
        sched.step(step)
        x, y = images[step * args.batch:(step + 1) * args.batch], labels[step * args.batch:(step + 1) * args.batch]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: keep_prob={sched.keep_prob:.4f} loss={loss.item():.4f}")
    strip(model).eval()
    x = images[: args.batch]
    with torch.no_grad():
        ref = model(x)
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet50.onnx"
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        onnx_out = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    diff = (onnx_out - ref).abs().max().item()
    print(f"\nstripped; ONNX export + onnxruntime max |diff| = {diff:.2e}")
    if not torch.allclose(onnx_out, ref, atol=1e-4, rtol=1e-4):
        raise SystemExit("demo: ONNX output does not match PyTorch")
    print("demo OK")


def _cmd_viz(args: argparse.Namespace) -> None:
    """Three PNGs: DropBlock masks on a photo, the recipe's schedule on the model, and its plan per stage."""
    from . import viz  # matplotlib is optional: an ImportError here names the extra to install
    from .schedule import KeepProbScheduler

    viz._figure_tools()  # fail before building anything when matplotlib is missing
    if args.steps < 1:
        raise ValueError(f"--steps must be a positive int, got {args.steps}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.model)
    example = _parse_input(args.input) if args.input else None  # None: 1x3x224x224, only if the recipe needs shapes
    points = plan(model, args.recipe, example_input=example)
    name = load_recipe(args.recipe).name
    n_branch = sum(p.kind == "branch" for p in points)
    paths = [viz.plot_plan(out / "plan.png", points, title=f"{args.model} + {name}\n{len(points)} DropBlocks: "
                                                            f"{n_branch} branch, {len(points) - n_branch} shortcut")]
    inject(model, args.recipe, example_input=example)
    try:
        sched = KeepProbScheduler(model, total_steps=args.steps)
        paths.append(viz.plot_schedule(out / "schedule.png", sched,
                                       title=f"{args.model} + {name}: keep_prob over {args.steps} steps"))
    finally:
        strip(model)
    paths.append(viz.plot_masks(out / "masks.png", seed=args.seed))
    for path in paths:
        print(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m dropblock_inject`` and the ``dropblock-inject`` script."""
    parser = argparse.ArgumentParser(prog="dropblock_inject", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="print where a recipe inserts DropBlock")
    p.add_argument("--model", required=True, help="torchvision:resnet50, timm:NAME or module.path:factory")
    p.add_argument("--recipe", required=True, help="a shipped recipe name or a YAML path")
    p.add_argument("--input", default="1x3x224x224", help="example input shape (default 1x3x224x224)")
    p.set_defaults(func=_cmd_plan)
    sub.add_parser("recipes", help="list shipped recipes").set_defaults(func=_cmd_recipes)
    s = sub.add_parser("show", help="print a recipe")
    s.add_argument("recipe")
    s.set_defaults(func=_cmd_show)
    d = sub.add_parser("demo", help="inject ResNet-50, train a few scheduled steps, strip, export to ONNX")
    d.add_argument("--steps", type=int, default=4)
    d.add_argument("--batch", type=int, default=4)
    d.add_argument("--size", type=int, default=96)
    d.set_defaults(func=_cmd_demo)
    v = sub.add_parser("viz", help="write PNGs of DropBlock masks, the recipe's schedule and its plan (needs the "
                                   "viz extra)")
    v.add_argument("--out", required=True, help="directory for masks.png, schedule.png and plan.png")
    v.add_argument("--model", default="torchvision:resnet50", help="model spec (default: %(default)s)")
    v.add_argument("--recipe", default="resnet50_paper", help="recipe name or YAML path (default: %(default)s)")
    v.add_argument("--steps", type=int, default=10_000, help="total training steps of the schedule (default: "
                                                             "%(default)s)")
    v.add_argument("--input", default=None, help="example input shape, for recipes that select by stride "
                                                 "(default: 1x3x224x224, only when the recipe needs one)")
    v.add_argument("--seed", type=int, default=0, help="seed of the masks (default: 0)")
    v.set_defaults(func=_cmd_viz)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (RecipeError, SurgeryError, ValueError, ImportError, OSError) as e:
        print(f"dropblock_inject: error: {e}", file=sys.stderr)
        return 2
    return 0
