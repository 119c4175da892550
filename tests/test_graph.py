"""FX surgery: plan / inject / strip and the nine surgery guarantees."""

import copy
import io
import re
import warnings
from typing import List

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

import dropblock_inject as dbi
from dropblock_inject.ops import _DropBlockNd

X = torch.randn(2, 3, 64, 64)
PAPER_LIKE = {"rules": [{"name": "blocks", "modules": ["**"], "after": ["norm"], "shortcut": True}]}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    sd = model.state_dict()
    return list(sd) == list(state) and all(torch.equal(sd[k], state[k]) for k in state)


def _counts(points):
    branch = sum(p.kind == "branch" for p in points)
    return branch, len(points) - branch


def _set_keep(model, value):
    for m in dbi.injected_dropblocks(model):
        m.keep_prob = value


# ------------------------------------------------------------------------------------------------ real models

RESNETS = {
    "tv_resnet18": (lambda: torchvision.models.resnet18(), (8, 4)),
    "tv_resnet50": (lambda: torchvision.models.resnet50(), (27, 9)),
    "tv_resnet101": (lambda: torchvision.models.resnet101(), (78, 26)),
    "tv_resnext50": (lambda: torchvision.models.resnext50_32x4d(), (27, 9)),
    "tv_wide_resnet50_2": (lambda: torchvision.models.wide_resnet50_2(), (27, 9)),
    "timm_resnet50": (lambda: timm.create_model("resnet50", pretrained=False), (27, 9)),
    "timm_seresnet50": (lambda: timm.create_model("seresnet50", pretrained=False), (27, 9)),
}


@pytest.mark.parametrize("name", list(RESNETS))
def test_paper_recipe_on_resnet_family(name):
    ctor, expected = RESNETS[name]
    model = ctor().eval()
    ref = model(X)
    state = _state(model)
    params = [id(p) for p in model.parameters()]
    attrs = {name: sorted(m.__dict__) for name, m in model.named_modules()}
    points = dbi.plan(model, "resnet50_paper")
    assert _counts(points) == expected
    assert all(p.module.split(".")[0] in ("layer3", "layer4") for p in points)
    assert {round(p.keep_prob, 6) for p in points if p.module.startswith("layer4")} == {0.9}
    assert {round(p.keep_prob, 6) for p in points if p.module.startswith("layer3")} == {0.975}
    assert all(p.block_size == 7 for p in points)
    out = dbi.inject(model, "resnet50_paper")
    assert out is model and type(model) is type(ctor())
    assert len(dbi.injected_dropblocks(model)) == sum(expected)
    assert [id(p) for p in model.parameters()] == params
    assert _same_state(model, state)
    assert torch.equal(model(X), ref)
    dbi.strip(model)
    assert not any(isinstance(m, _DropBlockNd) for m in model.modules())
    assert {name: sorted(m.__dict__) for name, m in model.named_modules()} == attrs  # no attribute left over
    assert _same_state(model, state)
    assert torch.equal(model(X), ref)


def test_resnet50_exact_paper_placement():
    model = torchvision.models.resnet50()
    points = dbi.plan(model, "resnet50_paper")
    first = [(p.after, p.kind) for p in points if p.module == "layer3.0"]
    assert first == [("bn1", "branch"), ("bn2", "branch"), ("bn3", "branch"), ("downsample_1", "shortcut")]
    assert [(p.after, p.kind) for p in points if p.module == "layer4.2"][-1] == ("x", "shortcut")
    assert points[0].shape == (1, 256, 28, 28)  # stride 8 in the first block of group 3, before it downsamples
    text = dbi.format_plan(points)
    assert "36 DropBlocks: 27 branch, 9 shortcut, in 9 modules" in text


def test_train_output_at_keep_prob_one_is_bit_identical():
    model = torchvision.models.resnet50().train()
    twin = copy.deepcopy(model)
    dbi.inject(model, "resnet50_paper")
    _set_keep(model, 1.0)
    torch.manual_seed(3)
    a = model(X)
    torch.manual_seed(3)
    b = twin(X)
    assert torch.equal(a, b)
    assert _same_state(model, twin.state_dict())  # BN statistics updated identically


