"""Streaming a stage into Ray Train workers, from the packed shards directly, resumable in O(1).

Worker side: each Train worker streams its own part of the stage's order (pipelines/mixture.py)
through Ray Data: worker ``w`` of ``W`` reads units ``w, w + W, w + 2W, ...``; a Ray Data task
reads one unit (the row groups its rows live in) and the worker batches the rows in order
(``preserve_order``). Put together, the workers read exactly the stage's units, each once, so a
stage reads the same rows whatever the number of workers; what changes with ``W`` is which
worker reads which unit.

The :class:`DataCursor` saved in a checkpoint says how many rows the worker has consumed. A
resumed worker starts at the unit and position it names: its first Ray Data task reads one
micro-batch from that position (the row groups those rows live in, a few hundred rows per
domain), the next the rest of that unit, and nothing before the position is read again. A resume must use the world size and batch size it was saved
with (they decide which rows each worker has consumed); with others it is refused, and the stage
can be restarted instead (``--restart-stage``).

Driver side: :func:`load_plan` checks the stage's plan and its packed set before training starts.
:func:`train_worker_resources` sizes the workers so Ray Data keeps CPU for its read tasks.
"""

from __future__ import annotations

import collections
import functools
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from pydantic import BaseModel, ConfigDict, Field

from pipelines import storage
from pipelines.mixture import PLAN_NAME, DomainShards, StagePlan, _seed, unit_rows

# Bytes of decoded row groups a reading process keeps, at least two units' worth (a unit's rows
# must all be in the cache while it is gathered): a worker's consecutive units read neighbouring
# rows of each domain, often from the same row groups. Kept small so freed memory is reused
# (in one side-by-side run a 256 MB cache read 117k rows/s in process, 64 MB 166k: fresh pages every read).
ROW_GROUP_CACHE_BYTES = 64 * 2**20
_PRETRAIN_COLUMNS = ["input_ids", "num_tokens"]
_SFT_COLUMNS = ["input_ids", "num_tokens", "turn_starts", "turn_ends"]
TASK_BYTES = 64 * 2**20  # token bytes a Ray Data read task produces (see read_tasks)


class DataError(RuntimeError):
    """Stage data is missing, corrupt or cannot be fed with the requested settings."""


class DataCursor(BaseModel):
    """Position of one worker in the stage's order; saved in every training checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    world_size: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    seed: int = 0
    rows_consumed: int = Field(0, ge=0)

    def advanced(self, rows: int) -> "DataCursor":
        return self.model_copy(update={"rows_consumed": self.rows_consumed + rows})

    def check_compatible(self, world_size: int, batch_size: int) -> None:
        if (world_size, batch_size) != (self.world_size, self.batch_size):
            raise DataError(
                f"data cursor: the checkpoint was written with world_size={self.world_size}, "
                f"batch_size={self.batch_size}; resuming with world_size={world_size}, batch_size={batch_size} "
                f"would change which rows each worker reads. Resume with the original settings, or restart "
                f"the stage (--restart-stage).")


def load_plan(stage_uri: str, s3: storage.S3Settings | None = None) -> StagePlan:
    """The stage's plan (``stage.json``, written by data preparation); DataError naming what is missing."""
    uri = storage.join(stage_uri, PLAN_NAME)
    if not storage.exists(uri, s3):
        raise DataError(f"{stage_uri}: no {PLAN_NAME}; the stage's data was never prepared (or not finished)")
    try:
        return StagePlan.from_json(storage.read_json(uri, s3))
    except (ValueError, KeyError) as error:
        raise DataError(f"{uri}: not a stage plan this version reads ({error}); prepare the data again") from None


@functools.lru_cache(maxsize=4)
def _shard_index(packed_uri: str, s3_json: str | None) -> dict[str, DomainShards]:
    from pipelines.pack import load_shard_index

    return load_shard_index(packed_uri, storage.S3Settings.model_validate_json(s3_json) if s3_json else None)


@dataclass
class _RowGroup:
    """One decoded row group: fixed-length pretraining rows as one [rows, seq_len] array (a
    gather is then one numpy index, no per-row objects); SFT dialogs (variable length) as the
    Arrow table."""

    num_rows: int
    nbytes: int
    ids: np.ndarray | None = None
    num_tokens: np.ndarray | None = None
    table: pa.Table | None = None


