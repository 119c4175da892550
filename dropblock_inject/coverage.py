"""Zoo coverage: run ``paper_generic`` (or any recipe) over torchvision's and timm's CNN classifiers.

``check_model`` takes one model (random weights) through plan, inject, eval, train, strip and checks:

* ``plan`` and ``inject`` succeed and agree on the number of points (branch / shortcut counted), and no
  DropBlock follows a module call whose module holds DropBlocks of its own (the same map dropped twice);
  modules that fx cannot trace and that a stride rule skipped (with a warning) are named in the reason;
* eval output after inject is bit-identical to the output before (``torch.equal``, 2x3xSxS input);
* a train-mode forward + backward with every DropBlock at keep_prob 0.8 runs and gives finite values;
* every DropBlock only ever sees ``(N, C, H, W)`` maps larger than 1x1, with more than one channel (a
  single channel is attention logits, not features), at stride 16 or 32 of the input,
  or at stride 8 inside a residual block whose output stride is 16 (the downsampling first block of group
  3), checked with forward pre-hooks during that train forward;
* ``strip`` restores the module types (compared with a deep copy taken before inject) and state_dict keys.

``python -m dropblock_inject.coverage [--fast]`` sweeps torchvision's classifiers and a timm sample and
writes ``docs/coverage.md``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import sys
import time
import traceback
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .ops import _DropBlockNd

__all__ = ["CoverageRow", "check_model", "torchvision_models", "timm_models", "sweep", "write_report", "main"]

NON_CNN_FAMILIES = ("vision_transformer", "swin_transformer", "maxvit", "vit", "swin", "deit", "beit")


@dataclass
class CoverageRow:
    model: str
    family: str
    branch: int = 0
    shortcut: int = 0
    inject_s: float = float("nan")
    status: str = "fail"  # "ok" | "fail" | "skipped: not a CNN"
    reason: str = ""
    library: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _CheckFailed(Exception):
    pass


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _pow2_stride(size: int, feature: int) -> int | None:
    if feature <= 0:
        return None
    return 2 ** round(math.log2(size / feature))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _nested_dropblocks(model: nn.Module) -> str:
    """A DropBlock placed right after a module call whose module holds DropBlocks of its own (the same map
    dropped twice, e.g. after a conv-norm module and inside it); empty if there is none."""
    scopes = {name: m.forward.graph for name, m in model.named_modules()
              if hasattr(m.__dict__.get("forward"), "graph")}
    for outer, graph in scopes.items():
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(model.get_submodule(_join(outer, node.target)), _DropBlockNd):
                continue
            src = node.args[0]
            if getattr(src, "op", None) != "call_module":
                continue
            called = _join(outer, src.target)
            inner = [s for s in scopes if s == called or s.startswith(called + ".")]
            if inner:
                return (f"DropBlock after {outer or '<root>'}:{src.name} follows module {called!r}, which holds "
                        f"DropBlocks of its own (in {inner[0]!r})")
    return ""


def _join(path: str, target: Any) -> str:
    return f"{path}.{target}" if path else str(target)


def check_model(name: str, ctor: Callable[[], nn.Module], recipe: Any = "paper_generic", size: int = 64,
                family: str = "", library: str = "") -> CoverageRow:
    """Check one model (built by ``ctor``, random weights) end to end; never raises."""
    import dropblock_inject as dbi

    row = CoverageRow(name, family, library=library)
    stage = "build"
    model = None
    try:
        torch.manual_seed(0)
        model = ctor()
        model.eval()
        x = torch.randn(2, 3, size, size)
        example = torch.randn(1, 3, size, size)
        stage = "reference forward"
        with torch.no_grad():
            ref = _tensors(model(x))
        before = copy.deepcopy(model)
        types_before = [type(m) for m in before.modules()]
        keys_before = list(before.state_dict().keys())
        del before

        stage = "plan"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            points = dbi.plan(model, recipe, example_input=example)
        notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)
                 and "left without DropBlock" in str(w.message)]
        row.branch = sum(p.kind == "branch" for p in points)
        row.shortcut = len(points) - row.branch
        stage = "inject"
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the same warnings as plan's, recorded above
            dbi.inject(model, recipe, example_input=example)
        row.inject_s = time.perf_counter() - t0
        dbs = dbi.injected_dropblocks(model)
        if len(dbs) != len(points):
            raise _CheckFailed(f"inject inserted {len(dbs)} DropBlocks, plan listed {len(points)}")
        nested = _nested_dropblocks(model)
        if nested:
            raise _CheckFailed(nested)

        stage = "eval parity"
        model.eval()
        with torch.no_grad():
            out = _tensors(model(x))
        if len(out) != len(ref) or not all(torch.equal(a, b) for a, b in zip(out, ref)):
            raise _CheckFailed("eval output after inject differs from the original")
        del out, ref

        stage = "train forward/backward"
        seen: list[tuple[Any, tuple[int, ...]]] = []
        scope_out: dict[str, tuple[int, ...] | None] = {}
        handles = []
        for db in dbs:
            db.keep_prob = 0.8
            handles.append(db.register_forward_pre_hook(
                lambda m, args: seen.append((m, tuple(args[0].shape) if isinstance(args[0], Tensor) else None))))
        for path in {db.point.module for db in dbs}:
            def hook(m: nn.Module, args: Any, output: Any, path: str = path) -> None:
                if path not in scope_out:
                    scope_out[path] = tuple(output.shape) if isinstance(output, Tensor) else None
            handles.append(model.get_submodule(path).register_forward_hook(hook))
        model.train()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = _tensors(model(x))
            fallback = [str(w.message) for w in caught if "is called otherwise" in str(w.message)]
            if fallback:  # a rewritten block ran its original forward: its DropBlocks were skipped
                raise _CheckFailed(fallback[0])
            floats = [t for t in out if t.is_floating_point()]
            if not floats:
                raise _CheckFailed("train forward returned no float tensor")
            if not all(torch.isfinite(t).all() for t in floats):
                raise _CheckFailed("train output is not finite")
            loss = sum(t.float().mean() for t in floats)
            loss.backward()
            for pname, p in model.named_parameters():
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    raise _CheckFailed(f"gradient of {pname} is not finite")
        finally:
            for h in handles:
                h.remove()
        del out, floats, loss

        stage = "feature maps"
        if not seen:
            raise _CheckFailed("no DropBlock ran in the train forward")
        never = [db for db in dbs if not any(m is db for m, _ in seen)]
        if never:
            raise _CheckFailed(f"{len(never)} DropBlocks never ran, e.g. {never[0].point.module}:{never[0].point.after}")
        for db, shape in seen:
            where = f"{db.point.module}:{db.point.after}"
            if shape is None or len(shape) != 4:
                raise _CheckFailed(f"DropBlock at {where} got a non-(N,C,H,W) input {shape}")
            if shape[2] * shape[3] <= 1:
                raise _CheckFailed(f"DropBlock at {where} got a 1x1 map {shape}")
            if shape[1] == 1:
                raise _CheckFailed(f"DropBlock at {where} got a single-channel map {shape} (attention logits?)")
            stride = _pow2_stride(size, shape[3])
            if stride in (16, 32):
                continue
            out_shape = scope_out.get(db.point.module)
            out_stride = _pow2_stride(size, out_shape[3]) if out_shape and len(out_shape) == 4 else None
            if stride == 8 and out_stride == 16:
                continue
            raise _CheckFailed(f"DropBlock at {where} ({db.point.kind}) sees stride {stride} {shape} "
                               f"(its block outputs stride {out_stride})")

        stage = "strip"
        dbi.strip(model)
        if dbi.injected_dropblocks(model):
            raise _CheckFailed("DropBlocks left after strip")
        if [type(m) for m in model.modules()] != types_before:
            raise _CheckFailed("module types after strip differ from before inject")
        if list(model.state_dict().keys()) != keys_before:
            raise _CheckFailed("state_dict keys after strip differ from before inject")
        row.status = "ok"
        row.reason = "; ".join(f"passes, but {n}" for n in notes)[:600]
    except _CheckFailed as e:
        row.status, row.reason = "fail", f"{stage}: {e}"
    except Exception as e:  # noqa: BLE001 - a sweep reports, it does not stop
        row.status, row.reason = "fail", f"{stage}: {_first_line(e)}"
        if "-v" in sys.argv:
            traceback.print_exc()
    finally:
        del model
        gc.collect()
    return row


def check_video_model(name: str, ctor: Callable[[], nn.Module], recipe: Any = "video_r3d",
                      shape: tuple[int, ...] = (1, 3, 8, 64, 64)) -> CoverageRow:
    """Video ResNets (N, 3, T, H, W): inject, every inserted module a DropBlock3d, eval output identical,
    a finite train step at keep_prob 0.8, strip restores module types; never raises."""
    import dropblock_inject as dbi

    from .ops import DropBlock3d

    row = CoverageRow(name, "video_resnet", library="torchvision")
    stage = "build"
    model = None
    try:
        torch.manual_seed(0)
        model = ctor().eval()
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = model(x)
        types_before = [type(m) for m in copy.deepcopy(model).modules()]
        stage = "inject"
        t0 = time.perf_counter()
        dbi.inject(model, recipe)
        row.inject_s = time.perf_counter() - t0
        dbs = dbi.injected_dropblocks(model)
        row.branch = sum(db.point.kind == "branch" for db in dbs)
        row.shortcut = len(dbs) - row.branch
        if not dbs or not all(type(db) is DropBlock3d for db in dbs):
            raise _CheckFailed(f"inserted modules are not all DropBlock3d: {sorted({type(d).__name__ for d in dbs})}")
        stage = "eval parity"
        with torch.no_grad():
            if not torch.equal(model(x), ref):
                raise _CheckFailed("eval output after inject differs from the original")
        stage = "train forward/backward"
        for db in dbs:
            db.keep_prob = 0.8
        model.train()
        out = model(torch.randn(2, *shape[1:]))
        out.mean().backward()
        if not torch.isfinite(out).all():
            raise _CheckFailed("train output is not finite")
        stage = "strip"
        dbi.strip(model)
        if dbi.injected_dropblocks(model) or [type(m) for m in model.modules()] != types_before:
            raise _CheckFailed("strip did not restore the module types")
        row.status, row.reason = "ok", ""
    except _CheckFailed as e:
        row.status, row.reason = "fail", f"{stage}: {e}"
    except Exception as e:  # noqa: BLE001
        row.status, row.reason = "fail", f"{stage}: {_first_line(e)}"
    finally:
        del model
        gc.collect()
    return row


VIDEO_MODELS = ("r3d_18", "mc3_18", "r2plus1d_18")


# ----------------------------------------------------------------------------------------------------------
# the zoo

# input sizes for models that need more than 64 px (aux heads, valid convs, 1x1 final maps)
_TV_SIZES = {"inception_v3": 299, "googlenet": 96, "squeezenet1_0": 96, "squeezenet1_1": 96, "alexnet": 128}
_TIMM_SIZES = {"inception_v3": 299, "xception41": 96, "hrnet_w18_small": 64, "tresnet_m": 64,
               "sebotnet33ts_256": 256, "dpn68": 64, "nasnetalarge": 331}

TIMM_SAMPLE = [
    "resnet18", "resnet26", "resnet50d", "resnet10t", "seresnet18", "legacy_seresnet18", "seresnext26d_32x4d",
    "ecaresnet26t", "resnext26ts", "gcresnet33ts", "skresnet18", "resnest14d", "resnetv2_50",
    "regnetx_002", "regnety_002", "regnetz_b16",
    "efficientnet_b0", "efficientnetv2_rw_t", "tinynet_a", "mixnet_s", "mnasnet_100", "spnasnet_100",
    "fbnetc_100", "mobilenetv2_050", "mobilenetv3_small_100", "mobilenetv4_conv_small", "lcnet_050",
    "hardcorenas_a", "ghostnet_100", "repghostnet_050", "rexnet_100",
    "convnext_atto", "convnextv2_atto", "densenet121", "res2net50_14w_8s", "res2next50", "dla34",
    "cspresnet50", "cspdarknet53", "cs3darknet_s", "darknet53", "dpn68", "selecsls42b", "gernet_s",
    "repvgg_a0", "mobileone_s0", "ese_vovnet19b_dw", "nf_resnet26", "vgg11", "hrnet_w18_small",
    "xception41", "inception_v3", "tresnet_m",
]
TIMM_FAST = ["resnet18", "regnetx_002", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto",
             "densenet121", "dla34", "rexnet_100", "vgg11", "cspresnet50", "res2net50_14w_8s", "ghostnet_100"]
TV_FAST = ["resnet18", "resnet50", "mobilenet_v3_small", "mnasnet0_5", "regnet_x_400mf", "efficientnet_b0",
           "densenet121", "vgg11", "shufflenet_v2_x0_5", "squeezenet1_1", "googlenet", "convnext_tiny"]


# placements that pass every check but are not the paper's, found by reading the plans; shown in the report
KNOWN_LIMITS = {
    ("timm", "dla34"): "known limit: the projection a DlaTree passes to its first block gets two DropBlocks "
                       "in series (after the tree's `project`, and on the block's `shortcut` argument)",
    ("timm", "ghostnet_100"): "known limit: blocks whose layers are all GhostModules are not rewritten, so "
                              "their identity shortcuts get no DropBlock (their GhostModules do)",
    ("timm", "repghostnet_050"): "known limit: blocks whose layers are all RepGhostModules are not rewritten, so "
                                 "their identity shortcuts get no DropBlock (their modules do)",
}


# torchvision classifiers too slow for a 30-minute CI sweep on 2 CPU cores (the full sweep still runs them)
TV_HEAVY = frozenset({
    "convnext_base", "convnext_large", "densenet161", "densenet201", "efficientnet_b4", "efficientnet_b5",
    "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_m", "efficientnet_v2_l", "regnet_x_8gf",
    "regnet_x_16gf", "regnet_x_32gf", "regnet_y_8gf", "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf",
    "resnet152", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet101_2", "vgg13", "vgg13_bn", "vgg16",
    "vgg16_bn", "vgg19", "vgg19_bn",
})


def _tv_family(name: str) -> str:
    import torchvision

    return torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]


def _timm_family(name: str) -> str:
    import timm

    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def torchvision_models(fast: bool = False, light: bool = False) -> list[tuple[str, str, Callable[[], nn.Module], int]]:
    """``(name, family, ctor, size)`` for every torchvision classifier (a fast sample; ``light``: no TV_HEAVY)."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if fast:
        names = [n for n in names if n in TV_FAST]
    if light:
        names = [n for n in names if n not in TV_HEAVY]
    return [(n, _tv_family(n), (lambda n=n: torchvision.models.get_model(n, weights=None)), _TV_SIZES.get(n, 64))
            for n in names]