def test_train_mode_drops_and_backprops():
    model = torchvision.models.resnet18().train()
    dbi.inject(model, "resnet50_paper")
    _set_keep(model, 0.7)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((o == 0).float().mean().item()))
             for m in dbi.injected_dropblocks(model)]
    model(X).sum().backward()
    for h in hooks:
        h.remove()
    assert len(seen) == 12
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


class _BlockWithTrainingFlag(nn.Module):
    """A residual block whose own forward reads self.training (fx would bake it in)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = F.dropout(y, 0.5, self.training)
        return x + y


def test_training_dependent_code_still_switches():
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _BlockWithTrainingFlag(8))
    ref_eval = block.eval()(X)
    dbi.inject(block, {"rules": [{"modules": ["1"], "after": ["norm"], "shortcut": True}]})
    assert torch.equal(block.eval()(X), ref_eval)
    _set_keep(block, 1.0)
    block.train()
    twin = copy.deepcopy(block)
    dbi.strip(twin)
    torch.manual_seed(1)
    a = block(X)
    torch.manual_seed(1)
    b = twin(X)
    assert torch.equal(a, b) and not torch.equal(a, ref_eval)  # dropout active in train mode
    assert torch.equal(block.eval()(X), twin.eval()(X))  # and off again in eval mode


@pytest.mark.parametrize("ctor", [
    lambda: torchvision.models.convnext_tiny(stochastic_depth_prob=0.5),
    lambda: torchvision.models.efficientnet_b0(stochastic_depth_prob=0.5, dropout=0.5),
    lambda: timm.create_model("resnet26", pretrained=False, drop_path_rate=0.5, drop_rate=0.5),
], ids=["convnext_sd", "efficientnet_sd", "timm_resnet_droppath"])
def test_stochastic_depth_models_keep_train_eval_behaviour(ctor):
    model = ctor().eval()
    ref = model(X)
    dbi.inject(model, "paper_generic", example_input=torch.randn(1, 3, 64, 64))
    assert torch.equal(model(X), ref)
    _set_keep(model, 1.0)
    model.train()
    twin = copy.deepcopy(model)
    dbi.strip(twin)
    torch.manual_seed(5)
    a = model(X)
    torch.manual_seed(5)
    b = twin(X)
    assert torch.equal(a, b)
    assert torch.equal(model.eval()(X), twin.eval()(X))


# ------------------------------------------------------------------------------------------------ add styles

class _Res(nn.Module):
    def __init__(self, style, c=8, project=False):
        super().__init__()
        self.style = style
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.proj = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)) if project else None

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        s = self.proj(x) if self.proj is not None else x
        if self.style == "add":
            out = y + s
        elif self.style == "radd":
            out = s + y
        elif self.style == "iadd":
            y += s
            out = y
        elif self.style == "torch.add":
            out = torch.add(s, y)
        elif self.style == "method":
            out = y.add(s)
        else:  # add_
            out = y.add_(s)
        return F.relu(out)


class _Net(nn.Module):
    def __init__(self, style, project):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = _Res(style, project=project)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.block(self.stem(x))
        if x.sum() > 0:  # data-dependent control flow: the whole model is not traceable
            x = x * 1.0
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("project", [False, True])
@pytest.mark.parametrize("style", ["add", "radd", "iadd", "torch.add", "method", "add_"])
def test_every_residual_add_style(style, project):
    model = _Net(style, project).eval()
    ref = model(X)
    points = dbi.plan(model, {"rules": [{"modules": ["block"], "after": ["norm"], "shortcut": True}]})
    kinds = [(p.after, p.kind) for p in points]
    assert kinds[:2] == [("bn1", "branch"), ("bn2", "branch")]
    assert kinds[2] == ("proj_1" if project else "x", "shortcut")
    assert len(kinds) == 3
    dbi.inject(model, {"rules": [{"modules": ["block"], "after": ["norm"], "shortcut": True}]})
    assert torch.equal(model(X), ref)
    model.train()
    _set_keep(model, 0.5)
    model(X).sum().backward()


def test_untraceable_target_named_with_fx_message_and_model_untouched():
    model = _Net("add", False)
    state = _state(model)
    with pytest.raises(dbi.SurgeryError, match=r"cannot trace module '<root>' \(_Net\).*control flow"):
        dbi.inject(model, {"rules": [{"types": ["_Net"], "after": ["conv"]}]})
    assert _same_state(model, state) and "forward" not in model.__dict__
    assert not dbi.injected_dropblocks(model)


def test_inject_twice_is_error_and_strip_plain_is_noop():
    model = torchvision.models.resnet18()
    assert dbi.strip(model) is model
    dbi.inject(model, "resnet50_paper")
    with pytest.raises(dbi.SurgeryError, match="already injected"):
        dbi.inject(model, "resnet50_paper")
    dbi.strip(model)
    dbi.inject(model, "resnet50_paper")  # after strip, injecting again works
    assert len(dbi.injected_dropblocks(model)) == 12


def test_checkpoints_cross_load():
    injected = torchvision.models.resnet18()
    dbi.inject(injected, "resnet50_paper")
    plain = torchvision.models.resnet18()
    plain.load_state_dict(injected.state_dict())
    other = torchvision.models.resnet18()
    injected.load_state_dict(other.state_dict())
    assert _same_state(injected, other.state_dict())


def test_deepcopy_pickle_and_optimizer_built_before():
    model = torchvision.models.resnet18()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dbi.inject(model, "resnet50_paper")
    model.train()
    _set_keep(model, 0.8)
    model(X).sum().backward()
    before = model.layer4[0].conv1.weight.clone()
    opt.step()
    assert not torch.equal(before, model.layer4[0].conv1.weight)
    clone = copy.deepcopy(model)
    assert len(dbi.injected_dropblocks(clone)) == 12
    assert clone.layer3[0].forward.module is clone.layer3[0]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (clone, loaded):
        m.eval()
        assert torch.equal(m(X), model.eval()(X))
        m.train()
        m(X).sum().backward()
        dbi.strip(m)
        assert not dbi.injected_dropblocks(m)


def test_torch_compile_injected_model():
    from torch._dynamo.testing import CompileCounter

    model = torchvision.models.resnet18().train()
    dbi.inject(model, "resnet50_paper")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    for keep in (0.95, 0.9, 0.8):
        _set_keep(model, keep)
        out = compiled(X)
        assert torch.isfinite(out).all()
    assert counter.frame_count == 1


def test_stripped_model_scripts_and_exports():
    model = torchvision.models.resnet18()
    dbi.inject(model, "resnet50_paper")
    model.train()
    model(X)
    dbi.strip(model).eval()
    ref = model(X)
    scripted = torch.jit.script(model)
    assert torch.allclose(scripted(X), ref, atol=1e-5)
    exported = torch.export.export(model, (X,))
    assert torch.allclose(exported.module()(X), ref, atol=1e-5)


def test_retinanet_backbone_detections_identical():
    from torchvision.models.detection import retinanet_resnet50_fpn

    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=64,
                                   max_size=64).eval()
    images = [torch.rand(3, 64, 64)]
    ref = model(images)
    dbi.inject(model, "retinanet_resnet50_fpn")
    assert _counts([m.point for m in dbi.injected_dropblocks(model)]) == (27, 9)
    assert all(m.point.module.startswith("backbone.body.layer") for m in dbi.injected_dropblocks(model))
    out = model(images)
    for a, b in zip(out, ref):
        for k in a:
            assert torch.equal(a[k], b[k])
    model.train()
    losses = model(images, [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}])
    sum(losses.values()).backward()
    dbi.strip(model).eval()
    assert not dbi.injected_dropblocks(model)


def test_whole_detector_untraceable_is_named():
    from torchvision.models.detection import retinanet_resnet50_fpn

    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    with pytest.raises(dbi.SurgeryError, match="cannot trace module 'transform' \\(GeneralizedRCNNTransform\\)"):
        dbi.inject(model, {"rules": [{"modules": ["transform"], "after": ["any"]}]})
    assert not dbi.injected_dropblocks(model)


@pytest.mark.parametrize("ctor, expected", [
    (lambda: torchvision.models.vgg11_bn(), (2, 0)),
    (lambda: torchvision.models.densenet121(), (81, 0)),
    (lambda: torchvision.models.resnet50(), (27, 9)),
], ids=["vgg11_bn", "densenet121", "resnet50"])
def test_paper_generic(ctor, expected):
    model = ctor().eval()
    ref = model(X)
    points = dbi.plan(model, "paper_generic")
    assert _counts(points) == expected
    assert all(p.shape is not None and len(p.shape) == 4 and p.shape[-1] in (28, 14, 7) for p in points)
    dbi.inject(model, "paper_generic")
    assert torch.equal(model(X), ref)


def test_se_maps_never_selected():
    model = timm.create_model("seresnet50", pretrained=False)
    points = dbi.plan(model, {"rules": [{"modules": ["**"], "after": ["any"], "stride": [16, 32]}]})
    assert points and all(p.shape[-1] > 1 for p in points)
    assert not any(".se" in p.module for p in points)


@pytest.mark.parametrize("keep_prob", [1.0, 0.8])
def test_augmented_assignment_stays_in_place(keep_prob):
    """``out += identity`` in the original forward must stay in place in the rewritten training graph.

    torchvision's Bottleneck adds the shortcut into bn3's output and applies an in-place ReLU: the block
    returns the very tensor its last BN (or the DropBlock after it) produced, with no extra allocation.
    """
    block = torchvision.models.resnet50().layer3[1].train()
    dbi.inject(block, {"rules": [{"types": ["Bottleneck"], "after": ["norm"], "shortcut": True}]})
    _set_keep(block, keep_prob)
    produced = []
    last = block.dropblocks["bn3"]  # the add's first operand now
    last.register_forward_hook(lambda m, a, out: produced.append(out.data_ptr()))
    out = block(torch.randn(2, 1024, 8, 8))
    assert out.data_ptr() == produced[0]
    assert "+=" in block.forward.graph.python_code("self").src


def test_inplace_only_on_fresh_batchnorm_and_conv_outputs():
    """DropBlock overwrites a plain BatchNorm/conv output read by nothing else, and nothing more; training
    gives the same outputs and gradients as out-of-place DropBlocks under the same seed."""
    model = torchvision.models.resnet18()
    dbi.inject(model, "resnet50_paper")
    flags = {(d.point.module, d.point.after): d.inplace for d in dbi.injected_dropblocks(model)}
    assert flags == {("layer3.0", "bn1"): True, ("layer3.0", "bn2"): True, ("layer3.0", "downsample_1"): True,
                     ("layer3.1", "bn1"): True, ("layer3.1", "bn2"): True, ("layer3.1", "x"): False,
                     ("layer4.0", "bn1"): True, ("layer4.0", "bn2"): True, ("layer4.0", "downsample_1"): True,
                     ("layer4.1", "bn1"): True, ("layer4.1", "bn2"): True, ("layer4.1", "x"): False}
    twin = copy.deepcopy(model)
    for d in dbi.injected_dropblocks(twin):
        d.inplace = False
    grads = []
    for m in (model, twin):
        m.train()
        _set_keep(m, 0.7)
        torch.manual_seed(4)
        out = m(X)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad for p in m.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))

    # timm's BatchNormAct2d ends with an activation that keeps its output for backward: never in place
    effnet = timm.create_model("efficientnet_b0", pretrained=False)
    dbi.inject(effnet, "paper_generic")
    assert not any(d.inplace for d in dbi.injected_dropblocks(effnet))
    effnet.train()
    _set_keep(effnet, 0.7)
    effnet(X).sum().backward()


# ------------------------------------------------------------------------------------------------ call patterns

class _OptionalShortcutBlock(nn.Module):
    """Like timm's DlaBasic: an optional shortcut argument, the identity when it is None."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x, shortcut=None, children=None):
        if shortcut is None:
            shortcut = x
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out += shortcut
        return F.relu(out)


