"""Streaming a stage's shards into Ray Train workers, with a cursor that makes resume exact.

Driver side: :func:`stage_dataset` checks every shard (a corrupt or missing one is named before
training starts) and returns the ordered Ray Dataset; pass it to the trainer with
``DataConfig(execution_options=ingest_execution_options())`` so that Train splits it with
``preserve_order=True``. :func:`train_worker_resources` sizes the workers so Ray Data keeps CPU
for its read tasks.

Worker side: :func:`iterate_batches` wraps the worker's dataset shard. Each worker's sequence of
batches is a function of (stage data, world size, batch size, seed, epoch): the split runs with
``preserve_order=True`` and the local shuffle buffer is seeded with ``seed`` and ``epoch``. The
:class:`DataCursor` saved in a checkpoint records how many batches each worker has consumed in
the current epoch; on resume the same pipeline is rebuilt and those batches are read again and
dropped (no model compute), so the resumed run sees exactly the batches the uninterrupted run
would have seen next: nothing repeated, nothing skipped. Cost: the consumed part of the epoch is
re-read once at resume. A different world size or batch size changes the split, so resuming
with one raises an error rather than silently reordering data.
"""

from __future__ import annotations

import io
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from pipelines import storage
from pipelines.mixture import STAGE_FORMAT, STAGE_MANIFEST


class DataError(RuntimeError):
    """Stage data is missing, corrupt or cannot be fed with the requested settings."""


class DataCursor(BaseModel):
    """Position of one worker in the stage's data; saved in every training checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    world_size: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    seed: int = 0
    epoch: int = Field(0, ge=0)
    batches_consumed: int = Field(0, ge=0)

    def advanced(self) -> "DataCursor":
        return self.model_copy(update={"batches_consumed": self.batches_consumed + 1})

    def next_epoch(self) -> "DataCursor":
        return self.model_copy(update={"epoch": self.epoch + 1, "batches_consumed": 0})

    def check_compatible(self, world_size: int, batch_size: int) -> None:
        if (world_size, batch_size) != (self.world_size, self.batch_size):
            raise DataError(
                f"data cursor: the checkpoint was written with world_size={self.world_size}, "
                f"batch_size={self.batch_size}; resuming with world_size={world_size}, batch_size={batch_size} "
                f"would change which rows each worker reads. Resume with the original settings.")


def ingest_execution_options() -> Any:
    """Ray Data options for Train ingest: ordered, so a worker's batches repeat across runs."""
    from ray.data import ExecutionOptions

    options = ExecutionOptions()
    options.preserve_order = True
    return options


def load_stage(stage_uri: str, s3: storage.S3Settings | None = None, verify: bool = True) -> dict[str, Any]:
    """The stage manifest; with ``verify`` every shard's parquet footer is read and its row count
    checked, so a corrupt, truncated or missing shard is named before any training starts."""
    manifest_uri = storage.join(stage_uri, STAGE_MANIFEST)
    if not storage.exists(manifest_uri, s3):
        raise DataError(f"{stage_uri}: no {STAGE_MANIFEST}; the stage's data was never written (or not finished)")
    stage = storage.read_json(manifest_uri, s3)
    if stage.get("format") != STAGE_FORMAT:
        raise DataError(f"{manifest_uri}: unknown format {stage.get('format')!r}, expected {STAGE_FORMAT}")
    if verify:
        filesystem, _ = storage.filesystem(stage_uri, s3)
        for shard in stage["shards"]:
            shard_uri = storage.join(stage_uri, shard["path"])
            try:
                with filesystem.open_input_file(storage.filesystem(shard_uri, s3)[1]) as handle:
                    rows = pq.ParquetFile(handle).metadata.num_rows
            except Exception as error:  # pyarrow raises OSError/ArrowInvalid for corrupt or missing files
                raise DataError(f"stage shard {shard_uri} is corrupt or unreadable ({error}); "
                                f"delete {stage_uri} and prepare the stage again") from error
            if rows != shard["rows"]:
                raise DataError(f"stage shard {shard_uri} has {rows} rows, the stage manifest says {shard['rows']}")
    return stage


