"""SparseML-style recipes: ``load_recipe(source, recipe_args)`` -> modifiers on a global schedule."""
from .loader import Recipe, load_recipe, parse_recipe_args

__all__ = ["Recipe", "load_recipe", "parse_recipe_args"]
