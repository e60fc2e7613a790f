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

A checkpoint without ``complete.json`` is incomplete (a crash during upload): readers ignore it
and a resumed stage discards it. The completion record lists every file of the checkpoint with
its size and the stage's config fingerprint, so a resume can tell a whole checkpoint from a
truncated one, and a checkpoint of a changed stage from one of this stage (the resume point is
chosen here, never by Ray's own checkpoint bookkeeping).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from pipelines import storage

CHECKPOINTS_DIR = "checkpoints"
HF_DIR = "hf"
COMPLETE_RECORD = "complete.json"
SELECTION_RECORD = "selection.json"
_NAME = re.compile(r"^checkpoint_(\d{6,})$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:06d}"


def checkpoints_uri(stage_uri: str) -> str:
    return storage.join(stage_uri, CHECKPOINTS_DIR)


class ResumeError(RuntimeError):
    """A stage has checkpoints but none can be resumed from; the message names each and why."""


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint, named once by its writer and carried as is by every reader (score and
    selection records, the next stage, serving): ``uri`` is the checkpoint folder (DeepSpeed
    state, records), ``hf_uri`` its HF-layout export (what eval, serving and the next stage
    load), ``step`` the optimizer step it holds."""

    uri: str
    hf_uri: str
    step: int

    @classmethod
    def at(cls, stage_uri: str, step: int) -> "CheckpointRef":
        """The checkpoint of ``step`` in a stage folder (the layout of this module's docstring)."""
        uri = storage.join(checkpoints_uri(stage_uri), checkpoint_name(step))
        return cls(uri=uri, hf_uri=storage.join(uri, HF_DIR), step=step)

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "hf_uri": self.hf_uri, "step": self.step}

    @classmethod
    def from_json(cls, value: Any, where: str = "checkpoint") -> "CheckpointRef":
        """From a record's ``{"uri", "hf_uri", "step"}``; ValueError naming ``where`` otherwise."""
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a checkpoint reference {{uri, hf_uri, step}}, got {value!r}")
        uri, hf_uri, step = value.get("uri"), value.get("hf_uri"), value.get("step")
        if not isinstance(uri, str) or not uri or not isinstance(hf_uri, str) or not hf_uri:
            raise ValueError(f"{where}: a checkpoint reference needs the folder `uri` and its `hf_uri`, got {value!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where}.step: expected a non-negative int, got {step!r}")
        return cls(uri=uri.rstrip("/"), hf_uri=hf_uri.rstrip("/"), step=step)


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint found in storage: its reference and its completion record ({} if incomplete)."""

    ref: CheckpointRef
    record: dict[str, Any]

    @property
    def uri(self) -> str:
        return self.ref.uri

    @property
    def step(self) -> int:
        return self.ref.step

    @property
    def hf_uri(self) -> str:
        return self.ref.hf_uri


def write_completion_record(ref: CheckpointRef, metrics: dict[str, Any], s3: storage.S3Settings | None = None,
                            fingerprint: str | None = None) -> dict[str, Any]:
    """Written last, once every rank's files are in storage: the reference, the stage config's
    fingerprint, and every file of the checkpoint with its size (what a resume verifies)."""
    record = {"checkpoint": ref.to_json(), "step": ref.step, "completed_at": time.time(), "metrics": metrics,
              "fingerprint": fingerprint, "files": storage.file_sizes(ref.uri, s3)}
    storage.write_json(storage.join(ref.uri, COMPLETE_RECORD), record, s3)
    return record


def verify(info: CheckpointInfo, s3: storage.S3Settings | None = None) -> str | None:
    """None when every file the completion record lists is there with its recorded size, else
    what is wrong (one listing, no file is read). Records without a file list (written before
    there was one) are taken as they are."""
    expected = info.record.get("files")
    if expected is None:
        return None
    present = storage.file_sizes(info.uri, s3)
    missing = sorted(name for name in expected if name not in present)
    if missing:
        return f"{len(missing)} of its {len(expected)} files are missing (e.g. {missing[0]})"
    for name, size in sorted(expected.items()):
        if present[name] != size:
            return f"{name} is {present[name]} bytes, its completion record says {size} (truncated or rewritten)"
    return None


def resume_candidates(stage_uri: str, s3: storage.S3Settings | None = None
                      ) -> tuple[list[CheckpointInfo], list[tuple[CheckpointInfo, str]]]:
    """The checkpoints a stage may resume from, newest first (complete, files verified), and
    the complete ones that failed verification with the reason."""
    usable, skipped = [], []
    for info in reversed(list_checkpoints(stage_uri, s3)):
        problem = verify(info, s3)
        if problem is None:
            usable.append(info)
        else:
            skipped.append((info, problem))
    return usable, skipped


def incomplete_checkpoints(stage_uri: str, s3: storage.S3Settings | None = None) -> list[CheckpointRef]:
    """Checkpoint folders without a completion record (a save that never finished), oldest first."""
    folders: dict[int, set[str]] = {}
    for relative in storage.file_sizes(checkpoints_uri(stage_uri), s3):
        name, _, rest = relative.partition("/")
        step = _step_of_folder(name)
        if step is not None:
            folders.setdefault(step, set()).add(rest)
    return [CheckpointRef.at(stage_uri, step) for step, files in sorted(folders.items())
            if COMPLETE_RECORD not in files]


def list_checkpoints(stage_uri: str, s3: storage.S3Settings | None = None,
                     include_incomplete: bool = False) -> list[CheckpointInfo]:
    """Complete checkpoints of a stage, oldest first (with ``include_incomplete``, also those
    that have files but no completion record, with an empty record)."""
    found = []
    for record_uri in storage.list_files(storage.join(checkpoints_uri(stage_uri), "*", COMPLETE_RECORD), s3):
        step = _step_of_folder(record_uri[: -len(COMPLETE_RECORD) - 1])
        if step is not None:
            found.append(CheckpointInfo(CheckpointRef.at(stage_uri, step), storage.read_json(record_uri, s3)))
    if include_incomplete:
        complete = {info.step for info in found}
        for meta_uri in storage.list_files(storage.join(checkpoints_uri(stage_uri), "*", "metrics.json"), s3):
            step = _step_of_folder(meta_uri[: -len("metrics.json") - 1])
            if step is not None and step not in complete:
                found.append(CheckpointInfo(CheckpointRef.at(stage_uri, step), {}))
    return sorted(found, key=lambda info: info.step)


def _step_of_folder(folder_uri: str) -> int | None:
    """The step in a folder's name as the writer made it (``checkpoint_000040``), else None."""
    match = _NAME.match(folder_uri.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def protected_checkpoints(stage_uri: str, s3: storage.S3Settings | None = None) -> set[str]:
    """Checkpoint folders that a selection record points to (never rotated away)."""
    record_uri = storage.join(stage_uri, SELECTION_RECORD)
    if not storage.exists(record_uri, s3):
        return set()
    return {read_selection_ref(record_uri, s3).uri}


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


def read_selection_ref(record_uri: str, s3: storage.S3Settings | None = None) -> CheckpointRef:
    """The checkpoint a stage's selection record chose. Records written before the reference
    existed (``checkpoint_uri`` + ``step``, format llada-selection/1) are read too, so a run
    selected by an older version keeps its choice."""
    record = storage.read_json(record_uri, s3)
    if "checkpoint" in record:
        return CheckpointRef.from_json(record["checkpoint"], where=f"{record_uri}: checkpoint")
    uri = str(record.get("checkpoint_uri", "")).rstrip("/")
    if not uri:
        raise ValueError(f"{record_uri}: not a selection record (no checkpoint)")
    return CheckpointRef(uri=uri, hf_uri=record.get("hf_uri") or storage.join(uri, HF_DIR), step=int(record["step"]))
