"""Zoo coverage: one model (random weights) through :func:`dropblock_inject.check`, plus the zoo's own checks.

``check_model`` builds the model and runs ``dbi.check`` (plan, inject, eval and keep_prob-1 identities, a
training step that drops, strip; no export), adding while the model is injected:

* *branch and shortcut points*: every residual block of groups 3/4 with branch points has a shortcut point
  when the recipe asks for shortcuts, and every shortcut point has branch points in its block (:mod:`.blocks`);
* *nesting*: no DropBlock follows a module call whose module holds DropBlocks of its own (the same map
  dropped twice);
* *feature maps*: every DropBlock saw only ``(N, C, H, W)`` maps larger than 1x1, with more than one channel
  (a single channel is attention logits, not features), at stride 16 or 32 of the input, or at stride 8 inside
  a residual block whose output stride is 16 (the downsampling first block of group 3), never in a neck or head;
* *placement* (:mod:`.placement`, from the recorded dataflow): no point on attention, on a sigmoid gate, on a
  dead map, in a neck or head, or between a conv and its norm;
* *whole-model fx*: where fx traces the plain model whole (``torch.fx.symbolic_trace``, training mode), the
  injected model's training graph holds one DropBlock call per point, or, where the top module itself was
  rewritten (fx traces its class's forward, without them), the trace is refused with the ``SurgeryError``
  naming them, and the eval graph traces: a graph missing DropBlocks fails the check.

``python -m tools.coverage [--fast]`` sweeps the zoo and writes ``docs/coverage.md``.
"""

from __future__ import annotations

import gc
import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from dropblock_inject.ops._modules import _DropBlockNd
from dropblock_inject.surgery.s16_roles import Roles
from dropblock_inject.surgery.s12_shapes import ShapeLog

from .blocks import missing_points
from .placement import misplaced


@dataclass
class CoverageRow:
    model: str
    family: str
    branch: int = 0
    shortcut: int = 0
    inject_s: float = float("nan")
    status: str = "fail"  # "ok" | "clear error" | "fail" | "skipped: not a CNN"
    reason: str = ""
    library: str = ""

    @property
    def ok(self) -> bool:
        """The paper's placement passing every check, or a clear error (see :data:`CLEAR_ERRORS`)."""
        return self.status in ("ok", CLEAR_ERROR)


CLEAR_ERROR = "clear error"
CLEAR_ERRORS = ("RecipeError: ", "SurgeryError: ")
"""A plan that refuses the model with one of these (a model that is not a CNN the recipe fits, a stage it
cannot trace, named with fx's message) is a clear error, not a silent misplacement: it counts as a pass."""


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


def _in_stride16_block(roles: Roles | None, path: str) -> bool:
    """Whether the module at ``path`` is a step inside a residual block (a module running a residual addition)
    whose output is at stride 16: the first, downsampling block of group 3 (Hugging Face ResNet's conv-norm
    units, as torchvision's ``layer3.0.conv1``)."""
    if roles is None:
        return False
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        block = ".".join(parts[:i])
        if roles.ran(block) and any(a.skip is not None for a in roles.adds_in(block)):
            return roles.stride(block) == 16
    return False


def _feature_maps(log: ShapeLog) -> Callable[[nn.Module, Any], str]:
    """The feature-map check, on the shapes each DropBlock saw in ``dbi.check``'s training step."""

    roles = Roles(log.flow, log.model) if getattr(log, "flow", None) is not None and not log.partial else None

    def run(model: nn.Module, report: Any) -> str:
        if not report.dropblock_inputs:
            return "no DropBlock ran in the train forward"
        for path, shape in report.dropblock_inputs.items():
            point = model.get_submodule(path).point
            where = f"{point.module}:{point.after}"
            if len(shape) != 4:
                return f"DropBlock at {where} got a non-(N,C,H,W) input {shape}"
            if shape[2] * shape[3] <= 1:
                return f"DropBlock at {where} got a 1x1 map {shape}"
            if shape[1] == 1:
                return f"DropBlock at {where} got a single-channel map {shape} (attention logits?)"
            if point.module in log.heads and not (roles is not None and roles.is_backbone(point.module)):
                # a module taking several maps is a head unless the dataflow shows it computes backbone maps
                # (DLA's trees are handed their shortcut: no upsampling, no fusion of strides)
                return f"DropBlock at {where} is in a neck or head of the model"
            stride = log.nominal_stride((1, *shape[1:]), point.module)
            out_shape = log.module_output(point.module)
            if roles is not None and roles.ran(point.module) and out_shape and tuple(out_shape[2:]) == tuple(shape[2:]):
                stride = roles.stride(point.module) or stride  # the dataflow's stride (dilation on the trunk only)
            if stride in (16, 32):
                continue
            out_stride = log.nominal_stride(out_shape, point.module) if out_shape and len(out_shape) == 4 else None
            if stride == 8 and (out_stride == 16 or _in_stride16_block(roles, point.module)):
                continue
            return f"DropBlock at {where} ({point.kind}) sees stride {stride} {shape} (its block outputs stride {out_stride})"
        return ""

    return run


