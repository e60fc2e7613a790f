"""Checkpoint weight averaging for ``select: average_top_k`` (the decision is
jobs/evaluation/selection.py's ``averaging_selection_record``; this module writes the average).

The average of a stage's top-k checkpoints is a checkpoint of its own under the stage folder::

    stages/{name}/averages/top-000031-000047-000093/
        hf/            the averaged HF-layout export: the next stage's starting point (fresh optimizer)
        complete.json  written last: which checkpoints it averages, every file with its size
        scores.json    its score record, like any checkpoint's

Its reference's ``step`` is the newest member's. The members must share one architecture (equal
configs, the same weight layout) and one tokenizer; otherwise nothing is written and the error
names the mismatch. Cost at the 7B recipe's size: each member's HF export is read once (k x 14 GB
in bf16, downloaded first when in object storage), memory is one weight file (at most 5 GB) plus
one float64 copy of the tensor being summed (2.6 GB for the released embedding).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Sequence

from jobs.checkpoints import COMPLETE_RECORD, HF_DIR, CheckpointInfo, CheckpointRef, write_completion_record
from llada_core import average_checkpoints
from pipelines import storage
from pipelines.tokenizer import load_tokenizer, tokenizer_hash

AVERAGES_DIR = "averages"


def average_ref(stage_uri: str, members: Sequence[CheckpointRef]) -> CheckpointRef:
    """Where the average of ``members`` lives (module docstring); the name lists their steps."""
    steps = sorted(ref.step for ref in members)
    uri = storage.join(stage_uri, AVERAGES_DIR, "top-" + "-".join(f"{step:06d}" for step in steps))
    return CheckpointRef(uri=uri, hf_uri=storage.join(uri, HF_DIR), step=steps[-1])


def write_average(stage_uri: str, members: Sequence[CheckpointRef], s3: storage.S3Settings | None = None
                  ) -> CheckpointInfo:
    """Average the members' weights into :func:`average_ref` and return it as a complete
    checkpoint; an average already complete there (same members) is reused."""
    if len(members) < 2:
        raise ValueError(f"members: averaging needs at least 2 checkpoints, got {len(members)}")
    target = average_ref(stage_uri, members)
    record_uri = storage.join(target.uri, COMPLETE_RECORD)
    if storage.exists(record_uri, s3):
        return CheckpointInfo(target, storage.read_json(record_uri, s3))
    with contextlib.ExitStack() as stack:
        folders = [stack.enter_context(storage.local_copy(ref.hf_uri, s3, prefix="llada-average-in-"))
                   for ref in members]
        hashes = [tokenizer_hash(load_tokenizer(folder)) for folder in folders]
        for ref, digest in zip(members[1:], hashes[1:]):
            if digest != hashes[0]:
                raise ValueError(f"{ref.hf_uri}: another tokenizer than {members[0].hf_uri}'s (hash {digest[:12]} vs "
                                 f"{hashes[0][:12]}); checkpoints are averaged only with one tokenizer")
        if storage.is_remote(target.hf_uri):
            local = stack.enter_context(tempfile.TemporaryDirectory(prefix="llada-average-out-"))
            average_checkpoints(folders, Path(local) / HF_DIR)
            storage.upload_dir(str(Path(local) / HF_DIR), target.hf_uri, s3)
        else:
            average_checkpoints(folders, storage.parse_uri(target.hf_uri).path)
    metrics: dict[str, Any] = {"averaged": [ref.to_json() for ref in members]}
    return CheckpointInfo(target, write_completion_record(target, metrics, s3))