def _decode(table: pa.Table, kind: str, seq_len: int, sizes: list[int]) -> list[_RowGroup]:
    """Consecutive row groups read together -> one _RowGroup each (pretraining rows decoded in
    one flat copy, then viewed per row group)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if kind == "sft":
        groups = [table.slice(start, size) for start, size in zip(offsets, sizes)]
        return [_RowGroup(size, group.nbytes, table=group) for size, group in zip(sizes, groups)]
    column = table.column("input_ids")
    if [len(chunk) for chunk in column.chunks] == list(sizes):  # a chunk per row group: views, no copy
        return [_RowGroup(size, size * seq_len * 4, ids=pc.list_flatten(chunk).to_numpy().reshape(size, seq_len),
                          num_tokens=tokens.to_numpy())
                for size, chunk, tokens in zip(sizes, column.chunks, table.column("num_tokens").chunks)]
    ids = pc.list_flatten(column).to_numpy().reshape(table.num_rows, seq_len)
    num_tokens = table.column("num_tokens").to_numpy()
    return [_RowGroup(size, ids[start:start + size].nbytes, ids=ids[start:start + size],
                      num_tokens=num_tokens[start:start + size]) for start, size in zip(offsets, sizes)]


class _RowGroupCache:
    """Row groups decoded by this process, least recently used out first, within a byte budget."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used, self.groups = budget, 0, collections.OrderedDict()
        self.lock = threading.Lock()

    def at_least(self, budget: int) -> None:
        with self.lock:
            self.budget = max(self.budget, budget)

    def get(self, key: tuple[str, int]) -> _RowGroup | None:
        with self.lock:
            group = self.groups.get(key)
            if group is not None:
                self.groups.move_to_end(key)
            return group

    def put(self, key: tuple[str, int], group: _RowGroup) -> None:
        with self.lock:
            self.groups[key] = group
            self.used += group.nbytes
            while self.used > self.budget and len(self.groups) > 1:
                _, old = self.groups.popitem(last=False)
                self.used -= old.nbytes


_CACHE = _RowGroupCache(ROW_GROUP_CACHE_BYTES)


def clear_row_group_cache() -> None:
    """Forget every cached row group (measurements of what a fresh reader reads)."""
    global _CACHE
    _CACHE = _RowGroupCache(ROW_GROUP_CACHE_BYTES)


def _locate(plan: StagePlan, shards: DomainShards, shard_ids: np.ndarray, rows: np.ndarray,
            s3: storage.S3Settings | None, stats: dict[str, int] | None
            ) -> Iterator[tuple[_RowGroup, np.ndarray, np.ndarray]]:
    """The requested rows (shard index, row within shard), by row group: yields (row group,
    indices into the request [k], rows within the row group [k]). Reads only the row groups the
    rows live in, and none already in this process's cache."""
    group_rows = plan.row_group_rows
    keys = shard_ids * (2**32) + rows // group_rows  # (shard, row group) of every row
    unique_keys, key_of_row = np.unique(keys, return_inverse=True)
    by_key = np.argsort(key_of_row, kind="stable")
    bounds = np.searchsorted(key_of_row[by_key], np.arange(len(unique_keys) + 1))
    uris = [storage.join(plan.packed_uri, shards.paths[int(key >> 32)]) for key in unique_keys]
    missing: dict[str, tuple[int, list[int]]] = {}
    for uri, key in zip(uris, unique_keys):
        if _CACHE.get((uri, int(key & 0xFFFFFFFF))) is None:
            missing.setdefault(uri, (int(key >> 32), []))[1].append(int(key & 0xFFFFFFFF))
    for uri, (shard, groups) in missing.items():
        _read_row_groups(plan, uri, groups, int(shards.rows[shard]), s3, stats)
    for index, (uri, key) in enumerate(zip(uris, unique_keys)):
        number = int(key & 0xFFFFFFFF)
        group = _CACHE.get((uri, number))
        if group is None:  # evicted since (a unit wider than the cache): read it again
            _read_row_groups(plan, uri, [number], int(shards.rows[int(key >> 32)]), s3, stats)
            group = _CACHE.get((uri, number))
        selected = by_key[bounds[index]:bounds[index + 1]]
        yield group, selected, rows[selected] - number * group_rows


def _read_row_groups(plan: StagePlan, uri: str, groups: list[int], shard_rows: int, s3: storage.S3Settings | None,
                     stats: dict[str, int] | None) -> None:
    """Read and cache row groups of one shard. One Arrow dataset fragment for all of them: as
    fast as reading the whole file with pq.read_table (pyarrow decodes the groups together),
    where a read_row_group call per group is ~1.7x slower (measured on this machine)."""
    groups = sorted(set(groups))  # (a virtual index may name one file twice)
    sizes = [min(plan.row_group_rows, shard_rows - number * plan.row_group_rows) for number in groups]
    columns = _SFT_COLUMNS if plan.kind == "sft" else _PRETRAIN_COLUMNS
    try:
        filesystem, path = storage.filesystem(uri, s3)
        fragment = pads.ParquetFileFormat().make_fragment(path, filesystem, row_groups=groups)
        table = fragment.to_table(columns=columns)
        if table.num_rows != sum(sizes):
            raise ValueError(f"row groups {groups} hold {table.num_rows} rows, the shard index says {sum(sizes)}")
    except Exception as error:  # pyarrow raises OSError/ArrowInvalid for a corrupt or missing shard
        raise DataError(f"packed shard {uri} is corrupt or unreadable ({type(error).__name__}: {error}); "
                        "prepare the data again (llada data prepare --overwrite)") from error
    for number, group in zip(groups, _decode(table, plan.kind, plan.seq_len, sizes)):
        _CACHE.put((uri, number), group)
    if stats is not None:
        stats["row_groups_read"] = stats.get("row_groups_read", 0) + len(groups)
        stats["rows_read"] = stats.get("rows_read", 0) + table.num_rows


