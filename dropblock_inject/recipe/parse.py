"""Validation: a recipe mapping (from YAML or Python) or a :class:`~.model.Recipe`'s fields, strictly.

Every problem raises :class:`~.model.RecipeError` naming the key path and the offending value, quoted to a
couple of hundred characters. The work is linear in the size of the recipe, and a number too large for a
float is out of range like any other.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from .._args import quote
from .model import NODE_KINDS, DropBlockConfig, Recipe, RecipeError, Rule, ScheduleConfig

MAX_STRING = 1000
"""Most characters of a name, module glob or class name (module paths are far shorter)."""

MAX_INT = 2**31 - 1
"""Largest block size or stride."""

_SECTION_KEYS = ("name", "description", "dropblock", "schedule", "rules")
_DROPBLOCK_KEYS = ("block_size", "keep_prob", "per_channel")
_SCHEDULE_KEYS = ("start_keep_prob", "ramp_fraction")
_RULE_KEYS = ("name", "modules", "types", "stride", "after", "shortcut", "block_size", "keep_prob",
              "drop_rate_scale", "per_channel", "optional")


def _fail(key: str, message: str) -> RecipeError:
    return RecipeError(f"recipe key '{key}': {message}")


def _key(k: str) -> str:
    """A user's key as a key path component, cut so that the message stays short."""
    return k if len(k) <= 60 else k[:57] + "..."


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(key, f"expected a mapping, got {quote(value)}")
    for k in value:
        if not isinstance(k, str):
            raise _fail(key, f"keys must be strings, got {quote(k)}")
    return value


def _check_keys(value: Mapping[str, Any], allowed: Sequence[str], key: str) -> None:
    for k in value:
        if k not in allowed:
            raise _fail(f"{key}.{_key(k)}" if key else _key(k), f"unknown key; allowed keys are {', '.join(allowed)}")


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, f"expected true or false, got {quote(value)}")
    return value


def _int(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_INT:
        raise _fail(key, f"expected an integer in [{minimum}, 2**31 - 1], got {quote(value)}")
    return int(value)


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None if it is not a number or does not fit a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)
    except OverflowError:  # an int beyond 1.8e308
        return None
    return f if math.isfinite(f) else None


def _prob(value: Any, key: str, low_open: bool = False) -> float:
    f = _finite(value)
    interval = "(0, 1]" if low_open else "[0, 1]"
    if f is None or not 0.0 <= f <= 1.0 or (low_open and f == 0.0):
        raise _fail(key, f"expected a number in {interval}, got {quote(value)}")
    return f


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_STRING:
        raise _fail(key, f"expected a non-empty string of at most {MAX_STRING} characters, got {quote(value)}")
    return value


def _str_list(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(key, f"expected a non-empty list of strings, got {quote(value)}")
    return tuple(_str(v, f"{key}[{i}]") for i, v in enumerate(value))


def _fields(obj: Any) -> dict[str, Any]:
    """A section given as its dataclass, as the mapping of its fields (a rule: those not at their default)."""
    if isinstance(obj, Rule):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
                if f.name == "name" or getattr(obj, f.name) != f.default}
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def dropblock_config(value: Any, key: str = "dropblock") -> DropBlockConfig:
    """The ``dropblock`` section, given as a mapping or a :class:`~.model.DropBlockConfig`."""
    value = _mapping(_fields(value) if isinstance(value, DropBlockConfig) else value, key)
    _check_keys(value, _DROPBLOCK_KEYS, key)
    default = DropBlockConfig()
    return DropBlockConfig(
        block_size=_int(value.get("block_size", default.block_size), f"{key}.block_size"),
        keep_prob=_prob(value.get("keep_prob", default.keep_prob), f"{key}.keep_prob"),
        per_channel=_bool(value.get("per_channel", default.per_channel), f"{key}.per_channel"),
    )


def schedule_config(value: Any, key: str = "schedule") -> ScheduleConfig:
    """The ``schedule`` section, given as a mapping or a :class:`~.model.ScheduleConfig`."""
    value = _mapping(_fields(value) if isinstance(value, ScheduleConfig) else value, key)
    _check_keys(value, _SCHEDULE_KEYS, key)
    default = ScheduleConfig()
    return ScheduleConfig(
        start_keep_prob=_prob(value.get("start_keep_prob", default.start_keep_prob), f"{key}.start_keep_prob"),
        ramp_fraction=_prob(value.get("ramp_fraction", default.ramp_fraction), f"{key}.ramp_fraction",
                            low_open=True),
    )


