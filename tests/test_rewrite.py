"""Stage 6, rewrite (``surgery.s28_rewrite``): inject / strip and the surgery guarantees."""

import copy
import io

import pytest
import timm
import torch
import torchvision
from _models import BlockWithTrainingFlag, X, counts, same_state, set_keep
from torch import nn

import dropblock_inject as dbi


def test_train_output_at_keep_prob_one_is_bit_identical():
    model = torchvision.models.resnet50().train()
    twin = copy.deepcopy(model)
    dbi.inject(model, "resnet50_paper")
    set_keep(model, 1.0)
    torch.manual_seed(3)
    a = model(X)
    torch.manual_seed(3)
    b = twin(X)
    assert torch.equal(a, b)
    assert same_state(model, twin.state_dict())  # BN statistics updated identically


def test_train_mode_drops_and_backprops():
    model = torchvision.models.resnet18().train()
    dbi.inject(model, "resnet50_paper")
    set_keep(model, 0.7)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((o == 0).float().mean().item()))
             for m in dbi.injected_dropblocks(model)]
    model(X).sum().backward()
    for h in hooks:
        h.remove()
    assert len(seen) == 12
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_training_dependent_code_still_switches():
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BlockWithTrainingFlag(8))
    ref_eval = block.eval()(X)
    dbi.inject(block, {"rules": [{"modules": ["1"], "after": ["norm"], "shortcut": True}]})
    assert torch.equal(block.eval()(X), ref_eval)
    set_keep(block, 1.0)
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
    pytest.param(lambda: torchvision.models.convnext_tiny(stochastic_depth_prob=0.5), marks=pytest.mark.slow),
    lambda: torchvision.models.efficientnet_b0(stochastic_depth_prob=0.5, dropout=0.5),
    lambda: timm.create_model("resnet26", pretrained=False, drop_path_rate=0.5, drop_rate=0.5),
], ids=["convnext_sd", "efficientnet_sd", "timm_resnet_droppath"])
def test_stochastic_depth_models_keep_train_eval_behaviour(ctor):
    model = ctor().eval()
    ref = model(X)
    dbi.inject(model, "paper_generic", example_input=torch.randn(1, 3, 64, 64))
    assert torch.equal(model(X), ref)
    set_keep(model, 1.0)
    model.train()
    twin = copy.deepcopy(model)
    dbi.strip(twin)
    torch.manual_seed(5)
    a = model(X)
    torch.manual_seed(5)
    b = twin(X)
    assert torch.equal(a, b)
    assert torch.equal(model.eval()(X), twin.eval()(X))


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
    assert same_state(injected, other.state_dict())


def test_deepcopy_pickle_and_optimizer_built_before():
    model = torchvision.models.resnet18()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dbi.inject(model, "resnet50_paper")
    model.train()
    set_keep(model, 0.8)
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
        set_keep(model, keep)
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


@pytest.mark.slow
def test_retinanet_backbone_detections_identical():
    from torchvision.models.detection import retinanet_resnet50_fpn

    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=64,
                                   max_size=64).eval()
    images = [torch.rand(3, 64, 64)]
    ref = model(images)
    dbi.inject(model, "retinanet_resnet50_fpn")
    assert counts([m.point for m in dbi.injected_dropblocks(model)]) == (27, 9)
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
    for m in twin.modules():  # a forward hook on a producer makes its DropBlock work out of place
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda *args: None)
    grads = []
    for m in (model, twin):
        m.train()
        set_keep(m, 0.7)
        torch.manual_seed(4)
        out = m(X)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad for p in m.parameters()]))
    assert not any(d.inplace for d in dbi.injected_dropblocks(twin))
    assert sum(d.inplace for d in dbi.injected_dropblocks(model)) == 10
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))

    # timm's BatchNormAct2d ends with an activation that keeps its output for backward: never in place
    effnet = timm.create_model("efficientnet_b0", pretrained=False)
    dbi.inject(effnet, "paper_generic")
    assert not any(d.inplace for d in dbi.injected_dropblocks(effnet))
    effnet.train()
    set_keep(effnet, 0.7)
    effnet(X).sum().backward()


@pytest.mark.parametrize("hook", ["module", "global"])
def test_hooks_never_observe_an_inplace_write(hook):
    """A forward hook that keeps a BatchNorm's output (feature logging, distillation), registered after
    inject, finds it as BatchNorm returned it after the whole train step: that DropBlock works out of place
    while the hook is there (the others stay in place), and in place again once it is removed."""
    model = torchvision.models.resnet18().train()
    dbi.inject(model, "resnet50_paper")
    set_keep(model, 0.5)
    bn = model.layer3[0].bn1
    db = model.layer3[0].dropblocks["bn1"]
    assert db.inplace
    kept = []

    def keep(m, args, out):
        if m is bn:
            kept.append((out, out.clone()))

    if hook == "module":
        handle = bn.register_forward_hook(keep)
    else:
        handle = nn.modules.module.register_module_forward_hook(keep)
    model(X).sum().backward()
    (out, at_hook_time), = kept
    assert torch.equal(out, at_hook_time) and (out != 0).all()
    assert not db.inplace
    others = [d for d in dbi.injected_dropblocks(model) if d is not db]
    assert any(d.inplace for d in others) == (hook == "module")
    handle.remove()
    model(X)
    assert db.inplace
