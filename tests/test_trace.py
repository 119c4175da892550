"""Stage 1, tracing (``surgery.s18_trace``): call patterns, untraceable modules, augmented assignments."""

import copy
import warnings

import sys

import pytest
import torch
import torchvision
from _models import (
    OPTIONAL_RECIPE,
    AddStyleNet,
    ListNet,
    OptionalNet,
    StrideNet,
    UntraceableBlock,
    reload,
    same_state,
    set_keep,
    state_copy,
)
from torch import nn

import dropblock_inject as dbi


@pytest.mark.parametrize("example", [True, False], ids=["example_input", "no_example_input"])
def test_optional_arguments_traced_as_called(example):
    """fx would trace ``shortcut`` as a Proxy and bake ``shortcut is not None``; b2 is called without one."""
    model = OptionalNet().eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    kwargs = {"example_input": torch.randn(1, 3, 16, 16)} if example else {}
    points = dbi.plan(model, OPTIONAL_RECIPE, **kwargs)
    assert [(p.module, p.after, p.kind) for p in points] == [
        ("b1", "bn1", "branch"), ("b1", "bn2", "branch"), ("b1", "shortcut", "shortcut"),
        ("b2", "bn1", "branch"), ("b2", "bn2", "branch"), ("b2", "x", "shortcut")]
    dbi.inject(model, OPTIONAL_RECIPE, **kwargs)
    assert len(dbi.injected_dropblocks(model)) == 6
    assert torch.equal(model(x), ref)
    model.train()
    set_keep(model, 0.5)
    ran = []
    for m in dbi.injected_dropblocks(model):
        m.register_forward_pre_hook(lambda m, args: ran.append(m))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every call matches the traced pattern: no fallback
        model(x).sum().backward()
    assert len(ran) == 6
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_call_differing_from_traced_pattern_runs_original_forward():
    model = OptionalNet()
    dbi.inject(model, OPTIONAL_RECIPE, example_input=torch.randn(1, 3, 16, 16))
    set_keep(model, 0.5)
    block = model.b2.train()  # traced with shortcut=None
    twin = copy.deepcopy(block)
    dbi.strip(twin)
    x, s = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16)
    with pytest.warns(UserWarning, match=r"'OptionalShortcutBlock b2' was rewritten for calls with "
                                         r"\(x=Tensor, shortcut=None, children=None\)"):
        out = block(x, s)
    assert torch.equal(out, twin(x, s))  # the original forward: the tensor shortcut is used, nothing dropped
    for call in [(x, None, None), (x,)]:  # the traced pattern, positionally or by default
        torch.manual_seed(0)
        assert not torch.equal(block(*call), twin(*call))
    with pytest.raises(TypeError, match="bogus"):
        block(x, bogus=1)  # an unknown keyword reaches the original forward, which raises as it would


def test_list_of_tensors_argument():
    model = ListNet().eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    recipe = {"rules": [{"modules": ["blocks.*"], "after": ["norm"], "shortcut": True}]}
    points = dbi.plan(model, recipe, example_input=torch.randn(1, 3, 16, 16))
    # the addition of two conv branches of one depth has no shortcut: each branch gets its branch point
    assert [(p.module, p.after, p.kind, p.shape) for p in points][:2] == [
        ("blocks.0", "branches_0_1", "branch", (1, 8, 16, 16)), ("blocks.0", "branches_1_1", "branch", (1, 8, 16, 16))]
    dbi.inject(model, recipe)  # no example input: the call pattern comes from one default forward
    assert len(dbi.injected_dropblocks(model)) == 4
    assert torch.equal(model(x), ref)
    model.train()
    set_keep(model, 0.5)
    out = model(x)
    out.sum().backward()
    assert isinstance(model.blocks[0](([x[:, :1].expand(2, 8, 16, 16)] * 2)), list)  # output structure kept
    for clone in (copy.deepcopy(model), reload(model)):
        torch.manual_seed(1)
        a = clone(x)
        torch.manual_seed(1)
        assert torch.equal(a, model(x))
    trained = model.eval()(x)  # BN statistics moved in training
    dbi.strip(model)
    assert torch.equal(model(x), trained) and not torch.equal(trained, ref)


