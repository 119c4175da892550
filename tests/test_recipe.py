"""Recipe loading and validation."""

import copy
import time
import warnings

import pytest
import torch
import torchvision
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import dropblock_inject as dbi
from dropblock_inject.recipe import (DropBlockConfig, Recipe, RecipeError, Rule, ScheduleConfig, available_recipes,
                                     load_recipe)

MINIMAL = {"rules": [{"modules": ["layer4.*"], "after": ["norm"], "shortcut": True}]}


def test_shipped_recipes_load():
    names = available_recipes()
    for required in ("resnet50_paper", "paper_generic", "retinanet_resnet50_fpn", "resnet_paper"):
        assert required in names
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.rules and recipe.description


def test_resnet50_paper_values():
    r = load_recipe("resnet50_paper")
    assert r.dropblock.block_size == 7 and r.dropblock.keep_prob == 0.9
    by_name = {rule.name: rule for rule in r.rules}
    assert r.keep_prob(by_name["group4"]) == pytest.approx(0.9)
    assert r.keep_prob(by_name["group3"]) == pytest.approx(0.975)


def test_name_path_dict_and_recipe_forms(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    from_path = load_recipe(path)
    from_str_path = load_recipe(str(path))
    from_dict = load_recipe(MINIMAL)
    assert from_path.rules == from_dict.rules == from_str_path.rules
    assert load_recipe(from_dict) is from_dict
    assert load_recipe(load_recipe("resnet50_paper").to_dict()).rules == load_recipe("resnet50_paper").rules


def test_unknown_name_lists_known():
    with pytest.raises(RecipeError, match="unknown recipe 'nope'.*resnet50_paper"):
        load_recipe("nope")


@pytest.mark.parametrize(
    "doc, key",
    [
        ({"rules": []}, "rules"),
        ({}, "rules"),
        ({"rules": [{"modules": ["a"], "bogus": 1}]}, "rules[0].bogus"),
        ({"rules": [{"modules": ["a"]}], "dropblock": {"keep_prob": 1.5}}, "dropblock.keep_prob"),
        ({"rules": [{"modules": ["a"]}], "dropblock": {"block_size": 0}}, "dropblock.block_size"),
        ({"rules": [{"modules": ["a"]}], "dropblock": {"block_size": True}}, "dropblock.block_size"),
        ({"rules": [{"modules": ["a"], "after": ["bn"]}]}, "rules[0].after[0]"),
        ({"rules": [{"modules": 3}]}, "rules[0].modules"),
        ({"rules": [{"modules": ["a"], "stride": ["x"]}]}, "rules[0].stride[0]"),
        ({"rules": [{"modules": ["a"], "keep_prob": 0.9, "drop_rate_scale": 0.5}]}, "rules[0].drop_rate_scale"),
        ({"rules": [{"modules": ["a"], "shortcut": "yes"}]}, "rules[0].shortcut"),
        ({"rules": [{"modules": ["a"]}], "schedule": {"ramp_fraction": 0}}, "schedule.ramp_fraction"),
        ({"rules": [{"modules": ["a"]}], "extra": 1}, "extra"),
        ({"rules": [{"name": "a", "modules": ["x"]}, {"name": "a", "modules": ["y"]}]}, "rules[1].name"),
        ({"rules": [{"modules": ["a"], "drop_rate_scale": 4}], "dropblock": {"keep_prob": 0.7}},
         "rules[0].drop_rate_scale"),
    ],
)
def test_bad_values_name_the_key(doc, key):
    with pytest.raises(RecipeError) as info:
        load_recipe(doc)
    assert f"'{key}'" in str(info.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_rule_matching_nothing_names_rule_and_leaves_model():
    model = torchvision.models.resnet18()
    before = copy.deepcopy(model.state_dict())
    modules_before = [n for n, _ in model.named_modules()]
    recipe = {"rules": [{"name": "ok", "modules": ["layer4.*"]}, {"name": "ghost", "modules": ["layer9.*"]}]}
    with pytest.raises(RecipeError, match="rule 'ghost'"):
        dbi.inject(model, recipe)
    assert [n for n, _ in model.named_modules()] == modules_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not dbi.injected_dropblocks(model)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True),
                     st.text(max_size=8))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                       max_leaves=10)
_keys = st.sampled_from(["rules", "dropblock", "schedule", "description", "name", "modules", "after", "stride",
                         "shortcut", "block_size", "keep_prob", "per_channel", "drop_rate_scale", "types",
                         "start_keep_prob", "ramp_fraction", "optional", "junk"])
