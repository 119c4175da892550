"""dropblock_inject: put DropBlock into an existing CNN with torch.fx, schedule it, strip it before export.

Public API::

    inject(model, recipe, *, example_input=None) -> model
    plan(model, recipe, *, example_input=None) -> list[InsertionPoint]
    strip(model) -> model
    KeepProbScheduler(model, total_steps, *, target=None)
    DropBlock2d, DropBlock3d, drop_block2d, drop_block3d
    load_recipe(name_or_path_or_dict) -> Recipe;  available_recipes() -> list[str]
    register(kind, target, *, reason)  -- teach the surgery another library's norm, activation, function...
    RecipeError, SurgeryError
    check(model, recipe, example_input=None) -> CheckReport

The names are imported on first use (PEP 562), so ``python -m dropblock_inject --help`` answers without
importing torch; ``import dropblock_inject`` followed by any of them behaves as a plain import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._check import check
    from ._check_report import CheckReport
    from .errors import RecipeError, SurgeryError
    from .ops import DropBlock2d, DropBlock3d, drop_block2d, drop_block3d
    from .recipe import Recipe, available_recipes, load_recipe
    from .schedule import KeepProbScheduler
    from .surgery import InsertionPoint, format_plan, inject, injected_dropblocks, plan, register, strip

_SOURCES = {  # public name -> the module defining it
    "CheckReport": "._check_report",
    "DropBlock2d": ".ops",
    "DropBlock3d": ".ops",
    "InsertionPoint": ".surgery",
    "KeepProbScheduler": ".schedule",
    "Recipe": ".recipe",
    "RecipeError": ".errors",
    "SurgeryError": ".errors",
    "available_recipes": ".recipe",
    "check": "._check",
    "drop_block2d": ".ops",
    "drop_block3d": ".ops",
    "format_plan": ".surgery",
    "inject": ".surgery",
    "injected_dropblocks": ".surgery",
    "load_recipe": ".recipe",
    "plan": ".surgery",
    "register": ".surgery",
    "strip": ".surgery",
}

__all__ = sorted(_SOURCES)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:  # a submodule (``dropblock_inject.ops``), as a plain import of the package would give
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(source, __name__), name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCES})
