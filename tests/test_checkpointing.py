"""Gradient checkpointing (``surgery.s17_checkpointing``): what a scope's code decides from ``grad_checkpointing``
(timm) or ``gradient_checkpointing`` (Hugging Face) is decided per call, as on the original model, and the
recomputed forward draws the same DropBlock masks."""

import copy
import functools
import warnings

import pytest
import timm
import torch
import torch.utils.checkpoint
import transformers
from torch.utils.checkpoint import checkpoint
from _models import X, set_keep

import dropblock_inject as dbi
import dropblock_inject.surgery  # noqa: F401 - imported before the fixture below wraps torch's checkpoint: the
# registry keeps the functions as they were at its import, which a partial made at import time holds (``_PARTIAL``)


CALLS = []


@pytest.fixture(autouse=True)
def counted_checkpoints(monkeypatch):
    """Counts the calls of ``torch.utils.checkpoint.checkpoint``: timm's helpers call it through the module,
    Hugging Face's ``activation_checkpointing_enable`` binds the name it imported."""
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        CALLS.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)


def _step(model):
    CALLS.clear()
    out = model(X)
    (out if isinstance(out, torch.Tensor) else out[0]).square().mean().backward()
    return len(CALLS)


def _assert_same_outputs(twin, plain, set_flag):
    """The injected ``twin`` at keep_prob 1 gives ``plain``'s outputs, flag on and off, in train and eval."""
    set_keep(twin, 1.0)
    for on in (False, True):
        set_flag(twin, on)
        set_flag(plain, on)
        for train in (True, False):
            twin.train(train)
            plain.train(train)
            torch.manual_seed(3)
            want = plain(X)
            torch.manual_seed(3)
            assert torch.equal(twin(X), want), (on, train)


def _timm(name):
    return timm.create_model(name, pretrained=False, num_classes=4).train()


def _hf():  # PP-LCNet's blocks are GradientCheckpointingLayers: its wrapper decides, around the block's forward
    return transformers.PPLCNetForImageClassification(transformers.PPLCNetConfig(
        scale=0.25, class_expand=64, num_labels=4)).train()


def _enable(model, on=True):
    if isinstance(model, transformers.PreTrainedModel):
        model.activation_checkpointing_enable() if on else model.activation_checkpointing_disable()
    else:
        model.set_grad_checkpointing(on)


MODELS = {"efficientnet_b0": lambda: _timm("efficientnet_b0"), "convnext_atto": lambda: _timm("convnext_atto"),
          "resnet18": lambda: _timm("resnet18"), "hf_pp_lcnet": _hf}


def _models(*slow):
    """The MODELS names as parameters, those in ``slow`` marked slow (the fast subset keeps a timm and an HF
    model for each behaviour)."""
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in MODELS]


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("name", _models("efficientnet_b0", "convnext_atto"))
def test_same_checkpoint_calls_as_the_original(name, when):
    """Checkpointing toggled before or after inject: as many checkpoint calls per train step as the original
    model makes, and none once it is turned off again."""
    plain = MODELS[name]()
    _enable(plain)
    expected = _step(plain)
    assert expected > 0
    model = MODELS[name]()
    if when == "before":
        _enable(model)
    dbi.inject(model, "paper_generic", example_input=X[:1])
    scopes = [m for _, m in dbi.surgery.s26_forward.injected_modules(model)]
    if when == "after":
        assert _step(model) == 0
        _enable(model)
    fired = []
    hooks = [d.register_forward_hook(lambda *a: fired.append(1)) for d in dbi.injected_dropblocks(model)]
    assert _step(model) == expected
    assert len(fired) >= len(dbi.injected_dropblocks(model))  # every DropBlock ran (some twice: recomputed)
    for h in hooks:
        h.remove()
    _enable(model, False)
    assert _step(model) == 0 and scopes


@pytest.mark.parametrize("name", _models("efficientnet_b0"))
def test_recomputed_forward_draws_the_same_masks(name):
    """With DropBlock active, checkpointed training gives the gradients of the same injected model without
    checkpointing under the same seed: the recomputation replays the masks (checkpoint restores the RNG)."""
    torch.manual_seed(0)
    model = MODELS[name]()
    dbi.inject(model, "paper_generic", example_input=X[:1])
    set_keep(model, 0.6)
    twin = copy.deepcopy(model)
    _enable(twin)
    grads = []
    for m in (model, twin):
        torch.manual_seed(7)
        _step(m)
        grads.append([p.grad for p in m.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))
    torch.manual_seed(8)  # and the masks do drop: another seed, another gradient
    model.zero_grad()
    _step(model)
    assert not all(torch.allclose(p.grad, g) for p, g in zip(model.parameters(), grads[1]))


