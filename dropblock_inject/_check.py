"""``check(model, recipe)``: put a copy of your model through what the zoo sweep checks, with a verdict.

The stages, in order (a stage that cannot run because an earlier one failed is reported as skipped):

1. *plan*: where the recipe puts DropBlock (warnings become notes);
2. *original model*: its training (seeded) and eval outputs, the references of the identities;
3. *inject*: as many DropBlocks as the plan lists; Parameters the same objects; ``state_dict`` keys and
   values unchanged;
4. *eval identity*: eval output bit-identical to the model's before ``inject``;
5. *keep_prob 1 identity*: training-mode output at keep_prob 1 bit-identical under the same seed;
6. *training step*: at the recipe's final keep_prob, forward + backward: every DropBlock runs, some drop,
   output and gradients are finite;
7. *strip*: no DropBlock left, module types and ``state_dict`` keys as before, eval output unchanged;
8. *TorchScript* and *ONNX* export of the stripped model (ONNX when ``onnx`` is installed; the output is
   compared in onnxruntime when that is installed too). A model that does not export without DropBlock
   either is reported as skipped, not failed.

Only the public API is used (``plan``, ``inject``, ``strip``, ``KeepProbScheduler``, ``injected_dropblocks``),
on a deep copy: the model you pass is not changed, nor is torch's global RNG.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import time
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ._check_report import CheckReport, Stage
from .recipe import RecipeError
from .schedule import KeepProbScheduler
from .surgery import SurgeryError, inject, injected_dropblocks, plan, strip

__all__ = ["check", "CheckReport", "Stage"]

ExtraCheck = Callable[[nn.Module, CheckReport], str]


class _Failed(Exception):
    """A stage's failure: what was seen, and what to do about it."""

    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(detail)
        self.detail, self.fix = detail, fix


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if hasattr(out, "to_tuple"):  # Hugging Face ModelOutput
        return _tensors(out.to_tuple())
    return []


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # a module set to None in sys.modules: as if not installed
        return False


def _default_input(model: nn.Module) -> Tensor:
    video = any(isinstance(m, nn.Conv3d) for m in model.modules())
    return torch.randn(2, 3, 16, 112, 112) if video else torch.randn(2, 3, 224, 224)


def _paths(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def _fix_for(error: Exception) -> str:
    if isinstance(error, RecipeError):
        return ("the recipe does not fit this model: `python -m dropblock_inject plan` shows what each rule "
                "selects; write module paths of your model, or try the recipe paper_generic")
    if isinstance(error, SurgeryError):
        return ("the recipe points at code torch.fx cannot trace (the message names it): point the rule at a "
                "smaller module, or make that module's forward traceable")
    return ("the model failed on the example input: pass an example_input it accepts (check --input), and "
            "train_input= if its training forward takes more (a detector's targets: from Python only)")


def _run(model: nn.Module, args: tuple[Any, ...], seed: int | None = None, grad: bool = False) -> Any:
    with torch.random.fork_rng(), torch.set_grad_enabled(grad):
        if seed is not None:
            torch.manual_seed(seed)
        return model(*args)


def _stage_plan(work: nn.Module, recipe: Any, example: Any, report: CheckReport) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report.points = plan(work, recipe, example_input=example)
    report.notes += [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, UserWarning)]
    branch = sum(p.kind == "branch" for p in report.points)
    report.add("plan", "ok", f"{len(report.points)} DropBlocks: {branch} branch, "
                             f"{len(report.points) - branch} shortcut")


