"""Recipes: where DropBlock goes, with which settings, and how its keep_prob is scheduled.

A recipe is parsed once into an immutable :class:`Recipe`. It may be given as the name of a shipped
recipe (see :func:`available_recipes`), a path to a YAML file, a ``dict`` or a :class:`Recipe`. YAML is read
with a safe loader (libyaml's when available) within the bounds of :mod:`.files` (size, aliases, nesting,
duplicate keys), and validated strictly: every problem raises :class:`RecipeError` naming the key path and
the offending value (see ``docs/recipes.md``).

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

import functools
import hashlib
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

from .._args import quote
from .files import MAX_BYTES, MAX_DEPTH, MAX_NODES, parse_yaml, read_text
from .model import NODE_KINDS, DropBlockConfig, Recipe, RecipeError, RecipeLike, Rule, ScheduleConfig
from .parse import from_dict

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
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


@functools.lru_cache(maxsize=1)
def _recipes_dir() -> Path:
    here = Path(__file__).resolve().parent.parent  # the dropblock_inject package
    for candidate in (here / "recipes", here.parent / "recipes"):  # installed wheel, source checkout
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    return here / "recipes"


def available_recipes() -> list[str]:
    """Names of the recipes shipped with the package, sorted."""
    return sorted(p.stem for p in _recipes_dir().glob("*.yaml"))


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,100}")
_CACHE_SIZE = 64
_PARSED: OrderedDict[tuple[bytes, str], Recipe] = OrderedDict()
_PARSED_LOCK = threading.Lock()


def _from_file(path: Path, name: str) -> Recipe:
    """The recipe in ``path``, parsed once per content (a ``Recipe`` is immutable): keyed by a hash of the
    bytes read, so a rewritten file is parsed again whatever its size and time stamps say."""
    text, data = read_text(path)
    key = (hashlib.blake2b(data, digest_size=16).digest(), name)
    with _PARSED_LOCK:
        recipe = _PARSED.get(key)
        if recipe is not None:
            _PARSED.move_to_end(key)
            return recipe
    where = f"recipe file {quote(str(path))}"
    try:
        recipe = from_dict(parse_yaml(text, where), name)
    except RecipeError as e:
        message = str(e)
        raise RecipeError(message if message.startswith(where) else f"{where}: {message}") from None
    with _PARSED_LOCK:
        _PARSED[key] = recipe
        if len(_PARSED) > _CACHE_SIZE:
            _PARSED.popitem(last=False)
    return recipe


def load_recipe(recipe: RecipeLike) -> Recipe:
    """Parse and validate a recipe.

    Args:
        recipe: a shipped recipe's name, a path to a YAML file, a mapping with the recipe's keys, or a
            :class:`Recipe` (returned as is).

    Returns:
        The validated, immutable :class:`Recipe`.

    Raises:
        TypeError: ``recipe`` is none of these.
        RecipeError: unknown name (the message lists the known ones); a file that is missing, a directory,
            larger than :data:`MAX_BYTES`, not UTF-8 (or UTF-16/32 with a byte-order mark) or not valid YAML;
            a duplicate key, aliases expanding to more than :data:`MAX_NODES` values, nesting deeper than
            :data:`MAX_DEPTH`; unknown keys or bad values (the message names the key path and the value).
    """
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return from_dict(recipe, "<dict>")
    if isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and (
            recipe.endswith((".yaml", ".yml")) or "/" in recipe or os.sep in recipe)):
        path = Path(recipe)
        return _from_file(path, path.stem)
    if isinstance(recipe, str):
        if _NAME.fullmatch(recipe) and (path := _recipes_dir() / f"{recipe}.yaml").is_file():
            return _from_file(path, recipe)
        raise RecipeError(f"unknown recipe {quote(recipe)}; known recipes: {', '.join(available_recipes())} "
                          f"(or give a path to a .yaml file, a dict or a Recipe)")
    raise TypeError(f"load_recipe(): recipe must be a recipe name, a path to a YAML file, a dict or a Recipe, "
                    f"but got {quote(recipe)} ({type(recipe).__name__})")