def _rule(value: Any, key: str, index: int) -> Rule:
    value = _mapping(_fields(value) if isinstance(value, Rule) else value, key)
    _check_keys(value, _RULE_KEYS, key)
    name = _str(value.get("name", f"rule{index}"), f"{key}.name")
    modules = _str_list(value["modules"], f"{key}.modules") if "modules" in value else None
    types = _str_list(value["types"], f"{key}.types") if "types" in value else None
    stride = None
    if "stride" in value:
        raw = value["stride"]
        raw = [raw] if isinstance(raw, int) and not isinstance(raw, bool) else raw
        if not isinstance(raw, (list, tuple)) or not raw:
            raise _fail(f"{key}.stride", f"expected a non-empty list of integers, got {quote(value['stride'])}")
        stride = tuple(_int(s, f"{key}.stride[{i}]") for i, s in enumerate(raw))
    after: tuple[str, ...] = ("norm",)
    if "after" in value:
        raw_after = value["after"]
        after = () if isinstance(raw_after, (list, tuple)) and not raw_after else _str_list(raw_after, f"{key}.after")
        for i, kind in enumerate(after):
            if kind not in NODE_KINDS:
                raise _fail(f"{key}.after[{i}]",
                            f"unknown node kind {quote(kind)}; expected one of {', '.join(NODE_KINDS)}")
    shortcut = _bool(value.get("shortcut", False), f"{key}.shortcut")
    if not after and not shortcut:
        raise _fail(key, "selects no node kind and no shortcut: give 'after' or 'shortcut: true'")
    if "keep_prob" in value and "drop_rate_scale" in value:
        raise _fail(f"{key}.drop_rate_scale", "give either keep_prob or drop_rate_scale, not both")
    keep_prob = _prob(value["keep_prob"], f"{key}.keep_prob") if "keep_prob" in value else None
    drop_rate_scale = 1.0
    if "drop_rate_scale" in value:
        raw_scale = value["drop_rate_scale"]
        scale = _finite(raw_scale)
        if scale is None or scale < 0:
            raise _fail(f"{key}.drop_rate_scale", f"expected a finite number >= 0, got {quote(raw_scale)}")
        drop_rate_scale = scale
    return Rule(
        name=name,
        modules=modules,
        types=types,
        stride=stride,
        after=after,
        shortcut=shortcut,
        block_size=_int(value["block_size"], f"{key}.block_size") if "block_size" in value else None,
        keep_prob=keep_prob,
        drop_rate_scale=drop_rate_scale,
        per_channel=_bool(value["per_channel"], f"{key}.per_channel") if "per_channel" in value else None,
        optional=_bool(value.get("optional", False), f"{key}.optional"),
    )


def rules_tuple(raw_rules: Any, dropblock: DropBlockConfig, key: str = "rules") -> tuple[Rule, ...]:
    """The ``rules`` list, each given as a mapping or a :class:`~.model.Rule`, checked against each other and
    against the recipe's drop rate, in time linear in the number of rules."""
    if not isinstance(raw_rules, (list, tuple)) or not raw_rules:
        hint = " (a recipe needs at least one rule)" if isinstance(raw_rules, (list, tuple)) else ""
        raise _fail(key, f"expected a non-empty list of rules, got {quote(raw_rules)}{hint}")
    rules = tuple(_rule(r, f"{key}[{i}]", i) for i, r in enumerate(raw_rules))
    base = 1.0 - dropblock.keep_prob
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        if rule.keep_prob is None and 1.0 - base * rule.drop_rate_scale < 0.0:
            raise _fail(f"{key}[{i}].drop_rate_scale",
                        f"{rule.drop_rate_scale!r} times the drop rate {base:g} exceeds 1")
        if rule.name in seen:
            raise _fail(f"{key}[{i}].name", f"duplicate rule name {quote(rule.name)}")
        seen.add(rule.name)
    return rules


def recipe_fields(name: Any, description: Any, dropblock: Any, schedule: Any, rules: Any) -> dict[str, Any]:
    """A recipe's fields, validated and normalised: what :class:`~.model.Recipe` stores.

    Args:
        name, description: strings.
        dropblock, schedule: the sections, as mappings or their dataclasses.
        rules: a non-empty list or tuple of rules, as mappings or :class:`~.model.Rule` objects.

    Returns:
        The fields by name: ``name``, ``description`` (stripped), ``dropblock``, ``schedule``, ``rules`` (a
        tuple of Rule).
    """
    name = _str(name, "name")
    if not isinstance(description, str):
        raise _fail("description", f"expected a string, got {quote(description)}")
    block = dropblock_config(dropblock)
    return {"name": name, "description": description.strip(), "dropblock": block,
            "schedule": schedule_config(schedule), "rules": rules_tuple(rules, block)}


def from_dict(data: Any, name: str) -> Recipe:
    """The :class:`~.model.Recipe` a mapping describes (``name`` unless the mapping gives one)."""
    data = _mapping(data, "<root>")
    _check_keys(data, _SECTION_KEYS, "")
    if "rules" not in data:
        raise _fail("rules", "missing: a recipe needs at least one rule")
    return Recipe(name=data.get("name", name), description=data.get("description", ""),
                  dropblock=data.get("dropblock", {}), schedule=data.get("schedule", {}), rules=data["rules"])