def test_untraceable_target_named_with_fx_message_and_model_untouched():
    model = AddStyleNet("add", False)
    state = state_copy(model)
    with pytest.raises(dbi.SurgeryError, match=r"cannot trace module '<root>' \(AddStyleNet\).*control flow"):
        dbi.inject(model, {"rules": [{"types": ["AddStyleNet"], "after": ["conv"]}]})
    assert same_state(model, state) and "forward" not in model.__dict__
    assert not dbi.injected_dropblocks(model)


@pytest.mark.slow
def test_whole_detector_untraceable_is_named():
    from torchvision.models.detection import retinanet_resnet50_fpn

    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    with pytest.raises(dbi.SurgeryError, match="cannot trace module 'transform' \\(GeneralizedRCNNTransform\\)"):
        dbi.inject(model, {"rules": [{"modules": ["transform"], "after": ["any"]}]})
    assert not dbi.injected_dropblocks(model)


def test_untraceable_module_selected_by_stride_is_skipped_with_a_warning():
    model = StrideNet()
    recipe = {"rules": [{"stride": [16], "after": ["norm"], "shortcut": True}]}
    with pytest.warns(UserWarning, match=r"cannot trace module 'odd' \(UntraceableBlock\).*control flow.*rule "
                                         r"'rule0' selects by output stride, so this module is left without"):
        dbi.inject(model, recipe)
    assert {d.point.module for d in dbi.injected_dropblocks(model)} == {"res"}
    dbi.strip(model)
    # a rule naming the module (by path or type) still fails, and leaves the model untouched
    for rule in ({"modules": ["odd"]}, {"types": ["UntraceableBlock"], "stride": [16]}):
        with pytest.raises(dbi.SurgeryError, match=r"cannot trace module 'odd' \(UntraceableBlock\)"):
            dbi.inject(model, {"rules": [{**rule, "after": ["norm"]}]})
        assert not dbi.injected_dropblocks(model) and "forward" not in model.res.__dict__
    # nothing traceable left: the RecipeError says why
    odd_only = nn.Sequential(nn.Conv2d(3, 8, 16, stride=16), UntraceableBlock())
    for rule in ({"stride": [16], "after": ["norm"]}, {"stride": [16], "after": ["norm"], "optional": True}):
        with pytest.warns(UserWarning), pytest.raises(
                dbi.RecipeError, match=r"matches no insertion point in Sequential.*; skipped: cannot trace module "
                                       r"'1' \(UntraceableBlock\)"):
            dbi.plan(odd_only, {"rules": [rule]})


@pytest.mark.parametrize("keep_prob", [1.0, 0.8])
def test_augmented_assignment_stays_in_place(keep_prob):
    """``out += identity`` in the original forward must stay in place in the rewritten training graph.

    torchvision's Bottleneck adds the shortcut into bn3's output and applies an in-place ReLU: the block
    returns the very tensor its last BN (or the DropBlock after it) produced, with no extra allocation.
    """
    block = torchvision.models.resnet50().layer3[1].train()
    dbi.inject(block, {"rules": [{"types": ["Bottleneck"], "after": ["norm"], "shortcut": True}]})
    set_keep(block, keep_prob)
    produced = []
    last = block.dropblocks["bn3"]  # the add's first operand now
    last.register_forward_hook(lambda m, a, out: produced.append(out.data_ptr()))
    out = block(torch.randn(2, 1024, 8, 8))
    assert out.data_ptr() == produced[0]
    assert "+=" in block.forward.graph.python_code("self").src


import math as _math  # noqa: E402

_REAL_SQRT = _math.sqrt
_SEEN: list[bool] = []


class _MathCheck(nn.Module):
    """Records, while traced, whether the ``math`` module's ``sqrt`` is the real function (fx's default tracer
    patches every ``math`` function, process-wide, for the duration of a trace)."""

    def __init__(self, use_proxy: bool) -> None:
        super().__init__()
        self.conv, self.use_proxy = nn.Conv2d(3, 4, 3, padding=1), use_proxy

    def forward(self, x):
        _SEEN.append(sys.modules["math"].sqrt is _REAL_SQRT)
        y = self.conv(x)
        return y * _math.sqrt(y.shape[1]) if self.use_proxy else y * _math.sqrt(4)


