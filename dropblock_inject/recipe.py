"""Recipes: where DropBlock goes, with which settings, and how its keep_prob is scheduled.

A recipe is parsed once into an immutable :class:`Recipe`. It may be given as the name of a shipped
recipe (see :func:`available_recipes`), a path to a YAML file, a ``dict`` or a :class:`Recipe`. YAML is read
with ``yaml.safe_load`` and validated strictly: every problem raises :class:`RecipeError` naming the key
path and the offending value.

Format::

    description: one line shown by `python -m dropblock_inject recipes`
    dropblock:                  # defaults for every rule
      block_size: 7
      keep_prob: 0.9            # final keep_prob reached by the schedule
      per_channel: true         # independent masks per channel, as the reference
    schedule:
      start_keep_prob: 1.0      # keep_prob at step 0
      ramp_fraction: 1.0        # the ramp ends after this fraction of the total steps
    rules:
      - name: group4
        modules: ["layer4.*"]   # module-path globs: `*` is one path component, `**` any number
        types: [Bottleneck]     # optional: class names of the selected modules
        stride: [16, 32]        # optional: output strides (needs an example input)
        after: [norm]           # node kinds on residual branches: conv, norm, act, unit, or any
        shortcut: true          # also on the shortcut of every residual addition
        drop_rate_scale: 1.0    # optional overrides: block_size, keep_prob, drop_rate_scale, per_channel
        optional: false         # true: this rule may select nothing (the recipe as a whole may not)
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import yaml

__all__ = [
    "NODE_KINDS",
    "DropBlockConfig",
    "Recipe",
    "RecipeError",
    "RecipeLike",
    "Rule",
    "ScheduleConfig",
    "available_recipes",
    "load_recipe",
]

NODE_KINDS = ("conv", "norm", "act", "unit", "any")


class RecipeError(ValueError):
    """Anything wrong with a recipe: its name, its YAML, its keys and values, or a rule that selects nothing."""


@dataclass(frozen=True)
class DropBlockConfig:
    """Default DropBlock settings of a recipe.

    Args:
        block_size: side of the dropped block, clipped to each feature map.
        keep_prob: the final keep probability the schedule ramps to.
        per_channel: independent masks per channel (the reference) or one mask per sample.
    """

    block_size: int = 7
    keep_prob: float = 0.9
    per_channel: bool = True


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear schedule of keep_prob over the global step.

    Args:
        start_keep_prob: keep_prob at step 0 (per point, scaled like the final drop rate).
        ramp_fraction: fraction of the total steps after which the final keep_prob is reached.
    """

    start_keep_prob: float = 1.0
    ramp_fraction: float = 1.0


@dataclass(frozen=True)
class Rule:
    """One selector of insertion points, with its overrides.

    Args:
        name: shown in plans and errors.
        modules: module-path globs of the modules to rewrite; ``None`` means any module.
        types: class names (or qualified names) the selected modules must have; ``None`` means any.
        stride: output strides of the selected feature maps (see ``plan``); ``None`` means any.
        after: node kinds after which DropBlock goes on residual branches.
        shortcut: also insert on the shortcut of each residual addition.
        block_size, keep_prob, per_channel: overrides of the recipe's ``dropblock`` section.
        drop_rate_scale: multiplies the recipe's drop rate ``1 - keep_prob`` for this rule.
        optional: selecting nothing is not an error (the recipe as a whole must still select something).
    """

    name: str
    modules: tuple[str, ...] | None = None
    types: tuple[str, ...] | None = None
    stride: tuple[int, ...] | None = None
    after: tuple[str, ...] = ("norm",)
    shortcut: bool = False
    block_size: int | None = None
    keep_prob: float | None = None
    drop_rate_scale: float = 1.0
    per_channel: bool | None = None
    optional: bool = False

    def matches_path(self, path: str) -> bool:
        """Whether the module path ``path`` matches one of this rule's globs (always, without globs)."""
        return self.modules is None or any(_glob_regex(g).fullmatch(path) for g in self.modules)


