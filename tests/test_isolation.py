"""Nothing outside the model changes: ``plan`` and ``inject`` leave the process (global hooks, torch's
attributes, module globals, the random state) and the model's own attributes as they were, and two threads
can inject two models at once."""

import ast
import re
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
import torchvision
from torch import nn
from _models import X, BasicBlock, SmallResNet

import dropblock_inject as dbi

STRIDE_RECIPE = "paper_generic"
PATH_RECIPE = {"rules": [{"modules": ["layer3.*"], "after": ["norm"], "shortcut": True}]}
PACKAGE = Path(dbi.__file__).parent
_MODULE_GLOBALS = globals()  # this module's own globals (a traced forward of it sees a copy)


def test_rng_state_unchanged_by_plan_and_inject():
    """The default example input comes from a generator of its own: a seeded run is not shifted."""
    model = _torchvision_resnet()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    dbi.plan(model, STRIDE_RECIPE)
    dbi.inject(model, STRIDE_RECIPE)
    assert torch.equal(torch.get_rng_state(), before)


class _Remembering(nn.Module):
    """A block whose forward keeps its last output (``self.last = ...``), as caching models do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        out = x + self.bn(self.conv(x))
        self.last = out
        return out


def test_tracing_leaves_no_attribute_on_the_module():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _Remembering())
    recipe = {"rules": [{"modules": ["1"], "after": ["norm"]}]}
    dbi.plan(model, recipe)
    assert "last" not in model[1].__dict__
    dbi.inject(model, recipe)
    assert "last" not in model[1].__dict__
    model.eval()(X)
    assert isinstance(model[1].last, torch.Tensor)  # the forward itself still does what it does


def test_lazy_modules_are_refused_and_left_lazy():
    model = nn.Sequential(nn.LazyConv2d(8, 3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU())
    for call in (dbi.plan, dbi.inject):
        with pytest.raises(dbi.SurgeryError, match="lazy module.*run one forward pass"):
            call(model, STRIDE_RECIPE)
        assert type(model[0]) is nn.LazyConv2d and type(model[1]) is nn.LazyBatchNorm2d
        assert model[0].has_uninitialized_params()


def test_inject_under_inference_mode_then_the_scheduler_works():
    model = _torchvision_resnet()
    with torch.inference_mode():
        dbi.inject(model, STRIDE_RECIPE)
    sched = dbi.KeepProbScheduler(model, total_steps=10)
    sched.step(5)
    model.train()(X).sum().backward()


class _RegistryWatch(nn.Module):
    """Records, whenever it runs, how many global forward hooks torch holds."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(len(nn.modules.module._global_forward_hooks))
        return x


def test_global_hooks_kept_and_not_fired():
    """The user's global forward hook stays registered all along (no registry is cleared, even for a moment)
    and does not fire during plan/inject's example forward and traces."""
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.append(type(m)))
    try:
        model = _torchvision_resnet()
        watch = _RegistryWatch()
        model.layer1.add_module("watch", watch)  # a child of a Sequential: runs in the example forward
        dbi.plan(model, STRIDE_RECIPE)
        dbi.inject(model, STRIDE_RECIPE)
        assert calls == []
        assert watch.seen and set(watch.seen) == {1}
        model.eval()(X)
        assert calls  # still registered
    finally:
        handle.remove()


def test_checkpoint_module_and_model_globals_untouched_during_trace():
    """Tracing reads the checkpoint functions where the forward finds them; it replaces nothing in
    ``torch.utils.checkpoint`` nor in the model's module."""
    seen = []
    module_globals = _MODULE_GLOBALS

    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.grad_checkpointing = False

        def forward(self, x):
            seen.append((sys.modules["torch.utils.checkpoint"].__dict__["checkpoint"], module_globals["torch"]))
            y = torch.utils.checkpoint.checkpoint(self.conv, x, use_reentrant=False) if self.grad_checkpointing \
                else self.conv(x)
            return x + self.bn(y)

    real = (torch.utils.checkpoint.__dict__["checkpoint"], torch)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), Stage()).train()
    dbi.inject(model, {"rules": [{"modules": ["1"], "after": ["norm"]}]})
    assert seen and all(s[0] is real[0] and s[1] is real[1] for s in seen)


def _torchvision_resnet():
    return torchvision.models.resnet18(weights=None)


def test_two_threads_inject_two_models_at_once():
    """Six rounds of two threads injecting two different models: no error, and the user's global forward hook
    is still registered afterwards."""
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.append(1))
    try:
        for _ in range(6):
            models = [_torchvision_resnet(), torchvision.models.mobilenet_v2(weights=None)]
            errors = []
            barrier = threading.Barrier(2)

            def work(model):
                try:
                    barrier.wait()
                    dbi.inject(model, STRIDE_RECIPE, example_input=torch.zeros(1, 3, 64, 64))
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            threads = [threading.Thread(target=work, args=(m,)) for m in models]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
            assert all(dbi.injected_dropblocks(m) for m in models)
        calls.clear()
        nn.Conv2d(1, 1, 1)(torch.zeros(1, 1, 2, 2))
        assert calls == [1]
    finally:
        handle.remove()


# --- the registry rule -------------------------------------------------------------------------------------