@pytest.mark.parametrize("use_proxy", [False, True])
def test_scope_traced_without_patching_math(use_proxy):
    """Tracing never patches the ``math`` module (process state another thread would see): the forward's own
    globals are stood in for, in a copy the trace owns."""
    from dropblock_inject.surgery.s18_trace import trace_scope

    _SEEN.clear()
    trace_scope(_MathCheck(use_proxy=use_proxy), "")
    assert _SEEN == [True]


def test_math_on_a_proxy_still_traced():
    """A forward calling ``math`` on a traced value gets fx's wrapped call, as before."""
    from dropblock_inject.surgery.s18_trace import trace_scope

    m = _MathCheck(use_proxy=True)
    graph = trace_scope(m, "").graph
    assert any(n.op == "call_function" and n.target is _REAL_SQRT for n in graph.nodes)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(torch.fx.GraphModule(m, graph)(x), m.conv(x) * 2.0)


class _RateBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x, rate=None, scale=1.0):
        y = self.bn(self.conv(x)) * scale
        if rate:  # efficientnet_pytorch's MBConvBlock: a float the forward branches on
            y = y * (1 - rate)
        return x + y


class _RateNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=16, padding=1)
        self.blocks = nn.ModuleList([_RateBlock() for _ in range(2)])

    def forward(self, x, scale=1.0):
        x = self.stem(x)
        for i, b in enumerate(self.blocks):
            x = b(x, 0.1 * (i + 1), scale=scale)
        return x


def test_float_argument_branched_on_is_specialised_to_its_value():
    model = _RateNet().eval()
    recipe = {"name": "r", "dropblock": {"block_size": 3, "keep_prob": 0.9},
              "rules": [{"name": "s", "types": ["_RateBlock"], "after": ["norm"], "shortcut": True}]}
    dbi.inject(model, recipe, example_input=torch.randn(1, 3, 64, 64))
    fwd = model.blocks[0].forward
    params = {p.name: p for p in fwd.params}
    assert params["rate"].kind == "const" and params["rate"].expect == 0.1
    assert params["scale"].kind == "free"  # traceable as a placeholder: any value keeps the rewritten graph
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 3, 64, 64), scale=0.5).sum().backward()
    x = torch.randn(1, 4, 4, 4)
    model.eval()
    torch.testing.assert_close(model.blocks[1](x, 0.3), x + model.blocks[1].bn(model.blocks[1].conv(x)) * 0.7)


def test_identical_scopes_share_one_trace(monkeypatch):
    """ResNet-50's layer3/layer4 blocks: 9 scopes, 4 distinct (the first block of each stage differs by its
    downsample), so 4 traces; the plan is the same as with one trace per scope."""
    from dropblock_inject.surgery import s18_trace as trace

    calls = []
    real = trace._trace
    monkeypatch.setattr(trace, "_trace", lambda scope, *a, **k: calls.append(scope) or real(scope, *a, **k))
    model = torchvision.models.resnet50().eval()
    points = dbi.plan(model, "paper_generic")
    assert len(calls) == 4 and len(points) == 36
    assert len({p.module for p in points}) == 9


class _Flagged(nn.Module):
    def __init__(self, flag, act=None) -> None:
        super().__init__()
        self.conv, self.bn, self.flag, self.act = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), flag, act

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.flag:
            y = y * 2
        return x + (self.act(y) if self.act is not None else y)


def test_scopes_differing_in_state_are_traced_apart():
    """A plain attribute the forward branches on, a child's type or a parameter's shape makes another graph;
    an attribute that is not plain data (a function) keeps the scope out of the cache."""
    from dropblock_inject.surgery.s18_trace import _state_key, trace_scope

    a, b, c = _Flagged(True), _Flagged(False), _Flagged(True)
    assert _state_key(a, {}, ()) == _state_key(c, {}, ()) != _state_key(b, {}, ())
    d = _Flagged(True)
    d.conv = nn.Conv2d(4, 4, 5, padding=2)
    assert _state_key(d, {}, ()) != _state_key(a, {}, ())
    assert _state_key(_Flagged(True, act=torch.relu), {}, ()) is None
    cache: dict = {}
    graphs = [trace_scope(m, "", cache=cache).graph for m in (a, b, c)]
    assert graphs[0] is graphs[2] and graphs[1] is not graphs[0]
    x = torch.randn(1, 4, 8, 8)
    for m, g in zip((a, b), graphs):
        torch.testing.assert_close(torch.fx.GraphModule(m, g)(x), m(x))


