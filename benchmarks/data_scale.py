"""Data at the paper's scale: planning, resuming and reading a stage without copying it.

    .venv/bin/python benchmarks/data_scale.py            # ~45 s on 2 cores

1. Planning (pipelines.mixture.plan_stage after loading the packed set's shard index) for stages
   of 1e6, 1e8 and 2.4e9 rows (pretrain 1 of jobs/recipes/llada-moe-7b-a1b.yaml: 10T tokens at
   4096), on synthetic shard indexes of 4096-row shards in three domains. Each size runs in a
   fresh process: wall time and the process's peak memory added (ru_maxrss) are reported.
2. Resuming at row 2e9 of the 2.4e9-row stage: the shard index is virtual (586k shard entries
   that reuse a few real shard files), a reader as one of 64 workers is placed at that position
   and reads its next unit; the rows it reads before its first batch are counted.
3. Reading: rows/s of the platform's reader into a Train-worker-like Ray actor (worker_dataset
   + iterate_batches, the path the training loop takes) and of the same reader in one process,
   against plain pyarrow reading the same shards into numpy, side by side in one run.

Ends with one JSON line: plan_s_10T, plan_mb_10T, resume_rows_read_at_2e9, rows_per_s_read,
rows_per_s_pyarrow, read_ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARD_ROWS = 4096
WEIGHTS = {"text": 0.7, "math": 0.15, "code": 0.15}


def write_shard_index(folder: Path, num_shards: int, real_paths: list[str] | None = None) -> None:
    """A shards.parquet of ``num_shards`` 4096-row shards over three domains (paths cycle over
    ``real_paths`` when given: a virtual index standing on a few real files)."""
    domains = np.array(list(WEIGHTS))[np.arange(num_shards) % 3]
    if real_paths:
        paths = np.array(real_paths, dtype=object)[np.arange(num_shards) % len(real_paths)]
    else:
        paths = np.char.add("shards/", np.arange(num_shards).astype(str))
    table = pa.table({"path": pa.array(paths.tolist(), pa.string()), "domain": pa.array(domains.tolist(), pa.string()),
                      "kind": pa.array(["pretrain"] * num_shards), "rows": pa.array(np.full(num_shards, SHARD_ROWS)),
                      "tokens": pa.array(np.full(num_shards, SHARD_ROWS * 4096))})
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "shards.parquet")


def manifest(seq_len: int) -> dict:
    return {"seq_len": seq_len, "row_group_rows": 256, "tokenizer": {"eos": 0},
            "domains": {d: {"kind": "pretrain"} for d in WEIGHTS}}


def plan_once(folder: str, rows: int) -> None:
    """Child process: load the index, plan, print {plan_s, mb_added}."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from pipelines.mixture import MixtureSpec, plan_stage
    from pipelines.pack import load_shard_index

    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    shards = load_shard_index(folder)
    plan = plan_stage(folder, manifest(4096), shards, MixtureSpec(weights=WEIGHTS, token_budget=rows * 4096))
    plan.to_json()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": rows, "plan_s": round(seconds, 3), "mb_added": round((peak - imported) / 1024, 1),
                      "import_mb": round((imported - base) / 1024, 1), "num_sequences": plan.num_sequences}))