def test_untraceable_checkpoint_call_warns_instead_of_losing_checkpointing():
    """A forward that checkpoints a closure (fx cannot keep it as one call): inject warns, and while the flag
    is on that scope runs its original code, checkpointing included, and warns that it runs without DropBlock."""
    from torch import nn

    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.grad_checkpointing = False

        def forward(self, x):
            if self.grad_checkpointing:
                return x + torch.utils.checkpoint.checkpoint(lambda t: self.bn(self.conv(t)), x, use_reentrant=False)
            return x + self.bn(self.conv(x))

    model = nn.Sequential(nn.Conv2d(3, 8, 1), Stage(), nn.Conv2d(8, 4, 1)).train()
    with pytest.warns(UserWarning,
                      match="without DropBlock while grad_checkpointing=True.*checkpoint a submodule, not a closure"):
        dbi.inject(model, {"rules": [{"modules": ["1"], "after": ["norm"]}]})
    model[1].grad_checkpointing = True
    with pytest.warns(UserWarning, match="runs its original forward, without DropBlock"):
        assert _step(model) == 1


_PARTIAL = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


class _Reached(torch.nn.Module):
    """A stage checkpointing its convolutions (the DropBlock goes after its BatchNorm, outside the checkpoint)
    the way ``how`` says, as users' and older Hugging Face models do."""

    def __init__(self, how):
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1))
        self.bn = torch.nn.BatchNorm2d(8)
        self.grad_checkpointing = False
        self.how = how
        self.checkpoint_fn = torch.utils.checkpoint.checkpoint  # the function object, not the module attribute
        self._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)

    def forward(self, x):
        if not self.grad_checkpointing:
            y = self.conv(x)
        elif self.how == "global name":
            y = checkpoint(self.conv, x, use_reentrant=False)
        elif self.how == "module attribute":
            y = torch.utils.checkpoint.checkpoint(self.conv, x, use_reentrant=False)
        elif self.how == "instance attribute":
            y = self.checkpoint_fn(self.conv, x, use_reentrant=False)
        elif self.how == "partial attribute, bound __call__":  # Hugging Face's older encoders
            y = self._gradient_checkpointing_func(self.conv.__call__, x)
        else:  # "global partial"
            y = _PARTIAL(self.conv, x)
        return x + self.bn(y)


@pytest.mark.parametrize("how", ["module attribute", "instance attribute", "partial attribute, bound __call__",
                                 "global partial"])
def test_checkpoint_reached_through_an_attribute_or_a_partial_stays_one_call(how, recwarn):
    """Checkpoint called as ``torch.utils.checkpoint.checkpoint``, through an attribute or a partial: inject
    keeps the call (no warning, no fallback); while the flag is on the checkpointed convolutions run twice per
    step (forward and recomputation) and the DropBlock drops."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), _Reached(how), torch.nn.Conv2d(8, 4, 1)).train()
    dbi.inject(model, {"rules": [{"modules": ["1"], "after": ["norm"], "keep_prob": 0.5}]})
    conv_calls, dropped = [], []
    model[1].conv[0].register_forward_hook(lambda *a: conv_calls.append(1))  # recomputed in backward
    dbi.injected_dropblocks(model)[0].register_forward_hook(lambda m, a, out: dropped.append(bool((out == 0).any())))
    model[1].grad_checkpointing = True
    _step(model)
    assert len(conv_calls) == 2 and dropped == [True]
    model[1].grad_checkpointing = False
    _step(model)
    assert len(conv_calls) == 3
    assert not [w for w in recwarn if "dropblock_inject" in str(w.message)]


def test_a_checkpoint_variant_leaves_later_fx_traces_working(monkeypatch):
    """The rewritten graph of a checkpoint call torch's function makes (a dotted name for fx) must not register
    an fx.wrap that breaks every later trace in the process (KeyError: 'torch.utils.checkpoint.checkpoint')."""
    monkeypatch.undo()  # torch's own checkpoint function, not the counting stand-in
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), _Reached("global name")).train()
    dbi.inject(model, {"rules": [{"modules": ["1"], "after": ["norm"]}]})
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    assert [n.op for n in gm.graph.nodes].count("call_module") == 2


class _ThroughAMethod(torch.nn.Module):
    """timm's pattern: ``forward`` calls ``self.forward_features``, which checkpoints by the global name."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1))
        self.bn = torch.nn.BatchNorm2d(8)
        self.grad_checkpointing = False

    def forward_features(self, x):
        return checkpoint(self.conv, x, use_reentrant=False) if self.grad_checkpointing else self.conv(x)

    def forward(self, x):
        return x + self.bn(self.forward_features(x))


