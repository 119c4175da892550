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
"""

from .errors import RecipeError, SurgeryError
from .surgery import InsertionPoint, format_plan, inject, injected_dropblocks, plan, register, strip
from .ops import DropBlock2d, DropBlock3d, drop_block2d, drop_block3d
from .recipe import Recipe, available_recipes, load_recipe
from .schedule import KeepProbScheduler
from .check import CheckReport, check  # noqa: E402 - after the modules it uses

__all__ = [
    "DropBlock2d",
    "DropBlock3d",
    "InsertionPoint",
    "KeepProbScheduler",
    "Recipe",
    "RecipeError",
    "SurgeryError",
    "available_recipes",
    "CheckReport",
    "check",
    "drop_block2d",
    "drop_block3d",
    "format_plan",
    "inject",
    "injected_dropblocks",
    "load_recipe",
    "plan",
    "register",
    "strip",
]
__version__ = "0.1.0"