class _OptionalNet(nn.Module):
    def __init__(self, in_channels=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.project = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.b1 = _OptionalShortcutBlock()
        self.b2 = _OptionalShortcutBlock()

    def forward(self, x):
        x = self.stem(x)
        x = self.b1(x, self.project(x))
        return self.b2(x).mean((2, 3))


OPTIONAL_RECIPE = {"rules": [{"modules": ["b1", "b2"], "after": ["norm"], "shortcut": True}]}


@pytest.mark.parametrize("example", [True, False], ids=["example_input", "no_example_input"])
def test_optional_arguments_traced_as_called(example):
    """fx would trace ``shortcut`` as a Proxy and bake ``shortcut is not None``; b2 is called without one."""
    model = _OptionalNet().eval()
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
    _set_keep(model, 0.5)
    ran = []
    for m in dbi.injected_dropblocks(model):
        m.register_forward_pre_hook(lambda m, args: ran.append(m))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every call matches the traced pattern: no fallback
        model(x).sum().backward()
    assert len(ran) == 6
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_call_differing_from_traced_pattern_runs_original_forward():
    model = _OptionalNet()
    dbi.inject(model, OPTIONAL_RECIPE, example_input=torch.randn(1, 3, 16, 16))
    _set_keep(model, 0.5)
    block = model.b2.train()  # traced with shortcut=None
    twin = copy.deepcopy(block)
    dbi.strip(twin)
    x, s = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16)
    with pytest.warns(UserWarning, match=r"'_OptionalShortcutBlock b2' was rewritten for calls with "
                                         r"\(x=not None, shortcut=None, children=None\)"):
        out = block(x, s)
    assert torch.equal(out, twin(x, s))  # the original forward: the tensor shortcut is used, nothing dropped
    for call in [(x, None, None), (x,)]:  # the traced pattern, positionally or by default
        torch.manual_seed(0)
        assert not torch.equal(block(*call), twin(*call))
    with pytest.warns(UserWarning, match="called otherwise"), pytest.raises(TypeError, match="bogus"):
        block(x, bogus=1)  # an unknown keyword reaches the original forward, which raises as it would