class _ChunkList(nn.Module):
    """Ultralytics' C2f pattern: the parts of a chunk taken as a list, extended, concatenated."""

    def __init__(self, split: bool = False) -> None:
        super().__init__()
        self.split = split
        self.cv1, self.m, self.cv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(12, 8, 1)

    def forward(self, x):
        y = list(self.cv1(x).split([4, 4], 1) if self.split else self.cv1(x).chunk(2, 1))
        y.extend(self.m(p) for p in y[-1:])
        return self.cv2(torch.cat(y, 1))


@pytest.mark.parametrize("split", [False, True], ids=["chunk", "split"])
def test_the_parts_of_a_chunk_taken_as_a_list_are_traced(split):
    """``list(x.chunk(2, 1))`` (and a split into given sizes) traces: the module gets its points and runs as
    before in eval mode (fx alone cannot iterate a Proxy but by unpacking it into names)."""
    model = _ChunkList(split).eval()
    x = torch.randn(1, 3, 8, 8)
    ref = model(x)
    recipe = {"rules": [{"types": ["_ChunkList"], "after": ["conv"]}], "dropblock": {"block_size": 3}}
    dbi.inject(model, recipe, example_input=x)
    assert set(model.dropblocks) == {"cv1", "m"}  # (cv2 computes the model's output: a prediction)
    assert torch.equal(model(x), ref)


class _VarArgs(nn.Module):
    """A forward taking ``*args, **kwargs`` beside its input (Ultralytics' ``BaseModel.forward``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, *args, **kwargs):
        return self.conv2(self.conv1(x)).mean((2, 3))


def test_a_forward_with_star_args_is_traced():
    """fx rewrites the code of a forward with ``*args``/``**kwargs`` to take its arguments one by one: the
    forward traced is the model's own (it failed with "co_varnames is too small" on our output wrapper)."""
    model = _VarArgs().eval()
    x = torch.randn(1, 3, 8, 8)
    ref = model(x)
    dbi.inject(model, {"rules": [{"types": ["_VarArgs"], "after": ["conv"]}], "dropblock": {"block_size": 3}},
               example_input=x)
    assert set(model.dropblocks) == {"conv1"}  # (conv2's map is pooled into the output)
    assert torch.equal(model(x), ref) and torch.equal(model(x, "extra", flag=True), ref)
    model.train()(x, "extra", flag=True).sum().backward()


class _DictOrTensor(nn.Module):
    """Ultralytics' pattern: ``model(batch_dict)`` computes a loss on ``self.forward(batch["img"])``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, *args, **kwargs):
        if isinstance(x, dict):
            return self.forward(x["img"]).square().mean() if x.get("loss", True) else x["img"].sum()
        return self.conv2(self.conv1(x)).mean((2, 3))


def test_a_call_unlike_the_traced_one_runs_the_original_forward_which_may_call_the_traced_one():
    """Traced for a tensor, called with a dict: the original forward decides (fx baked ``isinstance(x, dict)``
    as False); it warns only when that call ran no DropBlock of the module (here, when the original forward
    does not call ``self.forward`` on the tensor)."""
    model = _DictOrTensor()
    x = torch.randn(2, 3, 8, 8)
    dbi.inject(model, {"rules": [{"types": ["_DictOrTensor"], "after": ["conv"]}], "dropblock": {"block_size": 3}},
               example_input=x)
    set_keep(model, 0.5)
    ran = []
    model.dropblocks["conv1"].register_forward_hook(lambda *a: ran.append(1))
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model({"img": x}).backward()
    assert ran == [1]
    with pytest.warns(UserWarning, match=r"rewritten for calls with \(x=Tensor\) but is called otherwise"):
        model({"img": x, "loss": False})
    assert ran == [1]
