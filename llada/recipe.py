"""The whole recipe as the `llada` command loads it: everything jobs/ runs (jobs.recipe.RunRecipe)
plus the typed ``serve:`` block, all checked when the recipe loads, before any work."""

from __future__ import annotations

from jobs.recipe import RunRecipe
from jobs.recipe import load_recipe as _load
from pipelines import storage
from serve.config import ServeConfig


class Recipe(RunRecipe):
    """A run's recipe: data, model, stages, eval suite, scaling, and how to serve its result
    (``serve``: a ServeConfig, used by `llada serve RECIPE` and `llada infra render`)."""

    serve: ServeConfig | None = None


def load_recipe(path_or_uri: str, overrides: list[str] | None = None,
                s3: storage.S3Settings | None = None) -> Recipe:
    """Read a recipe YAML (path or URI, s3:// too), apply ``--set`` overrides, validate all of it."""
    recipe = _load(path_or_uri, overrides, s3, schema=Recipe)
    assert isinstance(recipe, Recipe)
    return recipe
