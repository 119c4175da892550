"""The package's public errors, in one module that imports nothing of the package."""


class RecipeError(ValueError):
    """Anything wrong with a recipe: its name, its YAML, its keys and values, or a rule that selects nothing."""


class SurgeryError(RuntimeError):
    """A model that cannot be rewritten as asked: an untraceable target, or a model already injected."""


__all__ = ["RecipeError", "SurgeryError"]
