"""A top module's points inside its plain Sequential children run in those children's forwards
(``surgery.s24_sequentials``): the top module stays untouched, so the whole model traces with fx in training mode
(VGG, DenseNet, MobileNet, EfficientNet, ConvNeXt, ShuffleNet), with exactly what the top module's own rewritten
graph would have run."""

import copy

import pytest
import torch
import torchvision
from _models import X, dropblock_nodes, reload, set_keep
from timm.models._manipulate import checkpoint_seq
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import dropblock_inject as dbi
from dropblock_inject.surgery import s25_blueprint as blueprint
from dropblock_inject.surgery.s26_forward import InjectedForward


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None)


def _root_rewritten(model: nn.Module, recipe: str, monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """``model`` injected as before this stage existed: every point in the top module's own graph."""
    with monkeypatch.context() as m:
        m.setattr(blueprint, "delegate", lambda scope, sites: None)
        return dbi.inject(model, recipe)


def _train_step(model: nn.Module, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(X)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


# (model, DropBlocks of paper_generic, plain Sequential children rewritten instead of the top module)
SLOW = pytest.mark.slow  # 15-20 s each on 2 cores: VGG-11 stands for them in the default set
CASES = [("vgg11", 2, ["features"]), pytest.param("mobilenet_v2", 40, ["features"], marks=SLOW),
         pytest.param("shufflenet_v2_x0_5", 40, ["conv5"], marks=SLOW),
         pytest.param("densenet121", 81, ["features"], marks=SLOW)]


@pytest.mark.parametrize(("name", "count", "sequentials"), CASES)
def test_the_top_module_is_untouched_and_runs_the_same_train_step(name, count, sequentials, monkeypatch):
    model = _build(name)
    reference = _root_rewritten(copy.deepcopy(model), "paper_generic", monkeypatch)
    assert isinstance(reference.__dict__.get("forward"), InjectedForward)  # the premise: before, the root ran them
    dbi.inject(model, "paper_generic")
    assert len(dbi.injected_dropblocks(model)) == count
    assert "forward" not in model.__dict__ and "_get_name" not in model.__dict__
    assert sorted(n for n, m in model.named_children() if isinstance(m.__dict__.get("forward"), InjectedForward)) \
        == sequentials
    assert list(model.state_dict()) == list(reference.state_dict())  # the DropBlocks stay where they were
    set_keep(model, 0.7)
    set_keep(reference, 0.7)
    for seed in (1, 2):
        out, grads = _train_step(model, seed)
        ref_out, ref_grads = _train_step(reference, seed)
        assert torch.equal(out, ref_out)  # the same DropBlocks, drawing in the same order
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    model.eval()
    plain = dbi.strip(copy.deepcopy(model)).eval()
    assert torch.equal(model(X), plain(X))


def test_the_whole_model_traces_in_training_mode_with_every_dropblock():
    model = _build("vgg11")
    dbi.inject(model, "paper_generic")
    set_keep(model, 0.7)
    gm = torch.fx.symbolic_trace(model.train())
    assert dropblock_nodes(gm) == 2
    torch.manual_seed(3)
    expected = model(X)
    torch.manual_seed(3)
    assert torch.equal(gm(X), expected)
    eval_gm = torch.fx.symbolic_trace(model.eval())
    assert dropblock_nodes(eval_gm) == 0 and torch.equal(eval_gm(X), model(X))


def test_create_feature_extractor_of_an_injected_mobilenet():
    model = _build("mobilenet_v2")
    dbi.inject(model, "paper_generic")
    extractor = create_feature_extractor(model, {"features.14": "s16", "features": "s32"})
    assert dropblock_nodes(torch.fx.GraphModule(extractor, extractor.train_graph)) == 40
    assert dropblock_nodes(torch.fx.GraphModule(extractor, extractor.eval_graph)) == 0
    extractor.train()
    out = extractor(X)
    (out["s16"].mean() + out["s32"].mean()).backward()
    reference = create_feature_extractor(dbi.strip(copy.deepcopy(model)), {"features": "s32"}).eval()
    assert torch.equal(extractor.eval()(X)["s32"], reference(X)["s32"])


def test_the_sequential_traced_alone_is_refused_in_training_mode():
    model = _build("vgg11")
    dbi.inject(model, "paper_generic")
    with pytest.raises(dbi.SurgeryError, match=r"Sequential\.forward.*'features'.*2 DropBlock.*held by.*VGG"):
        torch.fx.symbolic_trace(model.features.train())
    assert torch.equal(torch.fx.symbolic_trace(model.features.eval())(X), model.features(X))


def test_strip_leaves_the_modules_as_they_were():
    model = _build("densenet121")
    before = {name: dict(m.__dict__) for name, m in model.named_modules()}
    dbi.inject(model, "paper_generic")
    assert model.__dict__.keys() - before[""].keys() == set()  # the container is a child, not an attribute
    assert "dropblocks" in model._modules and "dropblocks" not in model.features._modules
    with pytest.raises(dbi.SurgeryError, match="already injected .it holds the DropBlock '[\w.]+dropblocks\."):
        dbi.inject(model, "paper_generic")
    dbi.strip(model)
    after = dict(model.named_modules())
    assert after.keys() == before.keys()
    for name, attrs in before.items():
        now = after[name].__dict__
        assert now.keys() == attrs.keys() and all(now[k] is v or k in ("_modules",) for k, v in attrs.items())
    assert not dbi.injected_dropblocks(model)


def test_copies_and_pickles_reach_their_own_dropblocks():
    model = _build("vgg11")
    dbi.inject(model, "paper_generic")
    keep = [db.keep_prob for db in dbi.injected_dropblocks(model)]
    for twin in (copy.deepcopy(model), reload(model)):
        assert twin.features.forward.holder is twin
        set_keep(twin, 0.5)
        assert [db.keep_prob for db in dbi.injected_dropblocks(model)] == keep != [0.5, 0.5]
        torch.manual_seed(4)
        y = twin.train()(X)
        calls = []
        hooks = [db.register_forward_hook(lambda m, i, o: calls.append(m)) for db in dbi.injected_dropblocks(twin)]
        torch.manual_seed(4)
        assert torch.equal(twin(X), y)
        for h in hooks:
            h.remove()
        assert len(calls) == 2 and set(map(id, calls)) == set(map(id, dbi.injected_dropblocks(twin)))
        dbi.strip(twin)
        assert not dbi.injected_dropblocks(twin) and "forward" not in twin.features.__dict__


def test_compiles_as_one_graph():
    model = _build("vgg11")
    dbi.inject(model, "paper_generic")
    set_keep(model, 0.7)
    compiled = torch.compile(model.train(), backend="aot_eager", fullgraph=True)
    compiled(X).mean().backward()
    assert model.features[0].weight.grad is not None


def test_in_place_only_while_no_hook_sees_the_producer():
    model = _build("mobilenet_v2")
    dbi.inject(model, "paper_generic")
    set_keep(model, 0.5)
    model.train()
    model(X)
    inplace = [db for db in dbi.injected_dropblocks(model) if db.inplace and db.point.module == ""]
    assert inplace  # the premise: the Sequential's DropBlocks after a BatchNorm work in place
    producer = model.features[18][1]  # the last conv-norm unit's BatchNorm, which a DropBlock follows
    seen = []
    producer.register_forward_hook(lambda m, i, o: seen.append((o, o.clone())))
    model(X)
    out, at_hook = seen[0]
    assert torch.equal(out, at_hook)  # the hook's tensor was not dropped afterwards


class _Loop(nn.Module):
    """A top module that runs its Sequential's layers itself (as feature extractors do)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        for layer in self.features:
            x = layer(x)
        return x


class _Checkpointed(_Loop):
    """A top module that checkpoints its Sequential layer by layer while ``grad_checkpointing`` (timm style)."""

    grad_checkpointing = False

    def forward(self, x):
        return checkpoint_seq(self.features, x) if self.grad_checkpointing else self.features(x)


class _Residual(_Loop):
    """A residual addition in the top module's own code: its shortcut point cannot move into the Sequential."""

    def forward(self, x):
        return self.features(x) + nn.functional.avg_pool2d(x.mean(1, keepdim=True), 4)


class _Optional(_Loop):
    """A top module with an optional argument: its graph is specialised to ``scale=None`` (another call pattern
    runs the original code, with a warning), so the Sequential is not handed points the other pattern may skip."""

    def forward(self, x, scale=None):
        y = self.features(x)
        return y if scale is None else y * scale


RECIPE = {"rules": [{"modules": ["features"], "after": ["norm"], "shortcut": True}]}
ALL = {"rules": [{"after": ["norm"], "shortcut": True}]}


@pytest.mark.parametrize("cls", [_Loop, _Checkpointed, _Residual, _Optional])
def test_the_top_module_keeps_points_its_sequentials_would_not_run(cls):
    model = cls()
    dbi.inject(model, ALL)
    assert isinstance(model.__dict__.get("forward"), InjectedForward)  # not delegated
    assert "forward" not in model.features.__dict__
    count = len(dbi.injected_dropblocks(model))
    assert count == (3 if cls is _Residual else 2)
    with pytest.raises(dbi.SurgeryError, match=rf"{cls.__name__}\.forward.*'<root>'.*its {count} DropBlock"):
        torch.fx.symbolic_trace(model.train())  # they are in the top module's own graph, not in its class forward
    assert dropblock_nodes(torch.fx.symbolic_trace(model.eval())) == 0


def test_a_container_cannot_hold_dropblocks_and_says_so():
    # a Sequential's forward runs every child: a DropBlock container among them would run in eval too
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU()),
                          nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
    before = {name: dict(m.__dict__) for name, m in model.named_modules()}
    with pytest.raises(dbi.SurgeryError, match=r"module '<root>'.*Sequential.*module of your own"):
        dbi.inject(model, ALL)
    assert {name: dict(m.__dict__) for name, m in model.named_modules()} == before
    assert model.eval()(X).shape == (2, 8, 16, 16)
