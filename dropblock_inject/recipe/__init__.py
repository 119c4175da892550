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

from pathlib import Path
from typing import Any, Mapping

import yaml

from .model import NODE_KINDS, DropBlockConfig, Recipe, RecipeError, RecipeLike, Rule, ScheduleConfig
from .parse import from_dict

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


def _recipes_dir() -> Path:
    here = Path(__file__).resolve().parent.parent  # the dropblock_inject package
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


_PARSED: dict[tuple[str, str, int, int], Recipe] = {}


def _from_file(path: Path, name: str) -> Recipe:
    """The recipe in ``path``, parsed once per version of the file (a ``Recipe`` is immutable)."""
    try:
        stat = path.stat()
    except OSError as e:
        raise RecipeError(f"cannot read recipe file {str(path)!r}: {e}") from None
    key = (str(path.resolve()), name, stat.st_mtime_ns, stat.st_size)
    if key not in _PARSED:
        _PARSED[key] = from_dict(_load_yaml(path), name)
    return _PARSED[key]


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
        return from_dict(recipe, "<dict>")
    if isinstance(recipe, Path) or (isinstance(recipe, str) and (recipe.endswith((".yaml", ".yml")) or "/" in recipe)):
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        return _from_file(path, path.stem)
    if isinstance(recipe, str):
        path = _recipes_dir() / f"{recipe}.yaml"
        if not path.is_file():
            known = ", ".join(available_recipes())
            raise RecipeError(f"unknown recipe {recipe!r}; known recipes: {known}")
        return _from_file(path, recipe)
    raise RecipeError(f"a recipe must be a name, a path, a dict or a Recipe, got {type(recipe).__name__}")
