"""The injected model stays traceable as a whole (``surgery.s26_forward`` called with Proxies, under an outer
tracer): ``torch.fx.symbolic_trace``, torchvision's ``create_feature_extractor`` (train and eval graphs) and
timm's FX feature models see each DropBlock as one node, in training mode only. A rewritten module traced as
fx's root in training mode (fx would trace its class's forward, without its own DropBlocks) is refused with a
``SurgeryError``; torch.export, which calls the installed forward, records them."""

import copy
import inspect

import pytest
import timm
import torch
import torchvision
from _models import X, dropblock_nodes, set_keep
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import dropblock_inject as dbi


def _op_is_fx_visible() -> bool:
    """Whether the DropBlock op records itself as one fx node (the op side of issue 16, item 6)."""
    try:
        torch.fx.symbolic_trace(nn.Sequential(dbi.DropBlock2d(3, 0.9)).train())
    except TypeError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _op_is_fx_visible(), reason="the DropBlock op is not fx-visible in this tree")


def _injected_resnet():
    model = torchvision.models.resnet18()
    dbi.inject(model, "resnet50_paper")
    set_keep(model, 0.7)
    return model


def test_symbolic_trace_of_the_injected_model():
    model = _injected_resnet().train()
    gm = torch.fx.symbolic_trace(model)
    assert dropblock_nodes(gm) == 12
    torch.manual_seed(3)
    expected = model(X)
    torch.manual_seed(3)
    assert torch.equal(gm(X), expected)  # the same masks: the same ops in the same order
    eval_gm = torch.fx.symbolic_trace(model.eval())
    assert dropblock_nodes(eval_gm) == 0 and torch.equal(eval_gm(X), model(X))


def test_create_feature_extractor_train_and_eval_graphs():
    model = _injected_resnet()
    extractor = create_feature_extractor(model, {"layer3": "l3", "layer4": "l4"})
    assert dropblock_nodes(extractor.train_graph_module if hasattr(extractor, "train_graph_module") else
                            torch.fx.GraphModule(extractor, extractor.train_graph)) == 12
    assert dropblock_nodes(torch.fx.GraphModule(extractor, extractor.eval_graph)) == 0
    feats = {}
    hook = model.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("l4", o))
    model.train()
    torch.manual_seed(5)
    model(X)
    hook.remove()
    extractor.train()
    torch.manual_seed(5)
    out = extractor(X)
    assert torch.equal(out["l4"], feats["l4"])
    plain = dbi.strip(copy.deepcopy(model)).eval()
    reference = create_feature_extractor(plain, {"layer4": "l4"}).eval()(X)["l4"]
    assert torch.equal(extractor.eval()(X)["l4"], reference)  # eval: the original code


def test_timm_fx_feature_model_of_an_injected_model():
    from timm.models._features_fx import FeatureGraphNet

    model = timm.create_model("resnet18", pretrained=False)
    dbi.inject(model, "resnet50_paper")
    set_keep(model, 0.7)
    features = FeatureGraphNet(model, out_indices=(3, 4)).train()
    assert dropblock_nodes(features.graph_module) == 12
    out = features(X)
    assert [tuple(t.shape) for t in out] == [(2, 256, 4, 4), (2, 512, 2, 2)]
    out[-1].sum().backward()
    features.eval()
    plain = FeatureGraphNet(dbi.strip(copy.deepcopy(model)), out_indices=(3, 4)).eval()
    assert all(torch.equal(a, b) for a, b in zip(features(X), plain(X)))


def _injected_efficientnet():
    """timm EfficientNet-B0 with ``paper_generic``: one point (after ``bn2``, the head) in the top module's own
    code, 39 in its blocks."""
    model = timm.create_model("efficientnet_b0", pretrained=False)
    dbi.inject(model, "paper_generic")
    return model


ROOT_REFUSED = r"EfficientNet\.forward.*'<root>'.*1 DropBlock\(s\) \(after bn2\) would be missing.*eval mode"