def timm_models(fast: bool = False) -> list[tuple[str, str, Callable[[], nn.Module], int]]:
    """``(name, family, ctor, size)`` for the timm CNN sample."""
    import timm

    names = TIMM_FAST if fast else TIMM_SAMPLE
    return [(n, _timm_family(n), (lambda n=n: timm.create_model(n, pretrained=False)), _TIMM_SIZES.get(n, 64))
            for n in names]


def _is_cnn(name: str, family: str) -> bool:
    return not any(family.startswith(f) or name.startswith(f) for f in NON_CNN_FAMILIES)


def sweep(fast: bool = False, recipe: Any = "paper_generic", libraries: tuple[str, ...] = ("torchvision", "timm"),
          report: Path | None = None, keep_json: bool = False, light: bool = False,
          names: list[str] | None = None, reverse: bool = False, log: Callable[[str], None] | None = print) -> list[CoverageRow]:
    rows: list[CoverageRow] = []
    zoo = []
    if "torchvision" in libraries:
        zoo += [("torchvision", *m) for m in torchvision_models(fast, light)]
    if "timm" in libraries:
        zoo += [("timm", *m) for m in timm_models(fast)]
    if names:
        zoo = [z for z in zoo if z[1] in names]
    if reverse:
        zoo.reverse()
    for lib, name, family, ctor, size in zoo:
        t0 = time.perf_counter()
        if not _is_cnn(name, family):
            row = CoverageRow(name, family, status="skipped: not a CNN", library=lib)
        else:
            row = check_model(name, ctor, recipe=recipe, size=size, family=family, library=lib)
        rows.append(row)
        if log:
            log(f"[{lib}] {name:28s} {row.status:6s} {row.branch:4d}/{row.shortcut:<4d} "
                f"inject {row.inject_s:6.3f}s total {time.perf_counter() - t0:6.1f}s {row.reason}")
        if report is not None:
            write_report(rows, report, recipe, partial=True, keep_json=keep_json)
    if report is not None:
        write_report(rows, report, recipe, keep_json=keep_json)
    return rows


