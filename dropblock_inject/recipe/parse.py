"""Validation: a recipe mapping (from YAML or Python) to a :class:`~.model.Recipe`, strictly.

Every problem raises :class:`~.model.RecipeError` naming the key path and the offending value.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from .model import NODE_KINDS, DropBlockConfig, Recipe, RecipeError, Rule, ScheduleConfig


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


def from_dict(data: Any, name: str) -> Recipe:
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