def test_example_forward_failing_falls_back_to_signature_defaults():
    # no example input, and the default 1x3x224x224 does not fit (1 input channel): defaults are used, so
    # b1 is traced with shortcut=None, and its real calls (with a shortcut) run the original forward
    model = _OptionalNet(in_channels=1)
    dbi.inject(model, OPTIONAL_RECIPE)
    assert [(d.point.module, d.point.after) for d in dbi.injected_dropblocks(model)][2] == ("b1", "x")
    model.train()
    with pytest.warns(UserWarning, match="'_OptionalShortcutBlock b1' was rewritten"):
        model(torch.randn(2, 1, 16, 16)).sum().backward()
    dbi.strip(model)
    with pytest.raises(dbi.SurgeryError, match="example input"):  # an explicit example input must work
        dbi.plan(model, OPTIONAL_RECIPE, example_input=torch.randn(1, 3, 16, 16))


class _ListBlock(nn.Module):
    """Like timm's SelecSlsBlock / HRNet's HighResolutionModule: List[Tensor] in and out, item assignment."""

    def __init__(self, c=8):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
                                      for _ in range(2))

    def forward(self, x: List[Tensor]) -> List[Tensor]:
        if not isinstance(x, list):
            x = [x]
        for i, branch in enumerate(self.branches):
            x[i] = branch(x[i])
        return [x[0] + x[1], x[1]]


