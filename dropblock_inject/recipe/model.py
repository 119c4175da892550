"""The recipe's data model: immutable dataclasses, the error type, and module-path globs."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

NODE_KINDS = ("conv", "norm", "act", "unit", "any")


from ..errors import RecipeError  # noqa: E402 - one definition, dropblock_inject.errors


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
    """A parsed, validated recipe: from :func:`load_recipe`, or built directly.

    Built directly, it is validated on construction exactly as a mapping is (the same checks, the same
    messages naming the key path), and its fields are normalised: ``dropblock`` and ``schedule`` may be
    given as mappings, ``rules`` as a list of :class:`Rule` objects or mappings.

    Args:
        name: shown in plans and errors.
        description: one line.
        dropblock: the default DropBlock settings of every rule.
        schedule: how keep_prob ramps over training.
        rules: the selectors, at least one.

    Raises:
        RecipeError: a value that a recipe mapping could not hold either (``rules=()`` included).
    """

    name: str
    description: str = ""
    dropblock: DropBlockConfig = DropBlockConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    rules: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        from .parse import recipe_fields  # parse builds Recipes: imported here, once the module is loaded

        fields = recipe_fields(self.name, self.description, self.dropblock, self.schedule, self.rules)
        for key, value in fields.items():
            object.__setattr__(self, key, value)

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

