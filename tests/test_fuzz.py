"""Property-based: arbitrary YAML documents and Python values at ``load_recipe`` and the public API.

Whatever comes in, only the documented errors come out (``RecipeError``, ``TypeError``, ``ValueError``; and
``SurgeryError`` where a well-formed call asks for a rewrite the model cannot take), quickly, with a short
message, and the model is left exactly as it was.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import dropblock_inject as dbi
from dropblock_inject import KeepProbScheduler, RecipeError, SurgeryError, load_recipe

from _models import SmallResNet, same_state, state_copy

SECONDS = 2.0  # per call; every call here takes milliseconds when it behaves
MESSAGE = 1000  # characters
_SETTINGS = settings(deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.function_scoped_fixture])

_KEYS = ["rules", "dropblock", "schedule", "description", "name", "modules", "after", "stride", "shortcut",
         "block_size", "keep_prob", "per_channel", "drop_rate_scale", "types", "start_keep_prob",
         "ramp_fraction", "optional", "<<", "junk"]
_HUGE = st.one_of(st.sampled_from([2**63, 2**31, float("inf"), float("nan"), 1e308, -0.0]),
                  st.builds(lambda sign, digits: sign * 10**digits, st.sampled_from([1, -1]), st.integers(300, 4000)))
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), _HUGE, st.floats(), st.text(max_size=12),
                     st.sampled_from(["layer4.*", "layer3.*", "norm", "conv", "any", "**"]),
                     st.integers(1000, 100_000).map(lambda n: "x" * n))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner),
    st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.text(max_size=6)), inner, max_size=5)), max_leaves=16)


def _check(call, allowed: tuple[type[BaseException], ...]):
    """Run ``call``: returns its value, or None after an allowed error that was quick and short."""
    start = time.perf_counter()
    try:
        value = call()
        event("returned")
        return value
    except allowed as e:
        event(type(e).__name__)
        message = str(e)
        assert len(message) <= MESSAGE, (type(e).__name__, len(message), message[:300])
        return None
    finally:
        assert time.perf_counter() - start < SECONDS


# ----------------------------------------------------------------------------------------------------------
# YAML documents at load_recipe


_YAML_CHARS = st.sampled_from(list("[]{}:,-&*!|>'\"#%@`?<= \n\t\\") + list("abrulesmod0123456789.") +
                              ["rules:", "modules:", "&a ", "*a", "<<: *a", "!!str ", "!!python/object:os.system",
                               "\ufeff", "\x00", "é", "\U0001f600", "---\n", "...\n", "  - "])


@st.composite
def _aliases(draw) -> str:
    """A document that grows through anchors and aliases, from harmless to a billion laughs."""
    levels = draw(st.integers(1, 10))
    width = draw(st.integers(1, 12))
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        refs = [f"*a{draw(st.integers(0, i - 1))}" for _ in range(width)]
        lines.append(f"a{i}: &a{i} [{', '.join(refs)}]")
    key = draw(st.sampled_from(["rules", "description", "dropblock: {block_size", "name"]))
    body = f"{key}: *a{levels - 1}" + ("}" if "{" in key else "")
    return "\n".join(lines) + "\n" + body + "\nrules: [{modules: [layer4.*]}]\n" * (key != "rules")


_DOCUMENTS = st.one_of(
    st.lists(_YAML_CHARS, max_size=60).map("".join),
    _VALUES.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
    st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=5).map(lambda v: yaml.safe_dump(v)),
    _aliases(),
    st.integers(1, 3000).map(lambda n: "rules: " + "[" * n + "]" * n),
    st.tuples(st.sampled_from(_KEYS), st.integers(2, 4)).map(
        lambda kn: "".join(f"{kn[0]}: [{{modules: [layer4.*]}}]\n" for _ in range(kn[1]))),
)


@settings(_SETTINGS, max_examples=250)
@given(text=_DOCUMENTS, encoding=st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16", "utf-32", "latin-1"]))
def test_any_yaml_document_gives_a_recipe_or_a_short_recipe_error(text, encoding):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        try:
            path.write_bytes(text.encode(encoding))
        except UnicodeEncodeError:
            path.write_bytes(text.encode("utf-8", "surrogatepass"))
        recipe = _check(lambda: load_recipe(path), (RecipeError,))
    assert recipe is None or isinstance(recipe, dbi.Recipe)


# ----------------------------------------------------------------------------------------------------------
# Python values at the public API


_MODEL = SmallResNet((("layer1", (1,)), ("layer2", (2,)), ("layer3", (2,)), ("layer4", (2,))))
_STATE = state_copy(_MODEL)
_MODULES = [(n, type(m)) for n, m in _MODEL.named_modules()]
_X = torch.randn(1, 3, 32, 32)
_GOOD = {"dropblock": {"block_size": 3}, "rules": [{"modules": ["layer4.*"], "after": ["norm"], "shortcut": True}]}

_ANY = st.one_of(_VALUES, st.sampled_from([_X, torch.zeros(()), torch.zeros(0, 3), _MODEL, SmallResNet, len,
                                           object(), b"\xff", Path("/"), "resnet50_paper", _GOOD]))
_RECIPES = st.one_of(_ANY, st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=5),
                     st.builds(lambda rule: {"rules": [rule]},
                               st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=5)))


@pytest.fixture(scope="module", autouse=True)
def _warm():
    """The first call imports what surgery needs lazily (torch._dynamo, to see through compiled wrappers):
    seconds that are not the call's own."""
    assert dbi.plan(_MODEL, _GOOD, example_input=_X)


