"""Stage 0, wrappers (``surgery.s02_wrappers``): recipes apply to the network inside DataParallel, DDP,
torch.compile's OptimizedModule and EMA / SWA copies; the wrapper itself is left as it was."""

import copy
import socket

import pytest
import timm.utils
import torch
import torch.distributed as dist
from _models import SmallResNet, X, counts, same_state, set_keep, state_copy
from torch import nn
from torch.optim.swa_utils import AveragedModel

import dropblock_inject as dbi
from dropblock_inject.surgery.s02_wrappers import unwrap

RECIPE = "resnet50_paper"  # module paths layer3.* / layer4.*: they select nothing through a "module." prefix


@pytest.fixture(scope="module")
def gloo_group():
    """A one-process gloo group, so that DistributedDataParallel can be built on CPU."""
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        yield
    finally:
        dist.destroy_process_group()


WRAPPERS = {
    "DataParallel": nn.DataParallel,  # on CPU it just calls the module
    "DDP": lambda m: nn.parallel.DistributedDataParallel(m),
    "compile": torch.compile,  # wrapping only: nothing is compiled until it is called
    "AveragedModel": AveragedModel,
    "ModelEmaV3": lambda m: timm.utils.ModelEmaV3(m, decay=0.9),
    "DataParallel(compile)": lambda m: nn.DataParallel(torch.compile(m)),
}


def _wrap(name, model, request):
    if name == "DDP":
        request.getfixturevalue("gloo_group")
    return WRAPPERS[name](model)


@pytest.mark.parametrize("name", WRAPPERS)
def test_plan_inject_strip_apply_to_the_module_inside(name, request):
    model = SmallResNet()
    wrapper = _wrap(name, model, request)
    inner = unwrap(wrapper)  # EMA / SWA hold a copy, the others the model itself
    assert inner is not wrapper and type(inner) is SmallResNet
    points = dbi.plan(wrapper, RECIPE)
    assert counts(points) == (8, 4) and {p.module for p in points} == {"layer3.0", "layer3.1", "layer4.0", "layer4.1"}
    state = copy.deepcopy(wrapper.state_dict())
    assert dbi.inject(wrapper, RECIPE) is wrapper
    assert len(dbi.injected_dropblocks(inner)) == 12 and len(dbi.injected_dropblocks(wrapper)) == 12
    assert same_state(wrapper, state)  # the wrapper's keys (module.*, _orig_mod.*, n_averaged) unchanged
    with pytest.raises(dbi.SurgeryError, match="already injected"):
        dbi.inject(wrapper, RECIPE)
    assert dbi.strip(wrapper) is wrapper
    assert dbi.injected_dropblocks(inner) == [] and "forward" not in inner.layer3[0].__dict__
    assert same_state(wrapper, state)


@pytest.mark.parametrize("name", ["DataParallel", "DDP"])
def test_wrapped_model_trains_with_its_dropblocks(name, request):
    model = SmallResNet().train()
    wrapper = _wrap(name, model, request)
    dbi.inject(wrapper, RECIPE)
    sched = dbi.KeepProbScheduler(wrapper, total_steps=2)
    assert len(sched._dropblocks) == 12
    sched.step(1)  # half way: 1 - (1 - target) / 2
    assert [m.keep_prob for m in dbi.injected_dropblocks(model)] == pytest.approx(
        [1 - (1 - m.point.keep_prob) / 2 for m in dbi.injected_dropblocks(model)])
    set_keep(model, 0.5)
    fired = []
    hooks = [m.register_forward_hook(lambda *a: fired.append(1)) for m in dbi.injected_dropblocks(model)]
    wrapper(X).sum().backward()
    for h in hooks:
        h.remove()
    assert len(fired) == 12
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    twin = dbi.strip(copy.deepcopy(model))
    assert torch.equal(wrapper(X), twin(X))


def test_unwrap_leaves_plain_models_and_sees_through_nesting():
    model = SmallResNet()
    assert unwrap(model) is model
    assert unwrap(nn.DataParallel(torch.compile(nn.DataParallel(model)))) is model
    seq = nn.Sequential(model)  # a container is not a wrapper: its paths are "0.layer3..."
    assert unwrap(seq) is seq


@pytest.fixture
def yolo(ultralytics):
    """Ultralytics' model object, built offline from a YAML with random weights."""
    return ultralytics.YOLO("yolov8n.yaml")


@pytest.mark.parametrize("call", ["plan", "inject", "strip"])
def test_ultralytics_model_object_is_refused_with_what_to_pass(yolo, call):
    """``YOLO(...)`` holds its network as ``.model`` but ``YOLO.train`` builds a new one, so DropBlock put into
    ``yolo.model`` would not be trained: plan, inject and strip refuse it, naming ``add_dropblock`` for
    training and ``.model`` for the network, before running anything and leaving it untouched."""
    before = state_copy(yolo.model)
    args = (yolo,) if call == "strip" else (yolo, "paper_generic")
    with pytest.raises(dbi.SurgeryError, match=r"YOLO is a model object .* not be trained.*integrations\.ultralytics"
                                               r"\.add_dropblock\(yolo, recipe\).*pass its \.model \(DetectionModel\)"):
        getattr(dbi, call)(*args)
    assert not dbi.injected_dropblocks(yolo.model)
    assert same_state(yolo.model, before) and type(yolo.model).forward is yolo.model.forward.__func__
    points = dbi.plan(yolo.model, "paper_generic", example_input=torch.zeros(1, 3, 64, 64))  # what to pass works
    assert points and all(f"{p.module}.{p.after}".startswith(("model.", ".model_")) for p in points)
