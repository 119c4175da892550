"""The ``surgery`` package as a whole: its public names, the import order of its stages, old pickles."""

import ast
import copy
import io
import pickletools
import zipfile
from pathlib import Path

import pytest
import torch
from _models import SmallResNet

import dropblock_inject as dbi
from dropblock_inject import surgery

# the stages in data-flow order (``wrappers`` finds the network inside DataParallel, compile, EMA); ``forward`` (the runtime of an injected module) sits right after ``trace``,
# the only stage it needs, so that ``select`` can ask whether a model is already injected
STAGES = ["wrappers", "outputs", "checkpointing", "calls", "trace", "roottrace", "forward", "kinds", "example", "shapes", "analyze",
          "explain", "select", "sites", "sequentials", "rewrite"]
PACKAGE = Path(surgery.__file__).parent
OLD_PICKLE = Path(__file__).parent / "data" / "injected_smallresnet_v0_1.pt"


def test_every_module_is_a_stage():
    assert sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__") == sorted(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_imports_only_go_down_the_chain(stage):
    """No stage imports a later one (nor, through ``..``, the package ``__init__`` that imports them all)."""
    tree = ast.parse((PACKAGE / f"{stage}.py").read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1]
    assert all(name in STAGES for name in imported), imported
    later = [name for name in imported if STAGES.index(name) >= STAGES.index(stage)]
    assert not later, f"{stage} imports the later stage(s) {later}"


def test_public_api_unchanged():
    for name in ("InsertionPoint", "SurgeryError", "format_plan", "inject", "injected_dropblocks", "plan", "strip"):
        assert getattr(dbi, name) is getattr(surgery, name)


def _pickled_globals(data: bytes) -> set[tuple[str, str]]:
    """The (module, name) pairs a ``torch.save`` archive's pickle refers to."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        pickle = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    strings, found = [], set()
    for op, arg, _ in pickletools.genops(pickle):
        if op.name == "GLOBAL":  # protocol 2, torch.save's default
            found.add(tuple(arg.split(" ", 1)))
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.add((strings[-2], strings[-1]))
    return found


def test_model_pickled_by_version_0_1_loads_trains_and_strips():
    """``torch.save`` of a whole injected model made before the split (its classes named
    ``dropblock_inject.graph.*``) still loads, evaluates bit for bit, trains with its DropBlocks and strips."""
    assert ("dropblock_inject.graph", "_InjectedForward") in _pickled_globals(OLD_PICKLE.read_bytes())  # a real old pickle
    saved = torch.load(OLD_PICKLE, weights_only=False)
    model, x = saved["model"], saved["input"]
    assert isinstance(model, SmallResNet)
    assert len(dbi.injected_dropblocks(model)) == saved["dropblocks"] == 12
    with torch.no_grad():
        out = model.eval()(x)
        assert torch.equal(out, dbi.strip(copy.deepcopy(model)).eval()(x))  # the original code, bit for bit
        torch.testing.assert_close(out, saved["eval_output"], rtol=1e-5, atol=1e-6)  # kernels vary per machine
    model.train()
    dropped = []
    hooks = [db.register_forward_hook(lambda m, args, out: dropped.append(bool((out == 0).any())))
             for db in dbi.injected_dropblocks(model)]
    model(x).sum().backward()
    for h in hooks:
        h.remove()
    assert len(dropped) == 12 and any(dropped)  # keep_prob 0.8 was saved with them
    with pytest.raises(dbi.SurgeryError, match="already injected"):
        dbi.inject(model, "resnet_paper")
    buf = io.BytesIO()
    torch.save(model, buf)  # it saves again, under today's names
    assert ("dropblock_inject.graph", "_InjectedForward") not in _pickled_globals(buf.getvalue())
    again = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert len(dbi.injected_dropblocks(again)) == 12
    dbi.strip(model)
    assert not dbi.injected_dropblocks(model) and "forward" not in model.layer3[0].__dict__


def test_model_pickled_by_version_0_1_gets_the_per_call_in_place_check():
    """0.1 set each DropBlock's in-place flag once, at inject; loaded today, a DropBlock on a BatchNorm output
    that a user hook observes must not write into it (the check each call makes on models injected today)."""
    model = torch.load(OLD_PICKLE, weights_only=False)["model"].train()
    bn, block = model.layer3[0].bn1, model.layer3[0].dropblocks.bn1
    assert block.inplace  # as pickled
    seen = []
    hook = bn.register_forward_hook(lambda m, args, out: seen.append(out))
    torch.manual_seed(0)
    model(torch.randn(2, 3, 64, 64))
    hook.remove()
    assert not block.inplace and not (seen[0] == 0).any()  # the hook's tensor kept its values
    model(torch.randn(2, 3, 64, 64))
    assert block.inplace  # unobserved again: in place again