def _or_any(*plausible):
    return st.one_of(st.sampled_from(plausible), _VALUES)


_RULES = st.fixed_dictionaries({}, optional={
    "name": _or_any("g4", "g3"),
    "modules": _or_any(["layer4.*"], ["layer3.*", "layer4.*"], ["**"], ["layer4"], ["fc"], ["layer9.*"], "layer4.0"),
    "types": _or_any(["BasicBlock"], ["Conv2d"], ["Nope"]),
    "stride": _or_any([16, 32], 32, [8], [64]),
    "after": _or_any(["norm"], ["conv", "act"], ["any"], ["unit"], []),
    "shortcut": _or_any(True, False),
    "block_size": _or_any(1, 3, 7, 2**31 - 1),
    "keep_prob": _or_any(0.0, 0.5, 1.0),
    "drop_rate_scale": _or_any(0.0, 0.25, 4.0),
    "per_channel": _or_any(True, False),
    "optional": _or_any(True, False),
})
_WELL_FORMED = st.fixed_dictionaries({"rules": st.lists(_RULES, min_size=1, max_size=3)}, optional={
    "dropblock": st.fixed_dictionaries({}, optional={"block_size": _or_any(3, 5), "keep_prob": _or_any(0.9, 0.0)}),
    "schedule": st.fixed_dictionaries({}, optional={"start_keep_prob": _or_any(1.0, 0.5),
                                                    "ramp_fraction": _or_any(1.0, 0.1)}),
})


@settings(_SETTINGS, max_examples=120)
@given(fn=st.sampled_from(["inject", "plan"]), recipe=_WELL_FORMED, example=st.booleans())
def test_inject_and_plan_take_any_recipe_and_change_nothing_on_error(fn, recipe, example):
    try:
        _check(lambda: getattr(dbi, fn)(_MODEL, recipe, example_input=_X if example else None),
               (RecipeError, TypeError, ValueError, SurgeryError))
    finally:
        dbi.strip(_MODEL)
    _unchanged()


def _unchanged() -> None:
    assert same_state(_MODEL, _STATE)
    assert [(n, type(m)) for n, m in _MODEL.named_modules()] == _MODULES
    assert not dbi.injected_dropblocks(_MODEL)
    assert all("forward" not in m.__dict__ for m in _MODEL.modules())


@settings(_SETTINGS, max_examples=120)
@given(recipe=_RECIPES)
def test_load_recipe_takes_any_value(recipe):
    _check(lambda: load_recipe(recipe), (RecipeError, TypeError))


@settings(_SETTINGS, max_examples=120)
@given(fn=st.sampled_from(["inject", "plan"]), model=st.one_of(st.just(_MODEL), _ANY), recipe=_RECIPES,
       example_input=st.one_of(st.none(), st.just(_X), _ANY))
def test_inject_and_plan_take_any_values_and_change_nothing_on_error(fn, model, recipe, example_input):
    try:
        done = _check(lambda: getattr(dbi, fn)(model, recipe, example_input=example_input),
                      (RecipeError, TypeError, ValueError, SurgeryError))
        if done is not None and fn == "inject":
            assert dbi.injected_dropblocks(_MODEL)
    finally:
        dbi.strip(_MODEL)
    _unchanged()


@pytest.fixture(scope="module")
def injected():
    model = dbi.inject(SmallResNet((("layer1", (1,)), ("layer2", (2,)), ("layer3", (2,)), ("layer4", (2,)))), _GOOD)
    sched = KeepProbScheduler(model, total_steps=100)
    return model, sched


@settings(_SETTINGS, max_examples=120)
@given(total_steps=_ANY, target=_ANY, step=_ANY, state=_ANY)
def test_scheduler_takes_any_values(injected, total_steps, target, step, state):
    model, sched = injected
    sched.step(7)
    before = (sched.state_dict(), [db.keep_prob for db in sched.dropblocks])
    _check(lambda: KeepProbScheduler(model, total_steps, target=target), (TypeError, ValueError))
    _check(lambda: sched.load_state_dict(state), (TypeError, ValueError))
    if (sched.state_dict(), [db.keep_prob for db in sched.dropblocks]) != before:  # a valid state was loaded
        assert isinstance(state, dict)
        sched.load_state_dict(before[0])
    value = _check(lambda: sched.step(step), (TypeError, ValueError))
    assert value is None or (math.isfinite(value) and 0.0 <= value <= 1.0)
    _check(lambda: dbi.strip(step), (TypeError,))
