"""Recipe edits between two runs of one run folder are explicit.

A stage that has checkpoints (finished or interrupted) was trained with the config recorded in
them (``stage_config.json``). When the recipe now gives the stage another config, the rerun
refuses and names every changed field, unless told what to do:

- ``--accept-changes``: continue with the new values, allowed only when every changed field is
  safe to change mid-stage (jobs.stage_config.SAFE_TO_CHANGE: checkpoint and log cadence,
  checkpoints kept, CPU use, retries);
- ``--restart-stage NAME``: train the stage from its start; its old folder is archived (moved
  to ``stages/NAME.archived-TIME``, nothing deleted), and so are the folders of every stage that
  starts from it, directly or not, since their starting checkpoint changes too.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from jobs import checkpoints as ckpt
from jobs.recipe import RunRecipe
from jobs.stage_config import StageConfig, changed_fields, is_safe_to_change
from pipelines import storage


class StageChanged(ValueError):
    """The recipe gives a stage that already has checkpoints another config."""


def stored_stage_config(stage_uri: str, s3: storage.S3Settings | None) -> dict[str, Any] | None:
    """The config the stage's newest checkpoint (complete or not) was written with, or None."""
    for info in reversed(ckpt.list_checkpoints(stage_uri, s3, include_incomplete=True)):
        uri = storage.join(info.uri, "stage_config.json")
        if storage.exists(uri, s3):
            return storage.read_json(uri, s3)
    return None


def check_changes(config: StageConfig, stored: dict[str, Any] | None, accept_changes: bool,
                  progress: Callable[[str], None]) -> list[str]:
    """The fields that changed since the stage's checkpoints were written (empty when none);
    raises StageChanged unless they may be accepted and ``accept_changes`` says so."""
    if stored is None:
        return []
    new = config.model_dump(mode="json")
    changed = changed_fields(stored, new)
    if not changed:
        return []
    old_flat, new_flat = _flat(stored), _flat(new)
    described = "; ".join(f"{path}: {old_flat.get(path)!r} -> {new_flat.get(path)!r}" for path in changed)
    unsafe = [path for path in changed if not is_safe_to_change(path)]
    if unsafe:
        raise StageChanged(f"stage {config.name!r} has checkpoints trained with another config ({described}). "
                           f"{', '.join(unsafe)} cannot change in the middle of a stage: rerun with "
                           f"--restart-stage {config.name} to train it again from its start (its folder is "
                           "archived, not deleted), or put the recipe back")
    if not accept_changes:
        raise StageChanged(f"stage {config.name!r} has checkpoints trained with another config ({described}). "
                           "These fields are safe to change mid-stage: rerun with --accept-changes to continue "
                           "with the new values")
    progress(f"[dag] {config.name}: continuing with changed {described} (--accept-changes)")
    return changed


def restart_closure(recipe: RunRecipe, names: list[str]) -> list[str]:
    """The stages to restart: ``names`` and every stage that starts from one of them, in
    recipe order. ValueError for an unknown name."""
    chosen = {recipe.stage(name).name for name in names}
    for stage in recipe.stages:  # stages come after the ones they start from
        if stage.init_from in chosen:
            chosen.add(stage.name)
    return [stage.name for stage in recipe.stages if stage.name in chosen]


def archive_stage(recipe: RunRecipe, name: str, s3: storage.S3Settings | None) -> str | None:
    """Move the stage's folder aside (``stages/NAME.archived-TIME``) -> its new URI, or None
    when the stage has no folder yet."""
    source = recipe.stage_uri(name)
    if not storage.file_sizes(source, s3):
        return None
    target = f"{source}.archived-{time.strftime('%Y%m%d-%H%M%S')}"
    storage.move_tree(source, target, s3)
    return target


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    from jobs.stage_config import flat_fields

    return flat_fields(config)
