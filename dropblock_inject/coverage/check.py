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
* every residual block of groups 3/4 with branch points has a shortcut point when the recipe asks for
  shortcuts, and every shortcut point has branch points in its block (:mod:`.blocks`);
* where fx traces the plain model whole (``torch.fx.symbolic_trace``, training mode), it traces the injected
  model too, and its training graph holds one DropBlock call per point;
* ``strip`` restores the module types (compared with a deep copy taken before inject) and state_dict keys.

``python -m dropblock_inject.coverage [--fast]`` sweeps torchvision's classifiers and a timm sample and
writes ``docs/coverage.md``.
"""

from __future__ import annotations

import copy
import gc
import math
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..ops import _DropBlockNd
from ..surgery.shapes import ShapeLog
from .blocks import missing_points




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
    forwards = {name: m.forward for name, m in model.named_modules() if hasattr(m.__dict__.get("forward"), "graph")}
    for outer, fwd in forwards.items():
        for node in fwd.graph.nodes:
            if node.op != "call_module" or not isinstance(fwd.called_module(str(node.target)), _DropBlockNd):
                continue
            src = node.args[0]
            if getattr(src, "op", None) != "call_module":
                continue
            called = _join(outer, src.target)
            inner = [s for s in forwards if s == called or s.startswith(called + ".")]
            if inner:
                return (f"DropBlock after {outer or '<root>'}:{src.name} follows module {called!r}, which holds "
                        f"DropBlocks of its own (in {inner[0]!r})")
    return ""


def _fx_traces(model: nn.Module) -> bool:
    """Whether ``torch.fx.symbolic_trace`` traces the (plain) model whole in training mode."""
    was = model.training
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.fx.symbolic_trace(model.train())
    except Exception:  # noqa: BLE001 - control flow on values, shapes, ...: fx cannot, whatever we do
        return False
    finally:
        model.train(was)
    return True


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
        detection = library == "torchvision-detection"  # lists of images, and targets for training
        x: Any = [torch.rand(3, size, size), torch.rand(3, size, size)] if detection else torch.randn(2, 3, size, size)
        example: Any = [torch.rand(3, size, size)] if detection else torch.randn(1, 3, size, size)
        stage = "reference forward"
        with torch.no_grad():
            ref = _tensors(model(x))
        fx_whole = not detection and _fx_traces(model)
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
        log = ShapeLog(model, example)  # the network's own strides, for the checks below
        stage = "branch and shortcut points"
        missing = missing_points(model, points, recipe, log)
        if missing:
            raise _CheckFailed(missing)
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
                box = torch.tensor([[4.0, 4.0, size / 2, size / 2]])
                target = {"boxes": box, "labels": torch.tensor([1]),  # masks and keypoints for Mask/Keypoint R-CNN
                          "masks": torch.zeros(1, size, size, dtype=torch.uint8).index_fill_(1, torch.arange(4, size // 2), 1),
                          "keypoints": torch.tensor([[[8.0, 8.0, 1.0]] * 17])}
                targets = [target] * 2
                out = _tensors(model(x, targets) if detection else model(x))
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
            if db.point.module in log.heads:
                raise _CheckFailed(f"DropBlock at {where} is in a neck or head of the model")
            stride = log.nominal_stride((1, *shape[1:]), db.point.module)
            if stride in (16, 32):
                continue
            out_shape = scope_out.get(db.point.module)
            out_stride = log.nominal_stride(out_shape, db.point.module) if out_shape and len(out_shape) == 4 else None
            if stride == 8 and out_stride == 16:
                continue
            raise _CheckFailed(f"DropBlock at {where} ({db.point.kind}) sees stride {stride} {shape} "
                               f"(its block outputs stride {out_stride})")

        stage = "whole-model fx"
        if fx_whole:
            graph = torch.fx.symbolic_trace(model.train()).graph
            calls = sum(n.op == "call_function" and "drop_block" in str(n.target) for n in graph.nodes)
            if calls != len(dbs):
                raise _CheckFailed(f"the training graph of torch.fx.symbolic_trace holds {calls} of the {len(dbs)} "
                                   f"DropBlocks")
            del graph

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