def _stage_inject(work: nn.Module, recipe: Any, example: Any, report: CheckReport) -> None:
    params = [id(p) for p in work.parameters()]
    before = {k: v.detach().clone() for k, v in work.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plan's warnings, already noted
        start = time.perf_counter()
        inject(work, recipe, example_input=example)
        report.inject_seconds = time.perf_counter() - start
    found = len(injected_dropblocks(work))
    if found != len(report.points):
        raise _Failed(f"inject inserted {found} DropBlocks, plan listed {len(report.points)}",
                      "a bug: please report it with this model and recipe")
    if [id(p) for p in work.parameters()] != params:
        raise _Failed("inject replaced Parameter objects", "a bug: please report it with this model and recipe")
    after = work.state_dict()
    if list(after) != list(before) or not all(torch.equal(after[k], v) for k, v in before.items()):
        raise _Failed("state_dict keys or values changed", "a bug: please report it with this model and recipe")
    report.add("inject", "ok", f"{found} DropBlocks in {report.inject_seconds:.3f} s; same Parameters; state_dict keys and values unchanged")


def _stage_train(work: nn.Module, args: tuple[Any, ...], report: CheckReport) -> None:
    dbs = injected_dropblocks(work)
    KeepProbScheduler(work, total_steps=1).step(1)  # every DropBlock at its rule's final keep_prob
    names = _paths(work)
    dropped: dict[str, int] = {}
    handles = []
    for db in dbs:
        def pre(m: nn.Module, inp: Any) -> None:
            x = inp[0]
            report.dropblock_inputs[names[id(m)]] = tuple(x.shape)
            dropped[names[id(m)]] = -int((x == 0).sum())

        def post(m: nn.Module, inp: Any, out: Tensor) -> None:
            dropped[names[id(m)]] += int((out == 0).sum())

        handles += [db.register_forward_pre_hook(pre), db.register_forward_hook(post)]
    work.train()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs = _tensors(_run(work, args, seed=0, grad=True))
    finally:
        for h in handles:
            h.remove()
    report.notes += [f"training step: {str(w.message).splitlines()[0]}" for w in caught
                     if issubclass(w.category, UserWarning)]
    floats = [t for t in outs if t.is_floating_point()]
    never = [names[id(db)] for db in dbs if names[id(db)] not in dropped]
    if never:
        raise _Failed(f"{len(never)} of {len(dbs)} DropBlocks never ran in training mode, e.g. {never[0]}",
                      "the rewritten code is not the code that runs: read the warnings above")
    if not floats or not all(torch.isfinite(t).all() for t in floats):
        raise _Failed("the training output is not finite (or has no float tensor)",
                      "check the model without DropBlock on the same input; a larger input may help")
    sum(t.float().mean() for t in floats).backward()
    bad = [n for n, p in work.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        raise _Failed(f"the gradient of {bad[0]} is not finite", "check the model without DropBlock first")
    active = sum(v > 0 for v in dropped.values())
    if not active:
        raise _Failed("no DropBlock dropped anything at the recipe's final keep_prob",
                      "the maps may be too small for the block size: use a training-size example_input")
    whole = [(n, s) for n, s in report.dropblock_inputs.items()
             if max(s[2:]) <= work.get_submodule(n).block_size]
    if whole:
        n, s = whole[0]
        report.notes.append(f"{len(whole)} DropBlocks see maps no larger than their block (e.g. {n}: "
                            f"{'x'.join(map(str, s))}, block {work.get_submodule(n).block_size}): a block there "
                            f"drops the whole map; train at a larger resolution or lower block_size")
    report.add("training step", "ok", f"{active} of {len(dbs)} DropBlocks dropped blocks; output and gradients "
                                      f"finite")


def _stage_strip(work: nn.Module, args: tuple[Any, ...], types: list[type], keys: list[str],
                 report: CheckReport) -> list[Tensor]:
    work.eval()
    ref = _tensors(_run(work, args))
    strip(work)
    if injected_dropblocks(work):
        raise _Failed("DropBlocks are left after strip", "a bug: please report it with this model and recipe")
    if [type(m) for m in work.modules()] != types or list(work.state_dict()) != keys:
        raise _Failed("module types or state_dict keys after strip differ from before inject",
                      "a bug: please report it with this model and recipe")
    if not _same(_tensors(_run(work, args)), ref):
        raise _Failed("eval output changed with strip", "a bug: please report it with this model and recipe")
    report.add("strip", "ok", "original modules back, state_dict keys as before, eval output unchanged")
    return ref


def _stage_script(work: nn.Module, original: nn.Module, args: tuple[Any, ...], ref: list[Tensor],
                  report: CheckReport) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = torch.jit.script(work)
    except Exception as e:  # noqa: BLE001 - TorchScript rejects many models; see whether ours is to blame
        try:
            torch.jit.script(copy.deepcopy(original))
        except Exception:  # noqa: BLE001
            report.add("TorchScript", "skipped", "the model does not script without DropBlock either")
            return
        raise _Failed(f"the stripped model does not script: {str(e).splitlines()[0][:200]}",
                      "a bug: please report it with this model and recipe") from None
    if not _same(_tensors(_run(scripted, args)), ref):
        raise _Failed("the scripted model's output differs from the stripped model's",
                      "a bug: please report it with this model and recipe")
    report.add("TorchScript", "ok", "the stripped model scripts; same output")


def _stage_onnx(work: nn.Module, original: nn.Module, args: tuple[Any, ...], ref: list[Tensor],
                report: CheckReport) -> None:
    if not _installed("onnx"):
        report.add("ONNX", "skipped", "onnx is not installed (pip install onnx onnxruntime)")
        return
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(work, args, buffer, dynamo=False)
    except Exception as e:  # noqa: BLE001
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(copy.deepcopy(original).eval(), args, io.BytesIO(), dynamo=False)
        except Exception:  # noqa: BLE001
            report.add("ONNX", "skipped", "the model does not export to ONNX without DropBlock either")
            return
        raise _Failed(f"the stripped model does not export: {str(e).splitlines()[0][:200]}",
                      "a bug: please report it with this model and recipe") from None
    if not _installed("onnxruntime") or not all(isinstance(a, Tensor) for a in args):
        report.add("ONNX", "ok", "exported (output not compared: needs onnxruntime and tensor inputs)")
        return
    import onnxruntime as ort

    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    got = [torch.from_numpy(o) for o in session.run(None, feeds)]
    if len(got) != len(ref) or not all(torch.allclose(g, r.float(), rtol=1e-3, atol=1e-4) for g, r in zip(got, ref)):
        raise _Failed("onnxruntime's output differs from PyTorch's", "a bug: please report it")
    report.add("ONNX", "ok", "exported; onnxruntime's output matches PyTorch's")


def check(model: nn.Module, recipe: Any, example_input: Any = None, *, train_input: Sequence[Any] | None = None,
          export: bool = True, extra_checks: Sequence[tuple[str, ExtraCheck]] = ()) -> CheckReport:
    """Check that ``recipe`` works on ``model``: plan, inject, identities, a training step, strip, export.

    Args:
        model: your network (left unchanged: the check works on a deep copy).
        recipe: a recipe name, YAML path, dict or Recipe.
        example_input: the input of the forward passes, a tensor or a tuple of arguments; use a batch of
            2 or more at your training resolution. Default: random 2x3x224x224 (2x3x16x112x112 for models
            with 3-D convolutions).
        train_input: the arguments of the training-mode forward, if it takes others (a detector's images
            and targets); default: ``example_input``.
        export: whether to try TorchScript and ONNX on the stripped model.
        extra_checks: ``(name, function)`` pairs run on the injected model after the training step; each
            returns ``""`` or a sentence saying what is wrong.

    Returns:
        A :class:`CheckReport`: ``ok``, the plan, one :class:`Stage` per check; ``str(report)`` is the
        printed report.
    """
    example = _default_input(model) if example_input is None else example_input
    args = example if isinstance(example, tuple) else (example,)
    train_args = tuple(train_input) if train_input is not None else args
    name = getattr(recipe, "name", None) or (recipe if isinstance(recipe, str) else "<recipe>")
    report = CheckReport(model=type(model).__name__, recipe=str(name))
    original = model
    work = copy.deepcopy(model).eval()
    types, keys = [type(m) for m in work.modules()], list(work.state_dict())
    stages: list[tuple[str, Callable[[], Any]]] = [("plan", lambda: _stage_plan(work, recipe, example, report))]
    state: dict[str, Any] = {}

    def references() -> None:
        work.train()  # first: the training forward updates BatchNorm statistics, which eval output reads
        state["train"] = _tensors(_run(work, train_args, seed=0))
        state["eval"] = _tensors(_run(work.eval(), args))
        report.add("original model", "ok", "training and eval outputs recorded, before inject")

    def eval_identity() -> None:
        if not _same(_tensors(_run(work.eval(), args)), state["eval"]):
            raise _Failed("eval output after inject differs from the original's", "a bug: please report it")
        report.add("eval identity", "ok", "eval output bit-identical to the original's")

    def keep_one() -> None:
        for db in injected_dropblocks(work):
            db.keep_prob = 1.0
        work.train()
        if not _same(_tensors(_run(work, train_args, seed=0)), state["train"]):
            raise _Failed("training output at keep_prob 1 differs from the original's under the same seed",
                          "a bug: please report it with this model and recipe")
        report.add("keep_prob 1 identity", "ok", "training output at keep_prob 1 bit-identical, same seed")

    stages += [("original model", references), ("inject", lambda: _stage_inject(work, recipe, example, report)),
               ("eval identity", eval_identity), ("keep_prob 1 identity", keep_one),
               ("training step", lambda: _stage_train(work, train_args, report))]
    for extra_name, func in extra_checks:
        def extra(func: ExtraCheck = func, extra_name: str = extra_name) -> None:
            problem = func(work, report)
            if problem:
                raise _Failed(problem, "see the sweep's documentation")
            report.add(extra_name, "ok", "")
        stages.append((extra_name, extra))
    stages.append(("strip", lambda: state.__setitem__("ref", _stage_strip(work, args, types, keys, report))))
    if export:
        stages += [("TorchScript", lambda: _stage_script(work, original, args, state["ref"], report)),
                   ("ONNX", lambda: _stage_onnx(work, original, args, state["ref"], report))]
    failed = False
    with torch.random.fork_rng():  # the caller's random stream is not consumed by the check
        for stage_name, run in stages:
            if failed:
                report.add(stage_name, "skipped", "an earlier stage failed")
                continue
            try:
                run()
            except _Failed as e:
                report.add(stage_name, "fail", e.detail, e.fix)
                failed = True
            except Exception as e:  # noqa: BLE001 - a check reports, it does not stop
                lines = str(e).strip().splitlines()
                report.add(stage_name, "fail", f"{type(e).__name__}: {lines[0] if lines else ''}"[:300],
                           _fix_for(e))
                failed = True
    return report