def test_checkpoint_called_from_a_method_of_the_scope_stays_one_call(recwarn):
    """A method next to the forward sees the trace's own globals too (bound for that trace only)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), _ThroughAMethod()).train()
    dbi.inject(model, {"rules": [{"modules": ["1"], "after": ["norm"], "keep_prob": 0.5}]})
    assert "forward_features" not in model[1].__dict__
    assert not [w for w in recwarn if "dropblock_inject" in str(w.message)]
    conv_calls = []
    model[1].conv[0].register_forward_hook(lambda *a: conv_calls.append(1))
    model[1].grad_checkpointing = True
    _step(model)
    assert len(conv_calls) == 2  # checkpointed: recomputed in backward


class _UseCheckpoint(torch.nn.Module):
    """Swin's and many repositories' pattern: ``use_checkpoint`` decides whether the convolutions are
    checkpointed (called through the module attribute)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1))
        self.bn = torch.nn.BatchNorm2d(8)
        self.use_checkpoint = False

    def forward(self, x):
        if self.use_checkpoint:
            y = torch.utils.checkpoint.checkpoint(self.conv, x, use_reentrant=False)
        else:
            y = self.conv(x)
        return x + self.bn(y)


class _WithCp(torch.nn.Module):
    """mmcv's pattern: a closure over the whole block, checkpointed when ``with_cp`` is on and the input
    requires grad (fx can trace neither: while it is on, the injected block runs its original code)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.with_cp = False

    def forward(self, x):
        def _inner_forward(x):
            return x + self.bn(self.conv(x))

        if self.with_cp and x.requires_grad:
            return torch.utils.checkpoint.checkpoint(_inner_forward, x, use_reentrant=False)
        return _inner_forward(x)


class _OwnName(torch.nn.Module):
    """A user's own flag name, the checkpoint function held as an instance attribute, and a boolean attribute
    the forward reads that is no flag (``scale_residual``: its value stays baked into the graph)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
        self.bn = torch.nn.BatchNorm2d(8)
        self.recompute_convs = False
        self.scale_residual = True
        self.checkpoint_fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)

    def forward(self, x):
        y = self.checkpoint_fn(self.conv, x) if self.recompute_convs else self.conv(x)
        y = self.bn(y)
        return x + (0.5 * y if self.scale_residual else y)


FLAGGED = {"use_checkpoint": _UseCheckpoint, "with_cp": _WithCp, "recompute_convs": _OwnName}


def _flagged(block, on):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), block(), block(), torch.nn.Conv2d(8, 4, 1)).train()
    _set(model, on)
    return model


def _set(model, on):
    for m in model:
        for name in FLAGGED:
            if hasattr(m, name):
                setattr(m, name, on)


_FLAG_RULE = {"rules": [{"modules": ["1", "2"], "after": ["norm"]}]}


@pytest.mark.filterwarnings("ignore:dropblock_inject")  # with_cp: its checkpointed closure runs without DropBlock
@pytest.mark.parametrize("when", ["on at inject", "on after inject"])
@pytest.mark.parametrize("flag", FLAGGED)
def test_any_flag_that_decides_a_checkpoint_call_is_decided_per_call(flag, when):
    """A block checkpointing under a boolean attribute of any name gets the points it gets with the flag off,
    whatever the flag is at inject, and then checkpoints exactly when the original does (flag toggled after
    inject included), with the original's outputs (eval; train at keep_prob 1 under one seed)."""
    original = _flagged(FLAGGED[flag], True)
    expected = _step(original)
    assert expected == 2
    _set(original, False)
    assert _step(original) == 0
    model = _flagged(FLAGGED[flag], when == "on at inject")
    off = dbi.plan(_flagged(FLAGGED[flag], False), _FLAG_RULE)
    dbi.inject(model, _FLAG_RULE)
    injected = [(d.point.module, d.point.after) for d in dbi.injected_dropblocks(model)]
    assert injected == [(p.module, p.after) for p in off]
    assert len(off) == 2
    twin, plain = copy.deepcopy(model), _flagged(FLAGGED[flag], False)  # same weights, statistics untouched
    for on in (False, True, False, True):
        _set(model, on)
        assert _step(model) == (expected if on else 0), on
    _assert_same_outputs(twin, plain, _set)