def test_fx_trace_of_a_rewritten_top_module_in_training_mode_is_refused():
    # fx traces type(model).forward, not the instance forward inject installed on the top module: its DropBlock
    # after bn2 would be missing from the train graph, so every root trace in training mode is refused
    from timm.models._features_fx import FeatureGraphNet

    model = _injected_efficientnet()
    set_keep(model, 0.7)
    before = dict(model.__dict__)
    tracer = torch.fx.Tracer()
    with pytest.raises(dbi.SurgeryError, match=ROOT_REFUSED):
        tracer.trace(model.train())
    assert "create_args_for_root" not in tracer.__dict__  # no patch of the tracer, not even a passing one
    with pytest.raises(dbi.SurgeryError, match=ROOT_REFUSED):
        torch.fx.symbolic_trace(model)
    for extractor in (lambda m: create_feature_extractor(m, {"blocks.5": "f", "bn2": "head"}),  # traces train
                      lambda m: FeatureGraphNet(m, out_indices=(3, 4))):                          # and eval
        with pytest.raises(dbi.SurgeryError, match=ROOT_REFUSED + r".*create_feature_extractor\(dbi\.strip"):
            extractor(model.eval())
    assert model.__dict__.keys() == before.keys() and all(model.__dict__[k] is v for k, v in before.items())
    assert repr(model.train()).startswith("EfficientNet(\n")  # outside a trace, _get_name gives the name
    model.eval()  # the eval graph is the original code, exact
    gm = torch.fx.symbolic_trace(model)
    stripped = dbi.strip(copy.deepcopy(model))
    assert dropblock_nodes(gm) == 0 and torch.equal(gm(X), stripped(X))
    assert dropblock_nodes(torch.fx.symbolic_trace(model.blocks.train())) == 39  # their installed forwards, traced


def test_a_rewritten_block_traced_as_the_root_in_training_mode_is_refused():
    model = _injected_resnet().train()
    block = model.layer3[0]
    with pytest.raises(dbi.SurgeryError, match=r"BasicBlock\.forward.*'layer3\.0'.*3 DropBlock\(s\) \(after bn1, "
                                               r"after bn2, shortcut of downsample_1\).*trace a module that contains it"):
        torch.fx.symbolic_trace(block)
    gm = torch.fx.symbolic_trace(model.layer3)  # a plain Sequential: its blocks' installed forwards are traced
    assert dropblock_nodes(gm) == 6
    x = torch.randn(2, 128, 8, 8)
    torch.manual_seed(1)
    expected = model.layer3(x)
    torch.manual_seed(1)
    assert torch.equal(gm(x), expected)
    eval_gm = torch.fx.symbolic_trace(block.eval())
    assert dropblock_nodes(eval_gm) == 0 and torch.equal(eval_gm(x), block(x))


def test_strip_restores_an_instance_get_name_and_the_fx_first_route_works():
    model = timm.create_model("efficientnet_b0", pretrained=False)
    named = lambda: "MyNet"  # noqa: E731 - an instance-level _get_name of the user's
    model._get_name = named
    dbi.inject(model, "paper_generic")
    assert repr(model).startswith("MyNet(")
    with pytest.raises(dbi.SurgeryError, match=ROOT_REFUSED):
        torch.fx.symbolic_trace(model.train())
    dbi.strip(model)
    assert model.__dict__["_get_name"] is named
    del model._get_name
    # the route the refusal names: build the fx module first, inject into it
    features = create_feature_extractor(model, {"bn2": "head"})
    dbi.inject(features, "paper_generic")
    assert dbi.injected_dropblocks(features)
    features.train()
    features(X)["head"].sum().backward()
    features.eval()
    assert torch.equal(features(X)["head"], create_feature_extractor(model, {"bn2": "head"}).eval()(X)["head"])


def test_torch_export_of_a_rewritten_top_module_holds_its_dropblocks():
    # torch.export calls the module, so the installed forward runs; it reads that forward's signature (to bind
    # the example arguments) and code object, which are the original forward's
    model = _injected_efficientnet()
    set_keep(model, 0.7)
    assert list(inspect.signature(model.forward).parameters) == ["x"]
    assert model.forward.__code__ is type(model).forward.__code__
    program = torch.export.export(model.train(), (X,))
    assert sum("drop_block" in str(n.target) for n in program.graph.nodes) == 40
    torch.manual_seed(6)
    expected = model(X)
    torch.manual_seed(6)
    assert torch.equal(program.module()(X), expected)
    program = torch.export.export(model.eval(), (X,))
    assert not any("drop_block" in str(n.target) for n in program.graph.nodes)
    assert torch.equal(program.module()(X), model(X))


def test_fx_and_compiled_graphs_draw_the_eager_masks():
    """ResNet-50 with paper_generic at 64 px has per-channel masks on maps larger than the block (the sparse
    kernel): the fx graph and a compiled model (which call the registered op) drop the same blocks as eager
    under the same seed."""
    model = torchvision.models.resnet50()
    dbi.inject(model, "paper_generic")
    set_keep(model, 0.7)
    model.train()
    gm = torch.fx.symbolic_trace(model)
    compiled = torch.compile(model, backend="aot_eager")
    torch.manual_seed(11)
    expected = model(X)
    for graph in (gm, compiled):
        torch.manual_seed(11)
        assert torch.equal(graph(X), expected)