def read_unit(plan: StagePlan, shards: dict[str, DomainShards], unit: int, start: int = 0, stop: int | None = None,
              s3: storage.S3Settings | None = None, stats: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """A unit's rows at positions [start, stop) (default: to its end), in stage order:
    ``input_ids`` [n, seq_len] int32, ``num_tokens`` [n], ``domain`` [n], ``position`` [n] (in
    the stage's order), and for SFT ``prompt_length`` [n]."""
    stop = plan.unit_rows if stop is None else stop
    count = stop - start
    _CACHE.at_least(2 * plan.unit_rows * plan.seq_len * 4)
    input_ids = np.empty((count, plan.seq_len), dtype=np.int32)
    num_tokens = np.zeros(count, dtype=np.int32)
    prompt_length = np.zeros(count, dtype=np.int32)
    width = max(len(d) for d in plan.composition)
    domains = np.empty(count, dtype=f"<U{width}")
    positions = unit * plan.unit_rows + np.arange(start, stop, dtype=np.int64)
    for domain, mine, shard_ids, rows in unit_rows(plan, shards, unit, start, stop):
        slots = mine - start
        domains[slots] = domain
        for group, selected, in_group in _locate(plan, shards[domain], shard_ids, rows, s3, stats):
            targets = slots[selected]
            if plan.kind == "sft":
                _sft_rows(plan, group.table.take(pa.array(in_group)), positions[targets], targets, input_ids,
                          num_tokens, prompt_length)
            else:
                input_ids[targets] = group.ids[in_group]
                num_tokens[targets] = group.num_tokens[in_group]
    columns = {"input_ids": input_ids, "num_tokens": num_tokens, "domain": domains, "position": positions}
    if plan.kind == "sft":
        columns["prompt_length"] = prompt_length
    return columns


def _sft_rows(plan: StagePlan, table: pa.Table, positions: np.ndarray, slots: np.ndarray,
              input_ids: np.ndarray, num_tokens: np.ndarray, prompt_length: np.ndarray) -> None:
    """Each dialog gives one row per pass: a target turn drawn by (seed, position) among its
    answers; the ids before it (earlier answers included) are the visible prompt, the answer and
    ``<|role_end|>`` the response, then EOS to seq_len (LLADA_SPEC section 4). One row per
    dialog and pass, rather than one per turn, keeps long dialogs from outweighing short ones."""
    eos = plan.eos_id
    dialogs = table.column("input_ids").to_pylist()
    starts, ends = table.column("turn_starts").to_pylist(), table.column("turn_ends").to_pylist()
    for ids, turn_starts, turn_ends, position, slot in zip(dialogs, starts, ends, positions, slots):
        turn = int(np.random.default_rng(_seed(plan.seed, "turn", int(position))).integers(len(turn_ends)))
        end = turn_ends[turn]
        input_ids[slot, :end] = ids[:end]
        input_ids[slot, end:] = eos
        num_tokens[slot], prompt_length[slot] = end + 1, turn_starts[turn]


def worker_pieces(plan: StagePlan, rank: int, world: int, cursor: DataCursor, num_rows: int) -> list[tuple[int, int, int]]:
    """What worker ``rank`` reads for ``num_rows`` rows from its cursor, as (unit, start, stop)
    read tasks in order. Mid-unit (a resume), the first task is one micro-batch, so the rows read
    before the first trained batch are those of one micro-batch (the row groups they live in),
    whatever the position; the rest of that unit is the second task."""
    first, offset = divmod(cursor.rows_consumed, plan.unit_rows)
    pieces, unit_index = [], first
    if offset:
        head = min(offset + cursor.batch_size, plan.unit_rows)
        pieces.append((rank + world * first, offset, head))
        if head < plan.unit_rows:
            pieces.append((rank + world * first, head, plan.unit_rows))
        unit_index += 1
    remaining = num_rows - (plan.unit_rows - offset if offset else 0)
    while remaining > 0:
        pieces.append((rank + world * unit_index, 0, plan.unit_rows))
        unit_index += 1
        remaining -= plan.unit_rows
    return pieces


def _read_pieces(batch: dict[str, np.ndarray], plan_json: dict[str, Any], tasks: list[list[tuple[int, int, int]]],
                 s3_json: str | None) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: the pieces of read task ``tasks[i]`` for each ``i`` in ``batch["id"]``,
    one output batch per piece (Ray Data gathers them into its block)."""
    plan = StagePlan.from_json(plan_json)
    shards = _shard_index(plan.packed_uri, s3_json)
    s3 = storage.S3Settings.model_validate_json(s3_json) if s3_json else None
    for i in batch["id"]:
        for piece in tasks[int(i)]:
            yield read_unit(plan, shards, *piece, s3=s3)


def read_tasks(plan: StagePlan, pieces: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """Pieces grouped into Ray Data read tasks of about TASK_BYTES each. The first piece is a
    task of its own (and on a resume, so is the rest of its unit), so the first batch waits for
    one unit's rows, or one micro-batch's on a resume. Blocks of a few MB cost Ray Data more per
    row than the reading itself: 8 MB blocks moved ~0.6x the rows/s of 32-64 MB blocks into a
    worker actor on this machine (one side-by-side run)."""
    per_task = max(1, TASK_BYTES // (plan.unit_rows * plan.seq_len * 4))
    alone = 2 if pieces and pieces[0][1] != 0 else 1
    tasks = [[piece] for piece in pieces[:alone]]
    rest = pieces[alone:]
    tasks += [rest[start:start + per_task] for start in range(0, len(rest), per_task)]
    return tasks


def worker_dataset(plan: StagePlan, rank: int, world: int, cursor: DataCursor, num_rows: int,
                   s3: storage.S3Settings | None = None) -> Any:
    """The rows worker ``rank`` of ``world`` reads next: ``num_rows`` (or a little more, to the
    end of a unit) from its cursor, as an ordered Ray Dataset of :func:`read_tasks` (a worker's
    share of a 10T-token stage is ~9k pieces: a small list)."""
    import ray.data

    tasks = read_tasks(plan, worker_pieces(plan, rank, world, cursor, max(num_rows, 1)))
    dataset = ray.data.range(len(tasks), override_num_blocks=len(tasks)).map_batches(
        _read_pieces, batch_size=1, batch_format="numpy",
        fn_kwargs={"plan_json": plan.to_json(), "tasks": tasks, "s3_json": s3.model_dump_json() if s3 else None})
    dataset.context.execution_options.preserve_order = True
    return dataset


def to_arrays(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """A batch of rows -> ``input_ids`` [B, L] int64 plus [B] columns; SFT batches also get
    ``loss_mask`` [B, L] (True on response tokens and their EOS padding)."""
    input_ids = np.asarray(batch["input_ids"], dtype=np.int64)  # read_unit makes it [B, L]
    arrays = {"input_ids": input_ids, "num_tokens": np.asarray(batch["num_tokens"], np.int64),
              "position": np.asarray(batch["position"], np.int64), "domain": np.asarray(batch["domain"])}
    if "prompt_length" in batch:
        prompt_length = np.asarray(batch["prompt_length"], np.int64)
        arrays["prompt_length"] = prompt_length
        arrays["loss_mask"] = np.arange(input_ids.shape[1])[None, :] >= prompt_length[:, None]
    return arrays


def iterate_batches(dataset: Any, cursor: DataCursor, world_size: int, batch_size: int,
                    max_rows: int | None = None) -> Iterator[tuple[dict[str, np.ndarray], DataCursor]]:
    """Yield ``(batch, cursor_after_this_batch)`` from a worker's dataset (:func:`worker_dataset`
    built at ``cursor``), ``max_rows`` rows at most. Save the yielded cursor with the checkpoint
    taken after training on that batch.

    Ray Data hands over whole blocks (one read task's rows) and the micro-batches are numpy
    slices of them: asking Ray Data for batches of a few rows costs ~4x the throughput
    (measured into a worker actor, benchmarks/data_scale.py)."""
    cursor.check_compatible(world_size, batch_size)
    position, carry = cursor, None
    for block in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        if carry is not None:
            block = {name: np.concatenate([carry[name], block[name]]) for name in block}
        rows = len(block["position"])
        whole = rows - rows % batch_size
        for start in range(0, whole, batch_size):
            if max_rows is not None and position.rows_consumed - cursor.rows_consumed >= max_rows:
                return
            position = position.advanced(batch_size)
            yield to_arrays({name: column[start:start + batch_size] for name, column in block.items()}), position
        carry = {name: column[whole:] for name, column in block.items()} if whole < rows else None


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