def _densenet(memory_efficient):
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16,
                                       num_classes=4, memory_efficient=memory_efficient).train()


@pytest.mark.filterwarnings("ignore:dropblock_inject")  # its checkpointed closure runs without DropBlock
@pytest.mark.parametrize("at_inject", [True, False])
def test_torchvision_densenet_memory_efficient(at_inject):
    """torchvision's DenseNet checkpoints each dense layer's bottleneck under ``memory_efficient`` (a closure,
    when an input requires grad): with it on at inject the layers get the points they get with it off, and the
    injected model checkpoints as the original does, whichever way it is toggled."""
    original = _densenet(True)
    expected = _step(original)
    assert expected == 8
    model = _densenet(at_inject)
    off = dbi.plan(_densenet(False), "paper_generic", example_input=X[:1])
    dbi.inject(model, "paper_generic", example_input=X[:1])
    assert sorted((d.point.module, d.point.after) for d in dbi.injected_dropblocks(model)) == \
        sorted((p.module, p.after) for p in off)
    assert sum(p.module.endswith("denselayer1") for p in off) >= 2
    for on in (True, False, True):
        for m in model.modules():
            if hasattr(m, "memory_efficient"):
                m.memory_efficient = on
        assert _step(model) == (expected if on else 0), on


def test_only_forwards_that_can_reach_a_checkpoint_function_have_candidate_flags():
    """The flags are looked for (two more traces per boolean attribute) only where a forward, its closures or
    the methods it calls can reach a checkpoint function; there, every boolean attribute it reads is a
    candidate, whatever its name, and a trace decides."""
    from dropblock_inject.surgery.s17_checkpointing import candidates

    class NoCheckpoint(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 8, 1)
            self.use_checkpoint = False  # named like a flag, but nothing here checkpoints

        def forward(self, x):
            return self.conv(x) if self.use_checkpoint else x + self.conv(x)

    assert candidates(NoCheckpoint()) == ()
    assert candidates(_UseCheckpoint()) == ("use_checkpoint",)
    assert candidates(_WithCp()) == ("with_cp",)  # through the closure's module attribute
    assert candidates(_OwnName()) == ("recompute_convs", "scale_residual")  # through the instance attribute
    assert candidates(_densenet(False).features.denseblock1.denselayer1) == ("memory_efficient",)


class _NoCp(torch.nn.Module):
    """A flag of inverted sense: ``no_cp`` True means *do not* checkpoint (checkpointing by default)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1))
        self.bn = torch.nn.BatchNorm2d(8)
        self.no_cp = False

    def forward(self, x):
        y = self.conv(x) if self.no_cp else torch.utils.checkpoint.checkpoint(self.conv, x, use_reentrant=False)
        return x + self.bn(y)


def _no_cp(checkpointing):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), _NoCp(), _NoCp(), torch.nn.Conv2d(8, 4, 1)).train()
    _cp(model, checkpointing)
    return model


def _cp(model, checkpointing):
    for m in model:
        if isinstance(m, _NoCp):
            m.no_cp = not checkpointing


@pytest.mark.parametrize("checkpointing_at_inject", [True, False])
def test_a_flag_whose_true_means_no_checkpoint(checkpointing_at_inject):
    """``no_cp`` True turns checkpointing off: the blocks get their points (after the norm, whatever the
    flag at inject) and the injected model checkpoints exactly when the original does, flag toggled after
    inject included, with the original's outputs, and drops blocks in both states (no warning at inject)."""
    original = _no_cp(True)
    assert _step(original) == 2
    _cp(original, False)
    assert _step(original) == 0
    model = _no_cp(checkpointing_at_inject)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dbi.inject(model, _FLAG_RULE)
    assert sorted((d.point.module, d.point.after) for d in dbi.injected_dropblocks(model)) == [("1", "bn"), ("2", "bn")]
    twin, plain = copy.deepcopy(model), _no_cp(False)
    set_keep(model, 0.5)
    dropped = []
    for db in dbi.injected_dropblocks(model):
        db.register_forward_hook(lambda m, a, out: dropped.append(bool((out == 0).any())))
    for on in (False, True, False, True):
        _cp(model, on)
        dropped.clear()
        assert _step(model) == (2 if on else 0), on
        assert dropped and all(dropped), on  # (recomputation in backward calls them again)
    _assert_same_outputs(twin, plain, _cp)