def _whole_model_fx(model: nn.Module, report: Any) -> str:
    import dropblock_inject as dbi
    from dropblock_inject.surgery.s26_forward import injected_modules

    total = len(dbi.injected_dropblocks(model))
    try:
        graph = torch.fx.symbolic_trace(model.train()).graph
    except dbi.SurgeryError as e:
        if not any(name == "" for name, _ in injected_modules(model)):
            return f"torch.fx.symbolic_trace of the training model was refused, its top module not rewritten: {e}"
        torch.fx.symbolic_trace(model.eval())  # refused for the rewritten top module: its eval graph must trace
        model.train()
        return ""
    calls = sum(n.op == "call_function" and "drop_block" in str(n.target) for n in graph.nodes)
    return "" if calls == total else f"the training graph of torch.fx.symbolic_trace holds {calls} of the {total} DropBlocks"


def check_model(name: str, ctor: Callable[[], nn.Module], recipe: Any = "paper_generic", size: int = 64,
                family: str = "", library: str = "") -> CoverageRow:
    """Check one model (built by ``ctor``, random weights) with ``dbi.check`` and the zoo's checks; never raises.

    Args:
        name: the model's name in the report.
        ctor: builds the model.
        recipe: the recipe to check.
        size: the side of the square example input.
        family: the model family, for the report.
        library: the library; ``"torchvision-detection"`` models get lists of images and targets.

    Returns:
        The report row: status ``ok`` or ``fail`` and, for a failure, the stage and reason.
    """
    import dropblock_inject as dbi

    row = CoverageRow(name, family, library=library)
    stage = "build"
    model = None
    try:
        torch.manual_seed(0)
        model = ctor().eval()
        detection = library == "torchvision-detection"  # lists of images, and targets for training
        x: Any = [torch.rand(3, size, size), torch.rand(3, size, size)] if detection else torch.randn(2, 3, size, size)
        train: Any = None
        if detection:
            box = torch.tensor([[4.0, 4.0, size / 2, size / 2]])
            target = {"boxes": box, "labels": torch.tensor([1]),  # masks and keypoints for Mask/Keypoint R-CNN
                      "masks": torch.zeros(1, size, size, dtype=torch.uint8).index_fill_(1, torch.arange(4, size // 2), 1),
                      "keypoints": torch.tensor([[[8.0, 8.0, 1.0]] * 17])}
            train = (x, [target] * 2)
        stage = "reference forward"
        fx_whole = not detection and _fx_traces(model)
        log = ShapeLog(model, x, dataflow=True)  # the network's own strides and dataflow, for the checks below

        def blocks(injected: nn.Module, report: Any) -> str:
            return missing_points(model, report.points, recipe, log)  # on the plain model, which check copied

        extra = [("branch and shortcut points", blocks), ("nesting", lambda m, r: _nested_dropblocks(m)),
                 ("feature maps", _feature_maps(log)),
                 ("placement", lambda m, r: misplaced(model, r.points, x))]  # the plain model's dataflow
        if fx_whole:
            extra.append(("whole-model fx", _whole_model_fx))
        stage = "check"
        report = dbi.check(model, recipe, example_input=x, train_input=train, export=False, extra_checks=extra)
        row.inject_s = report.inject_seconds
        row.branch = sum(p.kind == "branch" for p in report.points)
        row.shortcut = len(report.points) - row.branch
        failed = report.failures
        if failed and failed[0].name == "plan" and failed[0].detail.startswith(CLEAR_ERRORS):
            row.status, row.reason = CLEAR_ERROR, f"plan: {failed[0].detail}"[:600]
        elif failed:
            row.status, row.reason = "fail", f"{failed[0].name}: {failed[0].detail}"[:600]
        else:
            row.status = "ok"
            notes = [n for n in report.notes if "left without DropBlock" in n]
            row.reason = "; ".join(f"passes, but {n}" for n in notes)[:600]
    except Exception as e:  # noqa: BLE001 - a sweep reports, it does not stop
        row.status, row.reason = "fail", f"{stage}: {_first_line(e)}"
        if "-v" in sys.argv:
            traceback.print_exc()
    finally:
        del model
        gc.collect()
    return row