class _ListNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_ListBlock(), _ListBlock())

    def forward(self, x):
        x = self.stem(x)
        a, b = self.blocks([x, x * 2])
        return (a + b).mean((2, 3))


def test_list_of_tensors_argument():
    model = _ListNet().eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    recipe = {"rules": [{"modules": ["blocks.*"], "after": ["norm"], "shortcut": True}]}
    points = dbi.plan(model, recipe, example_input=torch.randn(1, 3, 16, 16))
    # the addition of the two branches reads as a residual one (either side could be the shortcut)
    assert [(p.module, p.after, p.kind, p.shape) for p in points][:2] == [
        ("blocks.0", "branches_0_1", "branch", (1, 8, 16, 16)), ("blocks.0", "branches_1_1", "shortcut", (1, 8, 16, 16))]
    dbi.inject(model, recipe)  # no example input: the call pattern comes from one default forward
    assert len(dbi.injected_dropblocks(model)) == 4
    assert torch.equal(model(x), ref)
    model.train()
    _set_keep(model, 0.5)
    out = model(x)
    out.sum().backward()
    assert isinstance(model.blocks[0](([x[:, :1].expand(2, 8, 16, 16)] * 2)), list)  # output structure kept
    for clone in (copy.deepcopy(model), _reload(model)):
        torch.manual_seed(1)
        a = clone(x)
        torch.manual_seed(1)
        assert torch.equal(a, model(x))
    trained = model.eval()(x)  # BN statistics moved in training
    dbi.strip(model)
    assert torch.equal(model(x), trained) and not torch.equal(trained, ref)