def pass_rates(rows: list[CoverageRow]) -> dict[str, tuple[int, int]]:
    """``library -> (passed, checked)``; skipped models are not counted."""
    out: dict[str, tuple[int, int]] = {}
    for lib in dict.fromkeys(r.library for r in rows):
        checked = [r for r in rows if r.library == lib and r.status in ("ok", "fail")]
        out[lib] = (sum(r.ok for r in checked), len(checked))
    return out


def write_report(rows: list[CoverageRow], path: Path, recipe: Any = "paper_generic", partial: bool = False,
                 keep_json: bool = False) -> None:
    import timm
    import torchvision

    rates = pass_rates(rows)
    summary = "; ".join(f"{lib}: {p}/{n} CNNs pass ({100 * p / max(n, 1):.1f}%)" for lib, (p, n) in rates.items())
    skipped = sum(r.status.startswith("skipped") for r in rows)
    lines = [
        "# Zoo coverage",
        "",
        f"Generated by `python -m dropblock_inject.coverage` (recipe `{recipe}`, random weights, CPU; "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__})."
        + (" **Partial: sweep in progress.**" if partial else ""),
        "",
        "Each model is planned and injected on a 1x3xSxS example input (S = 64 px unless the model needs more),",
        "then checked: plan and inject agree on the points, and no DropBlock directly follows a module holding",
        "DropBlocks of its own; eval output bit-identical after inject (2x3xSxS); a train forward + backward with every",
        "DropBlock at keep_prob 0.8 is finite; every DropBlock sees only (N, C, H, W) maps larger than 1x1, with C > 1, at",
        "stride 16 or 32 (or stride 8 inside a block whose output stride is 16); strip restores module types and",
        "state_dict keys. A passing model whose reason is not empty had modules skipped because fx cannot trace",
        "them; a \"known limit\" is a placement that passes every check but is not the paper's (found by reading",
        "the plans). Vision transformers (ViT, Swin, MaxViT) are skipped. Inject time is noisy (shared 2 cores).",
        "",
        f"**Summary:** {summary}; {skipped} skipped (not CNNs).",
        "",
        "| library | model | family | branch | shortcut | inject (s) | status | reason |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        t = "" if math.isnan(r.inject_s) else f"{r.inject_s:.3f}"
        reason = r.reason
        if r.ok and (r.library, r.model) in KNOWN_LIMITS:
            reason = "; ".join(filter(None, [reason, KNOWN_LIMITS[(r.library, r.model)]]))
        reason = reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.library} | {r.model} | {r.family} | {r.branch} | {r.shortcut} | {t} | {r.status} | {reason} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=0)) if keep_json else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dropblock_inject.coverage", description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="a small sample of each library only")
    parser.add_argument("--names", nargs="+", help="only these models")
    parser.add_argument("--reverse", action="store_true", help="sweep in reverse order")
    parser.add_argument("--light", action="store_true", help="leave out the heaviest torchvision models")
    parser.add_argument("--recipe", default="paper_generic")
    parser.add_argument("--only", choices=["torchvision", "timm"], default=None)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "coverage.md"))
    parser.add_argument("-v", action="store_true", help="print tracebacks of failures")
    parser.add_argument("--json", action="store_true", help="also write the rows as JSON next to the report")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="only merge JSON row files into the report")
    args = parser.parse_args(argv)
    if args.merge:
        rows = [CoverageRow(**r) for f in args.merge for r in json.loads(Path(f).read_text())]
        unique = {(r.library, r.model): r for r in reversed(rows)}  # the first row of a model wins
        rows = [r for r in rows if unique[(r.library, r.model)] is r]
        done = set(unique)
        for lib, zoo in (("torchvision", torchvision_models), ("timm", timm_models)):
            for name, family, _, _ in zoo(args.fast):
                if (lib, name) not in done:
                    skip = "skipped: not a CNN" if not _is_cnn(name, family) else "not run"
                    rows.append(CoverageRow(name, family, status=skip, library=lib,
                                            reason="" if skip != "not run" else "sweep cut short by the time limit"))
        write_report(rows, Path(args.out), args.recipe)
        for lib, (p, n) in pass_rates(rows).items():
            print(f"{lib}: {p}/{n} pass ({100 * p / max(n, 1):.1f}%)")
        return 0
    libs = (args.only,) if args.only else ("torchvision", "timm")
    rows = sweep(args.fast, args.recipe, libs, Path(args.out), keep_json=args.json, light=args.light,
                 names=args.names, reverse=args.reverse)
    for lib, (p, n) in pass_rates(rows).items():
        print(f"{lib}: {p}/{n} pass ({100 * p / max(n, 1):.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
