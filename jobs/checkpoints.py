"""Stage checkpoints in storage: layout, completion records, listing and keep-N rotation.

Layout of one stage's folder (``StageConfig.output_uri``, local or s3://):

    checkpoints/checkpoint_000010/
        deepspeed/          DeepSpeed state of every rank (exact resume)
        hf/                 llada_core.save_model export + tokenizer files (eval, serve)
        stage_config.json   the resolved stage config
        metrics.json        step, tokens seen, losses at this step
        complete.json       the completion record, written LAST, after every rank's files landed
    metrics.jsonl           per-step metrics
    training.png            loss and expert-load plot (end of stage)
    selection.json          (written by the DAG) the chosen checkpoint; rotation never deletes it

A checkpoint without ``complete.json`` is incomplete (a crash during upload): readers ignore it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from pipelines import storage

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_RECORD = "complete.json"
SELECTION_RECORD = "selection.json"
_NAME = re.compile(r"^checkpoint_(\d{6,})$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:06d}"


def checkpoints_uri(stage_uri: str) -> str:
    return storage.join(stage_uri, CHECKPOINTS_DIR)


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    uri: str  # the checkpoint folder
    record: dict[str, Any]  # its completion record

    @property
    def hf_uri(self) -> str:
        return storage.join(self.uri, "hf")


def write_completion_record(checkpoint_uri: str, step: int, metrics: dict[str, Any],
                            s3: storage.S3Settings | None = None) -> None:
    storage.write_json(storage.join(checkpoint_uri, COMPLETE_RECORD),
                       {"step": step, "completed_at": time.time(), "metrics": metrics}, s3)


def list_checkpoints(stage_uri: str, s3: storage.S3Settings | None = None,
                     include_incomplete: bool = False) -> list[CheckpointInfo]:
    """Complete checkpoints of a stage, oldest first."""
    found = []
    for record_uri in storage.list_files(storage.join(checkpoints_uri(stage_uri), "*", COMPLETE_RECORD), s3):
        folder = record_uri[: -len(COMPLETE_RECORD) - 1]
        match = _NAME.match(folder.rstrip("/").rsplit("/", 1)[-1])
        if match:
            found.append(CheckpointInfo(int(match.group(1)), folder, storage.read_json(record_uri, s3)))
    if include_incomplete:
        complete = {info.step for info in found}
        for meta_uri in storage.list_files(storage.join(checkpoints_uri(stage_uri), "*", "metrics.json"), s3):
            folder = meta_uri[: -len("metrics.json") - 1]
            match = _NAME.match(folder.rstrip("/").rsplit("/", 1)[-1])
            if match and int(match.group(1)) not in complete:
                found.append(CheckpointInfo(int(match.group(1)), folder, {}))
    return sorted(found, key=lambda info: info.step)


def protected_checkpoints(stage_uri: str, s3: storage.S3Settings | None = None) -> set[str]:
    """Checkpoint folders that a selection record points to (never rotated away)."""
    record_uri = storage.join(stage_uri, SELECTION_RECORD)
    if not storage.exists(record_uri, s3):
        return set()
    record = storage.read_json(record_uri, s3)
    return {record["checkpoint_uri"].rstrip("/")} if record.get("checkpoint_uri") else set()


def plan_rotation(steps_and_uris: list[tuple[int, str]], keep_last: int, protected: set[str]) -> list[str]:
    """Which checkpoint folders to delete: all but the newest ``keep_last``, never a protected one.
    A pure function, so the rule is tested on plain data."""
    if keep_last < 1:
        raise ValueError(f"keep_last: must be >= 1, got {keep_last}")
    ordered = sorted(steps_and_uris)
    doomed = ordered[:-keep_last] if len(ordered) > keep_last else []
    return [uri for _, uri in doomed if uri.rstrip("/") not in protected]


def rotate_checkpoints(stage_uri: str, keep_last: int, s3: storage.S3Settings | None = None) -> list[str]:
    """Delete old complete checkpoints beyond ``keep_last``; returns what was deleted."""
    checkpoints = [(info.step, info.uri) for info in list_checkpoints(stage_uri, s3)]
    doomed = plan_rotation(checkpoints, keep_last, protected_checkpoints(stage_uri, s3))
    for uri in doomed:
        # The completion record goes first, so a half-deleted folder already reads as incomplete.
        storage.remove_tree(storage.join(uri, COMPLETE_RECORD), s3)
        storage.remove_tree(uri, s3)
    return doomed