def _reload(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ------------------------------------------------------------------------------------------------ untraceable

class _Untraceable(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # data-dependent control flow
            y = y * 1.0
        return x + y


class _StrideNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 16, stride=16)  # stride 16 at once
        self.res = _Res("add")
        self.odd = _Untraceable()

    def forward(self, x):
        return self.odd(self.res(self.stem(x))).mean((2, 3))


def test_untraceable_module_selected_by_stride_is_skipped_with_a_warning():
    model = _StrideNet()
    recipe = {"rules": [{"stride": [16], "after": ["norm"], "shortcut": True}]}
    with pytest.warns(UserWarning, match=r"cannot trace module 'odd' \(_Untraceable\).*control flow.*rule "
                                         r"'rule0' selects by output stride, so this module is left without"):
        dbi.inject(model, recipe)
    assert {d.point.module for d in dbi.injected_dropblocks(model)} == {"res"}
    dbi.strip(model)
    # a rule naming the module (by path or type) still fails, and leaves the model untouched
    for rule in ({"modules": ["odd"]}, {"types": ["_Untraceable"], "stride": [16]}):
        with pytest.raises(dbi.SurgeryError, match=r"cannot trace module 'odd' \(_Untraceable\)"):
            dbi.inject(model, {"rules": [{**rule, "after": ["norm"]}]})
        assert not dbi.injected_dropblocks(model) and "forward" not in model.res.__dict__
    # nothing traceable left: the RecipeError says why
    odd_only = nn.Sequential(nn.Conv2d(3, 8, 16, stride=16), _Untraceable())
    for rule in ({"stride": [16], "after": ["norm"]}, {"stride": [16], "after": ["norm"], "optional": True}):
        with pytest.warns(UserWarning), pytest.raises(
                dbi.RecipeError, match=r"matches no insertion point in Sequential.*; skipped: cannot trace module "
                                       r"'1' \(_Untraceable\)"):
            dbi.plan(odd_only, {"rules": [rule]})


# ------------------------------------------------------------------------------------------------ conv-norm units

class _ConvBnResidual(nn.Module):
    """The children of a conv-norm unit, but a residual block."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + F.relu(self.bn(self.conv(x)))


class _BnConv(_ConvBnResidual):
    def forward(self, x):
        return self.conv(F.relu(self.bn(x)))  # pre-activation: normalises before convolving


class _ConvBnNamed(_ConvBnResidual):
    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def test_conv_norm_units_recognised_by_their_forward():
    from torchvision.models.inception import BasicConv2d

    from dropblock_inject.surgery.kinds import module_kind as _module_kind

    assert _module_kind(BasicConv2d(8, 8, kernel_size=3)) == "unit"  # conv, bn, functional relu
    assert _module_kind(_ConvBnNamed()) == "unit"
    assert _module_kind(_ConvBnResidual()) is None
    assert _module_kind(_BnConv(8)) is None
    # the residual one is a block of its own: DropBlock after its bn and on its shortcut; a unit is not
    recipe = {"rules": [{"modules": ["1"], "after": ["norm"], "shortcut": True}]}
    points = dbi.plan(nn.Sequential(nn.Conv2d(3, 8, 1), _ConvBnResidual()), recipe)
    assert [(p.module, p.after, p.kind) for p in points] == [("1", "bn", "branch"), ("1", "x", "shortcut")]
    with pytest.raises(dbi.RecipeError, match="matches no insertion point"):
        dbi.plan(nn.Sequential(nn.Conv2d(3, 8, 1), _ConvBnNamed()), recipe)


@pytest.mark.parametrize("ctor, size, expected", [
    (lambda: torchvision.models.inception_v3(weights=None, init_weights=False), 299, 66),
    (lambda: timm.create_model("inception_v3", pretrained=False), 299, 66),
    (lambda: torchvision.models.googlenet(weights=None, init_weights=False), 96, 42),
], ids=["tv_inception_v3", "timm_inception_v3", "googlenet"])
def test_inception_units_get_one_dropblock_each(ctor, size, expected):
    """Inception's BasicConv2d (torchvision) and ConvNormAct (timm) are units of their Inception block: one
    DropBlock after each, placed in the block, none inside the unit (timm's used to get both)."""
    model = ctor().eval()
    points = dbi.plan(model, "paper_generic", example_input=torch.randn(1, 3, size, size))
    assert len(points) == expected and all(p.kind == "branch" for p in points)
    assert all(re.fullmatch(r"Mixed_[67][a-e]|inception[45][a-e]", p.module) for p in points), points[0]
    assert len({(p.module, p.after) for p in points}) == expected


def test_modules_inside_conv_norm_modules_are_not_rewritten():
    # timm's byobnet blocks are made of ConvNormAct (conv + BatchNormAct2d): DropBlock after each of them
    # in the block, not a second one inside
    model = timm.create_model("resnext26ts", pretrained=False)
    points = dbi.plan(model, "paper_generic", example_input=torch.randn(1, 3, 64, 64))
    assert _counts(points) == (12, 4)
    assert {p.module for p in points} == {"stages.2.0", "stages.2.1", "stages.3.0", "stages.3.1"}


def test_attention_logits_never_selected():
    # timm's GlobalContext: conv_attn gives one-channel logits that go through a softmax and a matmul
    model = timm.create_model("gcresnet33ts", pretrained=False)
    points = dbi.plan(model, "paper_generic", example_input=torch.randn(1, 3, 64, 64))
    assert points and not any(".attn" in p.module for p in points)
    assert all(p.shape[1] > 1 for p in points)


@pytest.mark.parametrize("name, size, block, shortcut", [
    ("xception41", 96, "blocks.2", "shortcut"),      # stack of SeparableConv2d vs a ConvNormAct projection
    ("ghostnet_100", 64, "blocks.5.0", "shortcut_3"),  # GhostModules vs a Sequential(dw conv, bn, conv, bn)
])
def test_shortcut_is_the_side_with_fewer_convolutions(name, size, block, shortcut):
    """Branches made of modules that hold convs without being conv/norm layers themselves (SeparableConv2d,
    GhostModule) used to count as empty, so the projection was taken for the branch and the branch's last
    module for the shortcut, which also held DropBlocks of its own."""
    model = timm.create_model(name, pretrained=False)
    points = dbi.plan(model, "paper_generic", example_input=torch.randn(1, 3, size, size))
    assert [p.after for p in points if p.module == block and p.kind == "shortcut"] == [shortcut]
    dbi.inject(model, "paper_generic", example_input=torch.randn(1, 3, size, size))
    from dropblock_inject.coverage import _nested_dropblocks

    assert _nested_dropblocks(model) == ""
