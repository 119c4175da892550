"""Command line: ``python -m dropblock_inject {demo,plan,recipes,show,viz}`` (or ``dropblock-inject ...``)."""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import torch
from torch import nn

from . import RecipeError, SurgeryError, available_recipes, format_plan, inject, load_recipe, plan, strip

__all__ = ["main", "build_model", "parse_input"]

DESCRIPTION = """\
Insert DropBlock into an existing PyTorch CNN with torch.fx, ramp its keep_prob during training, and strip
it before export. Start with 'demo' (ResNet-50 end to end on synthetic data), then 'plan' to see where a
recipe puts DropBlock in your model; 'recipes' lists the shipped recipes and 'show NAME' prints one."""

MODEL_HELP = "torchvision:NAME, timm:NAME or module.path:factory (a function returning the model)"


def _close(word: str, choices: Sequence[str]) -> str:
    matches = difflib.get_close_matches(word, choices, n=3)
    return f"; did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""


def build_model(spec: str) -> nn.Module:
    """Build a model with random weights from ``torchvision:NAME``, ``timm:NAME`` or ``module.path:factory``.

    Args:
        spec: the model specification.

    Returns:
        The model, in eval mode.

    Raises:
        ValueError: the spec is malformed or names no model (the message lists close matches), or the
            module path does not import.
    """
    source, _, name = spec.partition(":")
    if not source or not name:
        raise ValueError(f"--model {spec!r} must look like torchvision:resnet50, timm:NAME or module.path:factory")
    if source == "torchvision":
        import torchvision

        known = torchvision.models.list_models()
        if name.lower() not in known:  # get_model lower-cases the name too
            raise ValueError(f"unknown torchvision model {name!r}{_close(name.lower(), known)} "
                             f"(torchvision.models.list_models() has them all)")
        return torchvision.models.get_model(name, weights=None).eval()
    if source == "timm":
        import timm

        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r}{_close(name, timm.list_models())} "
                             f"(timm.list_models() has them all)")
        try:
            return timm.create_model(name, pretrained=False).eval()
        except RuntimeError as e:  # e.g. "Invalid pretrained tag (x) for resnet18."
            tags = timm.list_models(name.partition(".")[0], pretrained=True)
            raise ValueError(f"timm cannot build {name!r}: {str(e).rstrip('.')}{_close(name, tags)}") from None
    try:
        module = importlib.import_module(source)
    except ModuleNotFoundError as e:
        guess = difflib.get_close_matches(source, ["torchvision", "timm"], n=1)
        hint = f"; did you mean '{guess[0]}:{name}'?" if guess else ""
        raise ValueError(f"{source!r} was read as a Python module path (not torchvision/timm): {e}{hint}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        public = [a for a in dir(module) if not a.startswith("_")]
        raise ValueError(f"module {source!r} has no callable {name!r}{_close(name, public)}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"{source}:{name}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def parse_input(text: str) -> tuple[int, ...]:
    """An input shape such as ``1x3x224x224`` (N, C, H, W) or ``1x3x16x112x112`` (N, C, T, H, W).

    Args:
        text: the shape, sizes separated by ``x``.

    Returns:
        The shape as a tuple of positive ints.

    Raises:
        argparse.ArgumentTypeError: not 4 or 5 positive integers.
    """
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) not in (4, 5) or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"must be 4 or 5 positive sizes like 1x3x224x224 (N x C x H x W) or 1x3x16x112x112, got {text!r}")
    return shape


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with every usage error on one line (and exit status 2, as argparse's own)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cmd_plan(args: argparse.Namespace) -> None:
    model = build_model(args.model)
    print(format_plan(plan(model, args.recipe, example_input=torch.randn(args.input))))


def _cmd_recipes(args: argparse.Namespace) -> None:
    names = available_recipes()
    width = max(len(n) for n in names)
    for name in names:
        description = load_recipe(name).description
        print(f"{name.ljust(width)}  {description.split('. ')[0].split(': ')[0]}")


def _cmd_show(args: argparse.Namespace) -> None:
    import yaml

    print(yaml.safe_dump(load_recipe(args.recipe).to_dict(), sort_keys=False), end="")


def _cmd_viz(args: argparse.Namespace) -> None:
    """Three PNGs: DropBlock masks on a photo, the recipe's schedule on the model, and its plan per stage."""
    from . import KeepProbScheduler, viz  # matplotlib is optional: an ImportError here names the extra to install
    from .viz._common import figure_tools

    figure_tools()  # fail before building anything when matplotlib is missing
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.model)
    example = torch.randn(args.input) if args.input else None  # None: 1x3x224x224, only if the recipe needs shapes
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
    paths.append(viz.plot_masks(out / "masks.png", seed=args.seed, draws=args.draws))
    for path in paths:
        print(path)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def _build_parser(prog: str) -> argparse.ArgumentParser:
    from ._demo import run_demo

    parser = _Parser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults: dict[str, Any] = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}

    def command(name: str, func: Callable[[argparse.Namespace], None], text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text, **defaults)
        p.set_defaults(func=func)
        return p

    d = command("demo", run_demo, "inject DropBlock into a ResNet-50 (random weights) with resnet50_paper, train "
                                  "a few scheduled steps on synthetic data, strip it, export to ONNX and check "
                                  "onnxruntime against PyTorch")
    d.add_argument("--steps", type=_positive_int, default=4, help="training steps (keep_prob ramps over them)")
    d.add_argument("--batch", type=_positive_int, default=4, help="images per training step")
    d.add_argument("--size", type=_positive_int, default=96, help="side of the square synthetic images, in pixels")
    p = command("plan", _cmd_plan, "print where a recipe inserts DropBlock in a model (nothing is changed)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--recipe", required=True, help="a shipped recipe name (see 'recipes') or a YAML path")
    p.add_argument("--input", type=parse_input, default="1x3x224x224", help="example input shape, NxCxHxW")
    command("recipes", _cmd_recipes, "list the shipped recipes")
    s = command("show", _cmd_show, "print a recipe as YAML, defaults filled in")
    s.add_argument("recipe", help="a shipped recipe name or a YAML path")
    v = command("viz", _cmd_viz, "write PNGs of DropBlock masks, the recipe's schedule and its plan (needs the "
                                 "viz extra: pip install -e \".[viz]\")")
    v.add_argument("--out", required=True, help="directory for masks.png, schedule.png and plan.png")
    v.add_argument("--model", default="torchvision:resnet50", help=MODEL_HELP)
    v.add_argument("--recipe", default="resnet50_paper", help="recipe name or YAML path")
    v.add_argument("--steps", type=_positive_int, default=10_000, help="total training steps of the schedule")
    v.add_argument("--input", type=parse_input, default=None,
                   help="example input shape, for recipes that select by stride (None: 1x3x224x224, only when "
                        "the recipe needs one)")
    v.add_argument("--seed", type=int, default=0, help="seed of the first draw of the masks")
    v.add_argument("--draws", type=_positive_int, default=5,
                   help="draws (seeds SEED, SEED+1, ...) each mask panel is chosen from: the one whose dropped "
                        "fraction is nearest the expectation")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "dropblock-inject") -> int:
    """Entry point of the ``dropblock-inject`` script and of ``python -m dropblock_inject``.

    Args:
        argv: the arguments; ``None`` reads ``sys.argv[1:]``.
        prog: the program name shown in usage and error lines.

    Returns:
        The exit status: 0, or 2 for a user error (printed on one line on stderr, no traceback).
    """
    args = _build_parser(prog).parse_args(argv)
    try:
        args.func(args)
    except BrokenPipeError:  # the output was piped into `head` or the like, which closed it: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as the Python docs advise (SIGPIPE)
        return 1
    except (RecipeError, SurgeryError, ValueError, ImportError, OSError) as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0
