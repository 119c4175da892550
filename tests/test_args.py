"""Argument checks of the public entry points: the argument named, what it expects, the value quoted briefly."""

import time

import pytest
import torch
from torch import nn

import dropblock_inject as dbi
from dropblock_inject._args import check_bool, check_example_input, check_model, quote

from _models import SmallResNet, same_state, state_copy

RECIPE = {"dropblock": {"block_size": 3}, "rules": [{"modules": ["layer4.*"], "after": ["norm"], "shortcut": True}]}


def tiny() -> SmallResNet:
    return SmallResNet((("layer1", (1,)), ("layer2", (2,)), ("layer3", (2,)), ("layer4", (2,))))


def _shared(depth: int):
    value: list = ["lol"] * 9
    for _ in range(depth):
        value = [value] * 9
    return value


@pytest.mark.parametrize("value", ["x" * 10_000_000, list(range(1_000_000)), 10**5000, -(10**100_000),
                                   _shared(9), {str(i): i for i in range(100_000)}, b"\xff" * 1_000_000],
                         ids=["str", "list", "int", "negative-int", "shared", "dict", "bytes"])
def test_quote_is_short_and_fast(value):
    start = time.perf_counter()
    text = quote(value)
    assert time.perf_counter() - start < 0.5
    assert 0 < len(text) <= 200


def test_quote_survives_a_broken_repr():
    class Broken:
        def __repr__(self):
            raise RuntimeError("boom")

    assert "Broken" in quote(Broken())
    assert quote(0.5) == "0.5" and quote("ab") == "'ab'"


@pytest.mark.parametrize("value, hint", [
    (None, "NoneType"),
    ("resnet50_paper", "the model comes first: inject(model, recipe)"),
    (SmallResNet, "pass an instance"),
    (tiny, "it is a function"),
    (torch.zeros(1), "Tensor"),
])
def test_check_model(value, hint):
    with pytest.raises(TypeError, match=r"inject\(\): model must be a torch.nn.Module") as info:
        check_model(value, "inject")
    assert hint in str(info.value)


@pytest.mark.parametrize("value", ["x", 3, 2.5, ["a", 1], {"x": "y"}, (None,), b"img"])
def test_check_example_input_refuses_values_without_tensors(value):
    with pytest.raises(TypeError, match=r"plan\(\): example_input must be None, a Tensor"):
        check_example_input(value, "plan")


@pytest.mark.parametrize("value", [None, torch.zeros(1, 3, 8, 8), (torch.zeros(1, 3, 8, 8), 2),
                                   [torch.zeros(3, 8, 8)], {"pixel_values": torch.zeros(1, 3, 8, 8)}, object()])
def test_check_example_input_accepts_what_a_model_may_take(value):
    assert check_example_input(value, "plan") is value


def test_check_bool():
    assert check_bool(False, "flag") is False
    for value in ("no", 0, None):
        with pytest.raises(TypeError, match="flag must be True or False"):
            check_bool(value, "flag")


@pytest.mark.parametrize("call, error, match", [
    (lambda m: dbi.inject(None, RECIPE), TypeError, r"inject\(\): model must be a torch.nn.Module.*None"),
    (lambda m: dbi.plan("x", RECIPE), TypeError, r"plan\(\): model must be a torch.nn.Module.*'x'"),
    (lambda m: dbi.strip(None), TypeError, r"strip\(\): model must be a torch.nn.Module"),
    (lambda m: dbi.inject(RECIPE, m), TypeError, "the model comes first"),
    (lambda m: dbi.inject(m, RECIPE, example_input="x"), TypeError, r"inject\(\): example_input"),
    (lambda m: dbi.plan(m, RECIPE, example_input=3), TypeError, r"plan\(\): example_input"),
    (lambda m: dbi.inject(m, 42), TypeError, r"load_recipe\(\): recipe must be"),
    (lambda m: dbi.inject(m, None), TypeError, r"recipe must be"),
    (lambda m: dbi.inject(m, {"rules": [{"modules": ["layer4.*"], "keep_prob": 10**500}]}), dbi.RecipeError,
     "digits"),
])
def test_entry_points_check_arguments_first_and_change_nothing(call, error, match):
    model = tiny()
    state = state_copy(model)
    modules = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(error, match=match) as info:
        call(model)
    assert len(str(info.value)) < 400
    assert same_state(model, state) and [(n, type(m)) for n, m in model.named_modules()] == modules
    assert not dbi.injected_dropblocks(model) and "forward" not in model.__dict__


def test_lightning_callback_checks_its_arguments():
    pytest.importorskip("lightning")
    from dropblock_inject.integrations.lightning import DropBlockScheduleCallback

    with pytest.raises(TypeError, match="DropBlockScheduleCallback: strip_on_fit_end must be True or False"):
        DropBlockScheduleCallback(strip_on_fit_end="no")
    with pytest.raises(ValueError, match="DropBlockScheduleCallback: total_steps"):
        DropBlockScheduleCallback(total_steps=10**400)
    with pytest.raises(ValueError, match="DropBlockScheduleCallback: target"):
        DropBlockScheduleCallback(target=10**500)
    cb = DropBlockScheduleCallback()
    with pytest.raises(TypeError, match=r"DropBlockScheduleCallback.load_state_dict\(\): state_dict must be"):
        cb.load_state_dict(None)
    with pytest.raises(ValueError, match="missing"):  # checked when restored, not when fitting starts
        cb.load_state_dict({"total_steps": 10})
    cb.load_state_dict({})  # a checkpoint saved before fitting started
    cb.load_state_dict({"version": 1, "total_steps": 10, "target": None, "last_step": 3})
    assert cb.state_dict()["last_step"] == 3


def test_transformers_callback_checks_its_arguments():
    pytest.importorskip("transformers")
    from dropblock_inject.integrations.transformers import DropBlockScheduleCallback

    with pytest.raises(TypeError, match="DropBlockScheduleCallback: strip_on_train_end must be True or False"):
        DropBlockScheduleCallback(strip_on_train_end="yes")
    with pytest.raises(ValueError, match="DropBlockScheduleCallback: total_steps"):
        DropBlockScheduleCallback(total_steps=10**400)
    with pytest.raises(ValueError, match="DropBlockScheduleCallback: target"):
        DropBlockScheduleCallback(target=-(10**500))
