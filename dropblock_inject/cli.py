"""Command line: ``python -m dropblock_inject {demo,plan,check,recipes,show,viz}`` (or ``dropblock-inject ...``).

torch is imported only by the commands that need it, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from typing import Any, Callable, NoReturn, Sequence

from ._cli_models import ModelError, build_model, close, default_input, input_hint, parse_input

__all__ = ["main", "build_model", "parse_input", "ModelError"]

DESCRIPTION = """\
Insert DropBlock into an existing PyTorch CNN with torch.fx, ramp its keep_prob during training, and strip
it before export. Start with 'demo' (ResNet-50 end to end on synthetic data), then 'plan' to see where a
recipe puts DropBlock in your model and 'check' to put your model through inject, training, strip and export;
'recipes' lists the shipped recipes and 'show NAME' prints one."""

MODEL_HELP = ("torchvision:NAME, timm:NAME or module.path:factory (a function taking no argument and returning "
              "the model; the module is imported from the current directory or PYTHONPATH)")
INPUT_HELP = ("example input shape, NxCxHxW or NxCxTxHxW (default: Nx3x224x224, or Nx3x16x112x112 for a model "
              "with 3-D convolutions)")


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


def _recipe(name: str) -> Any:
    """The recipe, loaded (and so checked) before any model is built."""
    from . import load_recipe

    return load_recipe(name)


def _example(model: Any, shape: tuple[int, ...] | None, batch: int = 1) -> Any:
    import torch

    return torch.randn(shape if shape else default_input(model, batch))


def _cmd_plan(args: argparse.Namespace) -> None:
    from . import format_plan, plan

    recipe = _recipe(args.recipe)
    model = build_model(args.model)
    x = _example(model, args.input)
    try:
        points = plan(model, recipe, example_input=x)
    except RuntimeError as e:  # the model's own forward rejected the input
        raise ValueError(f"{_one_line(e)}{input_hint(model, x.shape)}") from None
    print(format_plan(points))


def _cmd_check(args: argparse.Namespace) -> int:
    from ._check import check

    recipe = _recipe(args.recipe)
    model = build_model(args.model)
    x = _example(model, args.input, batch=2)
    print(f"checking {args.model} with {recipe.name} on a random {'x'.join(map(str, x.shape))} input ...",
          flush=True)
    report = check(model, recipe, example_input=x, export=not args.no_export)
    text = str(report)
    if not report.ok and any(s.status == "fail" and s.name == "plan" for s in report.stages):
        text += input_hint(model, x.shape)
    print(text)
    return 0 if report.ok else 1


def _cmd_recipes(args: argparse.Namespace) -> None:
    from . import available_recipes, load_recipe

    names = available_recipes()
    width = max(len(n) for n in names)
    for name in names:
        description = load_recipe(name).description
        print(f"{name.ljust(width)}  {description.split('. ')[0].split(': ')[0]}")


def _cmd_show(args: argparse.Namespace) -> None:
    import yaml

    print(yaml.safe_dump(_recipe(args.recipe).to_dict(), sort_keys=False), end="")


def _cmd_viz(args: argparse.Namespace) -> None:
    """Three PNGs: DropBlock masks on a photo, the recipe's schedule on the model, and its plan per stage."""
    from pathlib import Path

    from . import KeepProbScheduler, inject, plan, strip, viz  # viz: an ImportError names the extra to install
    from .viz._common import figure_tools

    figure_tools()  # fail before building anything when matplotlib is missing
    recipe = _recipe(args.recipe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.model)
    example = _example(model, args.input) if args.input else None  # None: the default, only if shapes are needed
    points = plan(model, recipe, example_input=example)
    n_branch = sum(p.kind == "branch" for p in points)
    paths = [viz.plot_plan(out / "plan.png", points, title=f"{args.model} + {recipe.name}\n{len(points)} DropBlocks: "
                                                            f"{n_branch} branch, {len(points) - n_branch} shortcut")]
    inject(model, recipe, example_input=example)
    try:
        sched = KeepProbScheduler(model, total_steps=args.steps)
        paths.append(viz.plot_schedule(out / "schedule.png", sched,
                                       title=f"{args.model} + {recipe.name}: keep_prob over {args.steps} steps"))
    finally:
        strip(model)
    paths.append(viz.plot_masks(out / "masks.png", seed=args.seed, draws=args.draws))
    for path in paths:
        print(path)