@dataclass(frozen=True)
class Recipe:
    """A parsed, validated recipe. Build one with :func:`load_recipe`."""

    name: str
    description: str = ""
    dropblock: DropBlockConfig = DropBlockConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    rules: tuple[Rule, ...] = ()

    def keep_prob(self, rule: Rule) -> float:
        """The final keep_prob of points selected by ``rule``."""
        if rule.keep_prob is not None:
            return rule.keep_prob
        return 1.0 - (1.0 - self.dropblock.keep_prob) * rule.drop_rate_scale

    def drop_rate_scale(self, rule: Rule) -> float:
        """The drop rate of ``rule``'s points relative to the recipe's, so a new target scales them alike."""
        if rule.keep_prob is None:
            return rule.drop_rate_scale
        base = 1.0 - self.dropblock.keep_prob
        return (1.0 - rule.keep_prob) / base if base > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a plain dict that :func:`load_recipe` accepts again."""
        rules = []
        for rule in self.rules:
            d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(rule).items()}
            rules.append({k: v for k, v in d.items() if v is not None})
        return {
            "description": self.description,
            "dropblock": dataclasses.asdict(self.dropblock),
            "schedule": dataclasses.asdict(self.schedule),
            "rules": rules,
        }


RecipeLike = Union[str, Path, Mapping[str, Any], Recipe]


# ----------------------------------------------------------------------------------------------------------
# globs


_GLOB_CACHE: dict[str, re.Pattern[str]] = {}


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Module-path glob to regex: ``*`` one path component (or part of it), ``**`` any number, ``?`` one char."""
    cached = _GLOB_CACHE.get(pattern)
    if cached is None:
        parts = []
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                parts.append(".*")
                i += 2
            elif pattern[i] == "*":
                parts.append(r"[^.]*")
                i += 1
            elif pattern[i] == "?":
                parts.append(r"[^.]")
                i += 1
            else:
                parts.append(re.escape(pattern[i]))
                i += 1
        cached = _GLOB_CACHE[pattern] = re.compile("".join(parts))
    return cached


# ----------------------------------------------------------------------------------------------------------
# validation


def _fail(key: str, message: str) -> RecipeError:
    return RecipeError(f"recipe key '{key}': {message}")


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(key, f"expected a mapping, got {value!r}")
    for k in value:
        if not isinstance(k, str):
            raise _fail(key, f"keys must be strings, got {k!r}")
    return value


def _check_keys(value: Mapping[str, Any], allowed: Sequence[str], key: str) -> None:
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise _fail(f"{key}.{unknown[0]}" if key else unknown[0],
                    f"unknown key; allowed keys are {', '.join(allowed)}")


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, f"expected true or false, got {value!r}")
    return value