def planning(work: Path) -> dict[int, dict]:
    results = {}
    for rows in (10**6, 10**8, 2_400_000_000):
        folder = work / f"index-{rows}"
        write_shard_index(folder, -(-rows // SHARD_ROWS))
        out = subprocess.run([sys.executable, __file__, "--plan-child", str(folder), str(rows)], capture_output=True,
                             text=True, check=True, cwd=ROOT)
        results[rows] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps({"planning": results[rows]}), flush=True)
    return results


def real_shards(folder: Path, count: int, seq_len: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        ids = rng.integers(5, 4096, (SHARD_ROWS, seq_len), dtype=np.int32)
        table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), seq_len)
                          .cast(pa.list_(pa.int32())), "num_tokens": pa.array(np.full(SHARD_ROWS, seq_len, np.int32)),
                          "domain": pa.array([list(WEIGHTS)[i % 3]] * SHARD_ROWS)})
        path = f"shards/{i:05d}.parquet"
        (folder / "shards").mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=256)
        (folder / path).write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def resuming(work: Path) -> dict:
    from pipelines.mixture import MixtureSpec, plan_stage
    from pipelines.pack import load_shard_index
    from pipelines.reader import DataCursor, clear_row_group_cache, read_unit, worker_pieces

    folder = work / "virtual"
    real = real_shards(folder, 6, 64)  # each domain: two real files behind ~195k virtual shards
    write_shard_index(folder, -(-2_400_000_000 // SHARD_ROWS), real)
    shards = load_shard_index(str(folder))
    plan = plan_stage(str(folder), manifest(64), shards, MixtureSpec(weights=WEIGHTS, token_budget=2_400_000_000 * 64))
    world, batch = 64, 4  # pretrain 1 of the 7B recipe: 64 workers, micro-batch 4
    # Worker 17 has consumed 2e9 / 64 rows plus a few batches: mid-unit, near row 2e9 of the stage.
    cursor = DataCursor(world_size=world, batch_size=batch, rows_consumed=2_000_000_000 // world + 1234 * batch)
    clear_row_group_cache()
    stats: dict[str, int] = {}
    started = time.perf_counter()
    pieces = worker_pieces(plan, 17, world, cursor, 10 * plan.unit_rows)
    rows = read_unit(plan, shards, *pieces[0], stats=stats)  # the first Ray Data task: the first batch's rows
    seconds = time.perf_counter() - started
    result = {"world": world, "micro_batch": batch, "stage_position": pieces[0][0] * plan.unit_rows + pieces[0][1],
              "rows_in_first_task": len(rows["position"]), "rows_read": stats.get("rows_read", 0),
              "row_groups_read": stats.get("row_groups_read", 0), "shard_rows": SHARD_ROWS,
              "seconds_to_first_rows": round(seconds, 3)}
    print(json.dumps({"resume": result}), flush=True)
    return result


def reading(work: Path, seq_len: int, num_shards: int, passes: int) -> dict:
    import ray

    from pipelines.mixture import MixtureSpec, plan_stage
    from pipelines.pack import load_shard_index, write_shard_index as write_index
    from pipelines.reader import DataCursor, clear_row_group_cache, iterate_batches, read_unit, worker_dataset

    folder = work / "real"
    paths = real_shards(folder, num_shards, seq_len)
    write_index(str(folder), [{"path": p, "domain": list(WEIGHTS)[i % 3], "kind": "pretrain", "rows": SHARD_ROWS,
                               "tokens": SHARD_ROWS * seq_len} for i, p in enumerate(paths)])
    total = num_shards * SHARD_ROWS * passes  # rows read: the reader's stage spans several passes over the set

    started = time.perf_counter()  # plain pyarrow: every shard into a [rows, seq_len] array, its fastest idiom
    for path in paths * passes:
        column = pq.read_table(folder / path, columns=["input_ids", "num_tokens"]).column("input_ids")
        pc.list_flatten(column).to_numpy().reshape(-1, seq_len)
    pyarrow_rps = total / (time.perf_counter() - started)

    shards = load_shard_index(str(folder))
    spec = MixtureSpec(weights={d: 1.0 for d in WEIGHTS}, token_budget=total * seq_len)
    plan = plan_stage(str(folder), manifest(seq_len), shards, spec)
    units = total // plan.unit_rows
    clear_row_group_cache()
    started = time.perf_counter()
    count = sum(len(read_unit(plan, shards, unit)["position"]) for unit in range(units))
    in_process_rps = count / (time.perf_counter() - started)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False

    @ray.remote(num_cpus=1)
    class Worker:  # stands where a Train worker stands: iterating its batches
        def read(self, plan_json: dict, rows: int) -> tuple[int, float, float]:
            from pipelines.mixture import StagePlan

            cursor = DataCursor(world_size=1, batch_size=16)
            started = time.perf_counter()
            dataset = worker_dataset(StagePlan.from_json(plan_json), 0, 1, cursor, rows)
            count, first = 0, None
            for batch, _ in iterate_batches(dataset, cursor, 1, 16, rows):
                first = time.perf_counter() - started if first is None else first
                count += len(batch["position"])
            return count, time.perf_counter() - started, first

        def ceiling(self, plan_json: dict, rows: int) -> float:
            """Rows/s of the same Ray Data pipeline (tasks, blocks, batches) whose tasks return
            a block made in advance: what Ray Data itself can move into this worker."""
            from pipelines.mixture import StagePlan
            from pipelines.reader import read_tasks, worker_pieces

            plan = StagePlan.from_json(plan_json)
            cursor = DataCursor(world_size=1, batch_size=16)
            tasks = read_tasks(plan, worker_pieces(plan, 0, 1, cursor, rows))
            block = {"input_ids": np.ones((plan.unit_rows, plan.seq_len), np.int32),
                     "num_tokens": np.ones(plan.unit_rows, np.int32), "domain": np.array(["text"] * plan.unit_rows),
                     "position": np.arange(plan.unit_rows)}

            def made(batch: dict, tasks: list) -> Any:
                for _ in tasks[int(batch["id"][0])]:
                    yield block

            started = time.perf_counter()
            dataset = ray.data.range(len(tasks), override_num_blocks=len(tasks)).map_batches(
                made, batch_size=1, batch_format="numpy", fn_kwargs={"tasks": tasks})
            dataset.context.execution_options.preserve_order = True
            count = sum(len(batch["position"]) for batch, _ in iterate_batches(dataset, cursor, 1, 16, rows))
            return count / (time.perf_counter() - started)

    worker = Worker.remote()
    ray.get(worker.read.remote(plan.to_json(), plan.unit_rows))  # warm-up: worker processes and imports
    clear_row_group_cache()
    count, seconds, first_batch = ray.get(worker.read.remote(plan.to_json(), total))
    ceiling_rps = ray.get(worker.ceiling.remote(plan.to_json(), total))
    ray.shutdown()
    result = {"seq_len": seq_len, "rows": total, "seconds_to_first_batch": round(first_batch, 3),
              "pyarrow_rows_per_s": round(pyarrow_rps),
              "reader_in_process_rows_per_s": round(in_process_rps), "reader_into_worker_rows_per_s": round(count / seconds),
              "ratio_into_worker": round(count / seconds / pyarrow_rps, 3),
              "ratio_in_process": round(in_process_rps / pyarrow_rps, 3),
              "ray_data_ceiling_rows_per_s": round(ceiling_rps),
              "ratio_ceiling": round(ceiling_rps / pyarrow_rps, 3)}
    print(json.dumps({"reading": result}), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan-child", nargs=2, metavar=("FOLDER", "ROWS"), help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=512, help="row length of the read benchmark's shards")
    parser.add_argument("--shards", type=int, default=12, help="4096-row shards in the read benchmark")
    parser.add_argument("--passes", type=int, default=4, help="passes over those shards that the read benchmark reads")
    args = parser.parse_args()
    if args.plan_child:
        plan_once(args.plan_child[0], int(args.plan_child[1]))
        return 0
    with tempfile.TemporaryDirectory(prefix="llada-data-scale-") as temporary:
        work = Path(temporary)
        plans = planning(work)
        resume = resuming(work)
        read = reading(work, args.seq_len, args.shards, args.passes)
    big = plans[2_400_000_000]
    print(json.dumps({"plan_s_10T": big["plan_s"], "plan_mb_10T": big["mb_added"],
                      "resume_rows_read_at_2e9": resume["rows_read"], "shard_rows": SHARD_ROWS,
                      "seconds_to_first_batch": read["seconds_to_first_batch"],
                      "rows_per_s_read": read["reader_into_worker_rows_per_s"],
                      "rows_per_s_pyarrow": read["pyarrow_rows_per_s"], "read_ratio": read["ratio_into_worker"],
                      "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