def _cmd_demo(args: argparse.Namespace) -> None:
    from ._demo import run_demo

    run_demo(args)


_UNKNOWN_KEY = re.compile(r"recipe key '(?:[^']*\.)?([^'.]+)': unknown key; allowed keys are (.+)$")

_UNKNOWN_RECIPE = re.compile(r"(.*unknown recipe '([^']+)')(; known recipes: ([^;(]+).*)$")


def _one_line(error: BaseException) -> str:
    """The error's message on one line; an unknown recipe key gets its close matches."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = "; ".join(lines) or type(error).__name__
    found = _UNKNOWN_KEY.search(text)
    if found:
        text += close(found.group(1), [k.strip() for k in found.group(2).split(",")])
    found = _UNKNOWN_RECIPE.match(text)
    if found and "did you mean" not in text:
        text = found.group(1) + close(found.group(2), [k.strip() for k in found.group(4).split(",")]) + found.group(3)
    return text


def _build_parser(prog: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults: dict[str, Any] = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}

    def command(name: str, func: Callable[[argparse.Namespace], Any], text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text, **defaults)
        p.set_defaults(func=func)
        return p

    d = command("demo", _cmd_demo, "inject DropBlock into a ResNet-50 (random weights) with resnet50_paper, train "
                                   "a few scheduled steps on synthetic data, strip it, export to ONNX and check "
                                   "onnxruntime against PyTorch")
    d.add_argument("--steps", type=_positive_int, default=4, help="training steps (keep_prob ramps over them)")
    d.add_argument("--batch", type=_positive_int, default=4, help="images per training step")
    d.add_argument("--size", type=_positive_int, default=96, help="side of the square synthetic images, in pixels")
    p = command("plan", _cmd_plan, "print where a recipe inserts DropBlock in a model (nothing is changed)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--recipe", required=True, help="a shipped recipe name (see 'recipes') or a YAML path")
    p.add_argument("--input", type=parse_input, default=None, help=INPUT_HELP.replace("Nx", "1x"))
    c = command("check", _cmd_check, "put a model through plan, inject, the identity guarantees, a training step, "
                                     "strip and export, and print a verdict (exit status 1 when a check fails)")
    c.add_argument("--model", required=True, help=MODEL_HELP)
    c.add_argument("--recipe", required=True, help="a shipped recipe name (see 'recipes') or a YAML path")
    c.add_argument("--input", type=parse_input, default=None,
                   help=INPUT_HELP.replace("Nx", "2x") + "; use your training resolution")
    c.add_argument("--no-export", action="store_true", help="skip the TorchScript and ONNX checks")
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
        prog: the program name shown in usage, error and warning lines.

    Returns:
        The exit status: 0; 1 when ``check`` finds a failure; 2 for a user error (one line on stderr, no
        traceback).
    """
    args = _build_parser(prog).parse_args(argv)

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        # the command line is the user's call: a warning names the program, not the library line it came from
        print(f"{prog}: warning: {_one_line(Warning(str(message)))}", file=sys.stderr, flush=True)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            status = args.func(args)
    except BrokenPipeError:  # the output was piped into `head` or the like, which closed it: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as the Python docs advise (SIGPIPE)
        return 1
    except (ValueError, ImportError, OSError, RuntimeError) as e:  # RecipeError, ModelError, SurgeryError, and
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)  # what the model raised on the input
        return 2
    return int(status or 0)
