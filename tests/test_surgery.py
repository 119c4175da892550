"""The ``surgery`` package as a whole: its public names, the import order of its stages, old pickles."""

import ast
import sys
import copy
import io
from pathlib import Path

import pytest
import torch
from _models import SmallResNet

import dropblock_inject as dbi
from dropblock_inject import surgery

# the stages in the order one ``inject`` runs them: the plan phase (unwrap, the already-injected check, the example
# forward and its dataflow, tracing, analysis, selection, the plan), then the install phase
STAGES = ["registry", "wrappers", "points", "outputs", "globals_of", "tracer", "kinds", "example", "metaforward",
          "dataflow", "calls", "shapes", "residuals", "normprobe", "tensors", "roles", "checkpointing", "trace", "analyze",
          "explain", "groups", "select", "sites", "sequentials", "blueprint", "forward", "roottrace", "rewrite"]
PACKAGE = Path(surgery.__file__).parent
FILES = [f"s{i:02d}_{stage}" for i, stage in enumerate(STAGES, 1)]  # numbered so the listing reads as run order


def test_the_folder_listing_is_the_run_order():
    assert sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__") == FILES


@pytest.mark.parametrize("stage", FILES)
def test_imports_only_go_down_the_chain(stage):
    """No stage imports a later one (nor, through ``..``, the package ``__init__`` that imports them all)."""
    tree = ast.parse((PACKAGE / f"{stage}.py").read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1]
    assert all(name in FILES for name in imported), imported
    later = [name for name in imported if FILES.index(name) >= FILES.index(stage)]
    assert not later, f"{stage} imports the later stage(s) {later}"


def test_one_inject_runs_the_stages_in_file_order():
    """The main step of each stage (not the orchestrators that call them: ``inject``, ``make_plan``,
    ``build_plan``) first runs in file order during one ``inject``."""
    steps = [("s02_wrappers", "unwrap"), ("s03_points", "check_not_injected"), ("s12_shapes", "__init__"),
             ("s18_trace", "trace_scope"), ("s19_analyze", "analyze"), ("s22_select", "_select"),
             ("s25_blueprint", "_scope_plan"), ("s26_forward", "__init__")]  # (rewrite installs what forward builds)
    first: dict[tuple[str, str], int] = {}

    def profile(frame, event, arg):
        if event == "call":
            key = (frame.f_globals.get("__name__", "").rsplit(".", 1)[-1], frame.f_code.co_name)
            if key in steps:
                first.setdefault(key, len(first))

    sys.setprofile(profile)
    try:
        dbi.inject(SmallResNet(), "resnet_paper", example_input=torch.randn(1, 3, 64, 64))
    finally:
        sys.setprofile(None)
    assert sorted(first, key=first.get) == steps


def test_public_api_unchanged():
    for name in ("InsertionPoint", "SurgeryError", "format_plan", "inject", "injected_dropblocks", "plan", "strip"):
        assert getattr(dbi, name) is getattr(surgery, name)


def test_whole_model_pickle_loads_trains_and_strips():
    """``torch.save`` of a whole injected model (same version: the state_dict is the portable format) loads,
    evaluates bit for bit, trains with its DropBlocks, refuses a second inject and strips."""
    model = SmallResNet()
    dbi.inject(model, "resnet_paper")
    buf = io.BytesIO()
    torch.save(model, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    x = torch.randn(2, 3, 64, 64)
    assert len(dbi.injected_dropblocks(loaded)) == len(dbi.injected_dropblocks(model)) == 12
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), dbi.strip(copy.deepcopy(model)).eval()(x))
    dbi.KeepProbScheduler(loaded, total_steps=1).step(1)
    dropped = []
    hooks = [db.register_forward_hook(lambda m, args, out: dropped.append(bool((out == 0).any())))
             for db in dbi.injected_dropblocks(loaded)]
    loaded.train()(x).sum().backward()
    for h in hooks:
        h.remove()
    assert len(dropped) == 12 and any(dropped)
    with pytest.raises(dbi.SurgeryError, match="already injected"):
        dbi.inject(loaded, "resnet_paper")
    dbi.strip(loaded)
    assert not dbi.injected_dropblocks(loaded) and "forward" not in loaded.layer3[0].__dict__


class _Pointed(torch.nn.Module):
    """A user module with an attribute named ``point`` (as inserted DropBlocks once had)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.point = (0, 0)

    def forward(self, x):
        return x * self.scale


class _BlockWithPointed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.extras = torch.nn.ModuleDict({"a": _Pointed()})

    def forward(self, x):
        return x + self.extras["a"](self.bn(self.conv(x)))


def test_strip_leaves_a_user_module_with_a_point_attribute_alone():
    """strip removes what the injection record names, and nothing recognised by an attribute name."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), _BlockWithPointed())
    keys = list(model.state_dict())
    dbi.inject(model, {"rules": [{"modules": ["1"], "after": ["norm"]}]})
    dbi.strip(model)
    assert isinstance(model[1].extras, torch.nn.ModuleDict) and "a" in model[1].extras
    assert list(model.state_dict()) == keys
    assert not dbi.injected_dropblocks(model)
    dbs = dbi.injected_dropblocks(dbi.inject(model, {"rules": [{"name": "r", "modules": ["1"], "after": ["norm"]}]}))
    assert [(type(db).__name__, db.point.after, db.rule) for db in dbs] == [("InjectedDropBlock2d", "bn", "r")]
    assert all(isinstance(db, dbi.DropBlock2d) for db in dbs)