_docs = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(_keys, inner, max_size=5)), max_leaves=14)

_FUZZ_MODEL = torchvision.models.resnet18()
_FUZZ_STATE = {k: v.clone() for k, v in _FUZZ_MODEL.state_dict().items()}


@settings(max_examples=150, deadline=None)
@given(doc=st.one_of(_docs, st.dictionaries(_keys, _values, max_size=5)))
def test_fuzzed_documents_raise_only_recipe_error(doc):
    try:
        recipe = load_recipe(doc) if isinstance(doc, dict) else load_recipe({"rules": doc})
    except RecipeError:
        return
    assert isinstance(recipe, Recipe)
    try:
        dbi.inject(_FUZZ_MODEL, recipe, example_input=torch.randn(1, 3, 64, 64))
    except (RecipeError, dbi.SurgeryError):
        assert not dbi.injected_dropblocks(_FUZZ_MODEL)
    finally:
        dbi.strip(_FUZZ_MODEL)
    assert all(torch.equal(_FUZZ_STATE[k], v) for k, v in _FUZZ_MODEL.state_dict().items())


def test_wheel_ships_recipes(tmp_path):
    """A non-editable install finds the shipped recipes (they live in top-level recipes/ in the source)."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path / "site")
    code = "import dropblock_inject as d; print(d.__file__); print(','.join(d.available_recipes()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site")},
                         check=True, capture_output=True, text=True).stdout.splitlines()
    assert out[0].startswith(str(tmp_path / "site"))
    assert set(out[1].split(",")) >= {"resnet50_paper", "paper_generic", "retinanet_resnet50_fpn"}


def test_recipe_file_parsed_once_per_version(tmp_path):
    """A shipped or file recipe is parsed once (it is immutable); a changed file is parsed again."""
    assert load_recipe("paper_generic") is load_recipe("paper_generic")
    path = tmp_path / "r.yaml"
    doc = {"name": "r", "dropblock": {"block_size": 7, "keep_prob": 0.9},
           "rules": [{"name": "a", "modules": ["layer3.*"], "after": ["unit"]}]}
    path.write_text(yaml.safe_dump(doc))
    first = load_recipe(path)
    assert load_recipe(path) is first
    doc["dropblock"]["block_size"] = 5
    path.write_text(yaml.safe_dump(doc))
    import os
    os.utime(path, ns=(first_ns := path.stat().st_mtime_ns + 10**9, first_ns))
    assert load_recipe(path).dropblock.block_size == 5


# ----------------------------------------------------------------------------------------------------------
# bounded, fast, and the same for a Recipe built directly


@pytest.mark.parametrize("doc, key", [
    ({"rules": [{"modules": ["a"]}], "dropblock": {"keep_prob": 10**500}}, "dropblock.keep_prob"),
    ({"rules": [{"modules": ["a"], "drop_rate_scale": 10**500}]}, "rules[0].drop_rate_scale"),
    ({"rules": [{"modules": ["a"]}], "schedule": {"start_keep_prob": -10**400}}, "schedule.start_keep_prob"),
    ({"rules": [{"modules": ["a"], "keep_prob": 10**5000}]}, "rules[0].keep_prob"),
    ({"rules": [{"modules": ["a"], "block_size": 10**5000}]}, "rules[0].block_size"),
    ({"rules": [{"modules": ["a"], "stride": [10**400]}]}, "rules[0].stride[0]"),
])
def test_numbers_too_large_for_a_float_are_out_of_range(doc, key):
    with pytest.raises(RecipeError, match=r"digits") as info:
        load_recipe(doc)
    assert f"'{key}'" in str(info.value) and len(str(info.value)) < 300


def _shared(depth: int, width: int = 9):
    """A structure of ``width ** depth`` leaves sharing its lists (what YAML aliases build)."""
    value = ["lol"] * width
    for _ in range(depth):
        value = [value] * width
    return value


@pytest.mark.parametrize("doc", [
    {"rules": [{"modules": ["a"], "after": ["x" * 10_000_000]}]},
    {"rules": [{"modules": ["a"]}], "description": _shared(9)},
    {"rules": [{"modules": ["a"]}], "dropblock": {"block_size": _shared(9)}},
    {"rules": _shared(9)},
    {"rules": [{"modules": ["a"], "x" * 1_000_000: 1}]},
    {"rules": [{"modules": ["a"]}], "name": "n" * 1_000_000},
])
def test_messages_are_bounded_and_fast(doc):
    start = time.perf_counter()
    with pytest.raises(RecipeError) as info:
        load_recipe(doc)
    assert time.perf_counter() - start < 0.5
    assert len(str(info.value)) < 400


def test_validation_is_linear_in_the_number_of_rules():
    def seconds(n: int) -> float:
        doc = {"rules": [{"name": f"r{i}", "modules": [f"layer{i}.*"], "after": ["norm"], "shortcut": True}
                         for i in range(n)]}
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            load_recipe(doc)
            best = min(best, time.perf_counter() - start)
        return best

    t5k, t20k = seconds(5_000), seconds(20_000)
    assert t20k < 8 * t5k, (t5k, t20k)  # linear: ~4x; quadratic: ~16x


_DIRECT = [
    (dict(rules=[]), {"rules": []}),
    (dict(rules=[Rule(name="a", modules=("layer4.*",), keep_prob=1.5)]),
     {"rules": [{"name": "a", "modules": ["layer4.*"], "keep_prob": 1.5}]}),
    (dict(rules=[Rule(name="a", modules=("layer4.*",)), Rule(name="a", modules=("layer3.*",))]),
     {"rules": [{"name": "a", "modules": ["layer4.*"]}, {"name": "a", "modules": ["layer3.*"]}]}),
    (dict(rules=[Rule(name="a", after=(), shortcut=False)]), {"rules": [{"name": "a", "after": []}]}),
    (dict(rules=[Rule(name="a", after=("bn",))]), {"rules": [{"name": "a", "after": ["bn"]}]}),
    (dict(rules=[Rule(name="a", block_size=0)]), {"rules": [{"name": "a", "block_size": 0}]}),
    (dict(rules=[Rule(name="a", keep_prob=0.9, drop_rate_scale=0.5)]),
     {"rules": [{"name": "a", "keep_prob": 0.9, "drop_rate_scale": 0.5}]}),
    (dict(rules=[Rule(name="a")], dropblock=DropBlockConfig(keep_prob=2.0)),
     {"rules": [{"name": "a"}], "dropblock": {"keep_prob": 2.0}}),
    (dict(rules=[Rule(name="a")], schedule=ScheduleConfig(ramp_fraction=0.0)),
     {"rules": [{"name": "a"}], "schedule": {"ramp_fraction": 0.0}}),
    (dict(rules=["layer4.*"]), {"rules": ["layer4.*"]}),
]


@pytest.mark.parametrize("fields, mapping", _DIRECT)
def test_recipe_built_directly_is_validated_like_a_mapping(fields, mapping):
    with pytest.raises(RecipeError) as direct:
        Recipe(name="x", **fields)
    with pytest.raises(RecipeError) as parsed:
        load_recipe({"name": "x", **mapping})
    assert str(direct.value) == str(parsed.value)
    assert "recipe key '" in str(direct.value)


def test_recipe_built_directly_is_normalised():
    r = Recipe(name="mine", rules=[Rule(name="g4", modules=("layer4.*",), shortcut=True)],
               dropblock={"keep_prob": 0.8}, schedule={"ramp_fraction": 0.5})
    assert isinstance(r.rules, tuple) and r.dropblock == DropBlockConfig(keep_prob=0.8)
    assert r.schedule == ScheduleConfig(ramp_fraction=0.5)
    assert r == load_recipe({"name": "mine", "dropblock": {"keep_prob": 0.8}, "schedule": {"ramp_fraction": 0.5},
                             "rules": [{"name": "g4", "modules": ["layer4.*"], "shortcut": True}]})
    hash(r)
    with pytest.raises(RecipeError, match="at least one rule"):
        Recipe(name="empty")


def test_load_recipe_refuses_other_types():
    for value in (None, 5, b"resnet50_paper", ["resnet50_paper"]):
        with pytest.raises(TypeError, match=r"load_recipe\(\): recipe must be"):
            load_recipe(value)


@pytest.mark.parametrize("glob", ["layer4.*", "layer4", "layer4.0.conv1"])
def test_rule_naming_a_torchscript_child_says_so(glob):
    model = torchvision.models.resnet18()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in recent torch
        model.layer4 = torch.jit.script(model.layer4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RecipeError, match=r"TorchScript module\(s\) \['layer4'\]"):
        dbi.inject(model, {"rules": [{"name": "g4", "modules": [glob]}]})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