def _int(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(key, f"expected an integer >= {minimum}, got {value!r}")
    return value


def _prob(value: Any, key: str, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(key, f"expected a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0 or (low_open and value == 0.0):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise _fail(key, f"expected a number in {interval}, got {value!r}")
    return float(value)


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(key, f"expected a non-empty string, got {value!r}")
    return value


def _str_list(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(key, f"expected a non-empty list of strings, got {value!r}")
    return tuple(_str(v, f"{key}[{i}]") for i, v in enumerate(value))


def _dropblock(value: Any, key: str) -> DropBlockConfig:
    value = _mapping(value, key)
    _check_keys(value, ("block_size", "keep_prob", "per_channel"), key)
    default = DropBlockConfig()
    return DropBlockConfig(
        block_size=_int(value.get("block_size", default.block_size), f"{key}.block_size"),
        keep_prob=_prob(value.get("keep_prob", default.keep_prob), f"{key}.keep_prob"),
        per_channel=_bool(value.get("per_channel", default.per_channel), f"{key}.per_channel"),
    )


def _schedule(value: Any, key: str) -> ScheduleConfig:
    value = _mapping(value, key)
    _check_keys(value, ("start_keep_prob", "ramp_fraction"), key)
    default = ScheduleConfig()
    return ScheduleConfig(
        start_keep_prob=_prob(value.get("start_keep_prob", default.start_keep_prob), f"{key}.start_keep_prob"),
        ramp_fraction=_prob(value.get("ramp_fraction", default.ramp_fraction), f"{key}.ramp_fraction",
                            low_open=True),
    )


_RULE_KEYS = ("name", "modules", "types", "stride", "after", "shortcut", "block_size", "keep_prob",
              "drop_rate_scale", "per_channel", "optional")


def _rule(value: Any, key: str, index: int) -> Rule:
    value = _mapping(value, key)
    _check_keys(value, _RULE_KEYS, key)
    name = _str(value.get("name", f"rule{index}"), f"{key}.name")
    modules = _str_list(value["modules"], f"{key}.modules") if "modules" in value else None
    types = _str_list(value["types"], f"{key}.types") if "types" in value else None
    stride = None
    if "stride" in value:
        raw = value["stride"]
        raw = [raw] if isinstance(raw, int) and not isinstance(raw, bool) else raw
        if not isinstance(raw, (list, tuple)) or not raw:
            raise _fail(f"{key}.stride", f"expected a non-empty list of integers, got {value['stride']!r}")
        stride = tuple(_int(s, f"{key}.stride[{i}]") for i, s in enumerate(raw))
    after: tuple[str, ...] = ("norm",)
    if "after" in value:
        raw_after = value["after"]
        after = () if raw_after == [] else _str_list(raw_after, f"{key}.after")
        for i, kind in enumerate(after):
            if kind not in NODE_KINDS:
                raise _fail(f"{key}.after[{i}]", f"unknown node kind {kind!r}; expected one of {', '.join(NODE_KINDS)}")
    shortcut = _bool(value.get("shortcut", False), f"{key}.shortcut")
    if not after and not shortcut:
        raise _fail(key, "selects no node kind and no shortcut: give 'after' or 'shortcut: true'")
    if "keep_prob" in value and "drop_rate_scale" in value:
        raise _fail(f"{key}.drop_rate_scale", "give either keep_prob or drop_rate_scale, not both")
    drop_rate_scale = 1.0
    if "drop_rate_scale" in value:
        raw_scale = value["drop_rate_scale"]
        if isinstance(raw_scale, bool) or not isinstance(raw_scale, (int, float)) or not math.isfinite(raw_scale) \
                or raw_scale < 0:
            raise _fail(f"{key}.drop_rate_scale", f"expected a number >= 0, got {raw_scale!r}")
        drop_rate_scale = float(raw_scale)
    return Rule(
        name=name,
        modules=modules,
        types=types,
        stride=stride,
        after=after,
        shortcut=shortcut,
        block_size=_int(value["block_size"], f"{key}.block_size") if "block_size" in value else None,
        keep_prob=_prob(value["keep_prob"], f"{key}.keep_prob") if "keep_prob" in value else None,
        drop_rate_scale=drop_rate_scale,
        per_channel=_bool(value["per_channel"], f"{key}.per_channel") if "per_channel" in value else None,
        optional=_bool(value.get("optional", False), f"{key}.optional"),
    )


def _from_dict(data: Any, name: str) -> Recipe:
    data = _mapping(data, "<root>")
    _check_keys(data, ("name", "description", "dropblock", "schedule", "rules"), "")
    if "name" in data:
        name = _str(data["name"], "name")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _fail("description", f"expected a string, got {description!r}")
    dropblock = _dropblock(data.get("dropblock", {}), "dropblock")
    schedule = _schedule(data.get("schedule", {}), "schedule")
    if "rules" not in data:
        raise _fail("rules", "missing: a recipe needs at least one rule")
    raw_rules = data["rules"]
    if not isinstance(raw_rules, (list, tuple)) or not raw_rules:
        raise _fail("rules", f"expected a non-empty list of rules, got {raw_rules!r}")
    rules = tuple(_rule(r, f"rules[{i}]", i) for i, r in enumerate(raw_rules))
    for i, rule in enumerate(rules):
        if rule.keep_prob is None and 1.0 - (1.0 - dropblock.keep_prob) * rule.drop_rate_scale < 0.0:
            raise _fail(f"rules[{i}].drop_rate_scale",
                        f"{rule.drop_rate_scale!r} times the drop rate {1.0 - dropblock.keep_prob:g} exceeds 1")
    names = [r.name for r in rules]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise _fail(f"rules[{i}].name", f"duplicate rule name {n!r}")
    return Recipe(name=name, description=description.strip(), dropblock=dropblock, schedule=schedule, rules=rules)


# ----------------------------------------------------------------------------------------------------------
# loading


def _recipes_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "recipes", here.parent / "recipes"):  # installed wheel, source checkout
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    return here / "recipes"


def available_recipes() -> list[str]:
    """Names of the recipes shipped with the package, sorted."""
    return sorted(p.stem for p in _recipes_dir().glob("*.yaml"))


def _load_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"cannot read recipe file {str(path)!r}: {e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {e}") from None


def load_recipe(recipe: RecipeLike) -> Recipe:
    """Parse and validate a recipe.

    Args:
        recipe: a shipped recipe's name, a path to a YAML file, a mapping with the recipe's keys, or a
            :class:`Recipe` (returned as is).

    Returns:
        The validated, immutable :class:`Recipe`.

    Raises:
        RecipeError: unknown name (the message lists the known ones), unreadable or invalid YAML, unknown
            keys or bad values (the message names the key path and the value).
    """
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return _from_dict(recipe, "<dict>")
    if isinstance(recipe, Path) or (isinstance(recipe, str) and (recipe.endswith((".yaml", ".yml")) or "/" in recipe)):
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        return _from_dict(_load_yaml(path), path.stem)
    if isinstance(recipe, str):
        path = _recipes_dir() / f"{recipe}.yaml"
        if not path.is_file():
            known = ", ".join(available_recipes())
            raise RecipeError(f"unknown recipe {recipe!r}; known recipes: {known}")
        return _from_dict(_load_yaml(path), recipe)
    raise RecipeError(f"a recipe must be a name, a path, a dict or a Recipe, got {type(recipe).__name__}")
