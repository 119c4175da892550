"""Rewritten scopes return exactly the type their original forward returned (``surgery.s18_trace`` flattens a
structured output, ``surgery.s26_forward`` rebuilds it): NamedTuples, dataclasses, OrderedDict subclasses such as
Hugging Face's ``ModelOutput``, dicts, tuples and lists."""

import copy

import pytest
import torch
import transformers
from _models import OUTPUT_TYPES, StructuredBlock, X, reload, set_keep
from torch import nn

import dropblock_inject as dbi

FEATURES = torch.randn(2, 8, 16, 16)


def _same(a, b):
    """Same types all the way down, and equal tensors."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    if hasattr(a, "__dataclass_fields__"):
        return all(_same(getattr(a, k), getattr(b, k)) for k in a.__dataclass_fields__)
    return a == b


@pytest.mark.parametrize("kind", OUTPUT_TYPES)
def test_train_output_keeps_its_type(kind):
    model = nn.Sequential(StructuredBlock(kind))
    dbi.inject(model, {"rules": [{"modules": ["0"], "after": ["norm"], "shortcut": True}]})
    twin = dbi.strip(copy.deepcopy(model))
    assert _same(model.eval()(FEATURES), twin.eval()(FEATURES))
    set_keep(model, 1.0)
    torch.manual_seed(0)
    out = model.train()(FEATURES)
    torch.manual_seed(0)
    assert _same(out, twin.train()(FEATURES))
    set_keep(model, 0.5)
    dropped = model(FEATURES)
    assert type(dropped) is type(out) and not _same(dropped, out)  # the DropBlocks ran
    assert type(reload(model).train()(FEATURES)) is type(out)  # the structure survives torch.save / load


HF = {
    "efficientnet": lambda: transformers.EfficientNetForImageClassification(transformers.EfficientNetConfig(
        image_size=64, width_coefficient=0.25, depth_coefficient=0.3, hidden_dim=320, num_labels=4)),
    "convnext": lambda: transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
        hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1], num_labels=4)),
    "resnet": lambda: transformers.ResNetForImageClassification(transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1], num_labels=4)),
    "regnet": lambda: transformers.RegNetForImageClassification(transformers.RegNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1], groups_width=8, num_labels=4)),
}


@pytest.mark.parametrize("name", HF)
def test_hugging_face_models_inject_train_and_strip(name):
    """Built from small configs (no download): every scope returns the ModelOutput its code builds, so the
    model's own ``encoder_outputs[0]`` / ``.last_hidden_state`` keep working in training mode."""
    torch.manual_seed(0)
    model = HF[name]().eval()
    ref = model(X)
    state = copy.deepcopy(model.state_dict())
    dbi.inject(model, "paper_generic", example_input=X[:1])
    scopes = [m for _, m in dbi.surgery.s26_forward.injected_modules(model)]
    assert scopes
    if name == "efficientnet":  # its encoder owns the head conv: a scope returning a ModelOutput
        assert model.efficientnet.encoder in scopes
    assert torch.equal(model(X).logits, ref.logits)  # eval: the original code, bit for bit
    model.train()
    set_keep(model, 0.8)
    out = model(X, labels=torch.tensor([0, 1]))
    assert type(out) is type(ref) and out.loss is not None
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if name == "efficientnet":
        hidden = model.efficientnet.embeddings(X)
        assert type(model.efficientnet.encoder(hidden)) is transformers.modeling_outputs.BaseModelOutputWithNoAttention
    dbi.strip(model)
    assert not list(dbi.surgery.s26_forward.injected_modules(model))
    model.load_state_dict(state)
    assert torch.equal(model.eval()(X).logits, ref.logits)