def stage_dataset(stage_uri: str, s3: storage.S3Settings | None = None) -> Any:
    """The stage's rows as an ordered Ray Dataset (columns: input_ids, num_tokens, domain,
    sample_index, and prompt_length for SFT)."""
    import ray.data

    stage = load_stage(stage_uri, s3)
    filesystem, _ = storage.filesystem(stage_uri, s3)
    paths = [storage.filesystem(storage.join(stage_uri, shard["path"]), s3)[1] for shard in stage["shards"]]
    dataset = ray.data.read_parquet(paths, filesystem=filesystem)
    dataset.context.execution_options.preserve_order = True
    return dataset


def to_arrays(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """A Ray numpy batch -> ``input_ids`` [B, L] int64 plus [B] columns; SFT batches also get
    ``loss_mask`` [B, L] (True on response tokens and their EOS padding)."""
    input_ids = np.stack([np.asarray(row, dtype=np.int64) for row in batch["input_ids"]])
    arrays = {"input_ids": input_ids, "num_tokens": np.asarray(batch["num_tokens"], np.int64),
              "sample_index": np.asarray(batch["sample_index"], np.int64)}
    if "prompt_length" in batch:
        prompt_length = np.asarray(batch["prompt_length"], np.int64)
        arrays["prompt_length"] = prompt_length
        arrays["loss_mask"] = np.arange(input_ids.shape[1])[None, :] >= prompt_length[:, None]
    return arrays


def iterate_batches(shard: Any, cursor: DataCursor, world_size: int, batch_size: int,
                    shuffle_buffer_rows: int = 0) -> Iterator[tuple[dict[str, np.ndarray], DataCursor]]:
    """Yield ``(batch, cursor_after_this_batch)`` from a worker's dataset shard (a Ray
    ``DataIterator``), starting after ``cursor.batches_consumed`` batches of ``cursor.epoch``.
    Save the yielded cursor with the checkpoint taken after training on that batch."""
    cursor.check_compatible(world_size, batch_size)
    batches = shard.iter_batches(
        batch_size=batch_size, batch_format="numpy", drop_last=True,
        local_shuffle_buffer_size=shuffle_buffer_rows or None,
        local_shuffle_seed=(cursor.seed * 1_000_003 + cursor.epoch) if shuffle_buffer_rows else None,
    )
    position = cursor.model_copy(update={"batches_consumed": 0})
    for batch in batches:
        if position.batches_consumed < cursor.batches_consumed:
            position = position.advanced()  # replaying to the saved position: read, not trained on
            continue
        position = position.advanced()
        yield to_arrays(batch), position


def train_worker_resources(num_workers: int, cluster_cpus: float, data_cpus: float = 1.0,
                           max_cpus_per_worker: float = 1.0) -> dict[str, float]:
    """CPUs per Train worker that leave ``data_cpus`` free for Ray Data's read tasks (without
    them ingest waits forever: seen on Ray 2.60 with 2 CPUs and 1-CPU workers). Fails fast when
    the cluster is too small."""
    if num_workers < 1:
        raise DataError(f"num_workers: must be >= 1, got {num_workers}")
    spare = cluster_cpus - data_cpus
    per_worker = min(max_cpus_per_worker, spare / num_workers) if spare > 0 else 0.0
    per_worker = float(np.floor(per_worker * 100) / 100)
    if per_worker < 0.1:
        raise DataError(
            f"num_workers: {num_workers} training workers cannot run on {cluster_cpus:g} CPUs while keeping "
            f"{data_cpus:g} CPU for Ray Data's reads (each worker needs at least 0.1 CPU); use fewer workers "
            f"or a bigger cluster")
    return {"CPU": per_worker}