_LIBRARIES = ("timm", "transformers", "torchvision", "ultralytics", "segmentation_models_pytorch",
              "efficientnet_pytorch", "monai", "pytorchcv", "detectron2", "mmcv")
_WORDS = {"TorchScript"}  # CamelCase words that name no class (check's stage names)
_CLASS_NAME = re.compile(r"^[A-Z][a-z0-9]+(?:[A-Z][A-Za-z0-9]*)+$")  # CamelCase: a class named by a string


def _ruled_files():
    """The surgery's modules and the package's top-level modules, except the registry. Not covered: ``ops/``
    (the op's kernels need torch's internals) and the command line and demo (``cli.py``, ``_cli_models.py``,
    ``_demo.py``), which build third-party models by name for the user."""
    return [p for p in [*(PACKAGE / "surgery").glob("*.py"), *PACKAGE.glob("*.py")]
            if p.name not in ("s01_registry.py", "cli.py", "_cli_models.py", "_demo.py")]


def _own_classes():
    """The names of the classes the package defines (a string naming one of them names no other library)."""
    return {n.name for p in PACKAGE.rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.ClassDef)}


def _private(name: str) -> bool:
    """A private name of torch's (``_BatchNorm``, ``_dynamo``); ``_pytree`` is allowed: torch has no public
    pytree module, and it is how torch itself flattens outputs."""
    return name.startswith("_") and not name.startswith("__") and name != "_pytree"


def _root(node: ast.AST) -> str:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else ""


def _violations(path: Path, own: set[str]) -> list[str]:
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and _root(node) in ("torch", "nn", "F", "fx"):
            found.append(f"{_root(node)}...{node.attr}")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_global_"):
            found.append(node.attr)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] in _LIBRARIES or (parts[0] == "torch" and any(map(_private, parts))) or \
                        name == "torch.nn.modules.module":
                    found.append(f"import {name}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value.split(".")[0] in _LIBRARIES and "." in node.value or (
                    _CLASS_NAME.match(node.value) and node.value not in own | _WORDS):
                found.append(repr(node.value))
    return found


def test_only_the_registry_names_other_libraries_or_torch_internals():
    own = _own_classes()
    found = {p.relative_to(PACKAGE).as_posix(): v for p in _ruled_files() if (v := _violations(p, own))}
    assert not found, found


_FRAME_ATTRS = {"_getframe", "currentframe", "f_back", "f_locals", "f_globals", "f_code", "tb_frame",
                "extract_stack", "walk_stack", "format_stack", "print_stack", "getouterframes", "getinnerframes"}
_CODE_RUNNERS = {"exec", "eval", "compile", "__import__"}


def _frames_and_code_strings(path: Path) -> list[str]:
    """Frame inspection (``sys._getframe``, ``inspect.currentframe``/``stack``, frames' ``f_locals``, stack walks)
    and code built from strings (the builtins ``exec``, ``eval``, ``compile``) in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and (node.attr in _FRAME_ATTRS or (
                _root(node) == "inspect" and node.attr in ("stack", "trace"))):
            found.append(f"{ast.unparse(node)} (line {node.lineno})")
        if isinstance(node, ast.Name) and node.id in _CODE_RUNNERS | {"_getframe", "currentframe"}:
            found.append(f"{node.id} (line {node.lineno})")
        if isinstance(node, ast.ImportFrom) and node.module in ("sys", "inspect", "traceback", "builtins"):
            found += [f"from {node.module} import {a.name}" for a in node.names
                      if a.name in _FRAME_ATTRS | _CODE_RUNNERS | {"stack", "trace"}]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" and \
                len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and \
                node.args[1].value in _CODE_RUNNERS | _FRAME_ATTRS:  # getattr(builtins, "exec")
            found.append(f"{ast.unparse(node)} (line {node.lineno})")
    return found


def test_no_frame_inspection_and_no_code_from_strings_in_the_package():
    """The package never inspects its callers' frames nor runs code of its own built from strings. (fx's generated
    forward is compiled by torch's own helper, as ``GraphModule.recompile`` does, in the registry.)"""
    found = {p.relative_to(PACKAGE).as_posix(): v for p in PACKAGE.rglob("*.py")
             if (v := _frames_and_code_strings(p))}
    assert not found, found


def test_register_teaches_a_norm():
    class MyNorm(nn.Module):  # per-channel affine with frozen statistics, no torch norm class
        def __init__(self, c):
            super().__init__()
            self.register_buffer("scale", torch.ones(1, c, 1, 1))

        def forward(self, x):
            return x * self.scale

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.norm = MyNorm(8)

        def forward(self, x):
            return x + self.norm(self.conv(x))

    model = nn.Sequential(nn.Conv2d(3, 8, 1), Block())
    recipe = {"rules": [{"modules": ["1"], "after": ["norm"]}]}
    with pytest.raises(dbi.RecipeError):
        dbi.plan(model, recipe)
    assert dbi.register("norm", MyNorm, reason="a frozen per-channel norm of this test") is MyNorm
    assert [p.after for p in dbi.plan(model, recipe)] == ["norm"]
    with pytest.raises(ValueError, match="reason"):
        dbi.register("norm", MyNorm, reason=" ")
