"""Driver side of a stage: size the workers, build the Ray Train ``TorchTrainer``, run it.

The same call runs on a laptop (local Ray, local folder) and on a cluster (S3 storage, GPUs).
Rerunning a stage with the same ``output_uri`` resumes from its newest checkpoint that verifies
(jobs/checkpoints.py, jobs/training/loop.py restore): the platform picks it, not Ray. Ray Train's
own run folder (``ray-train/`` beside ``checkpoints/``) holds no checkpoint.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from jobs import checkpoints as ckpt
from jobs.training import scale_up
from jobs.stage_config import StageConfig
from pipelines import storage
from pipelines.reader import DataError, load_plan, train_worker_resources


@dataclass(frozen=True)
class StageRunResult:
    config: StageConfig
    checkpoints: list[ckpt.CheckpointInfo]  # complete ones, oldest first
    history_uri: str
    plot_uri: str


def worker_resources(config: StageConfig, cluster: dict[str, float]) -> dict[str, float]:
    """Resources per Train worker, leaving CPU for Ray Data; fails fast when impossible."""
    scaling = config.scaling
    if scaling.use_gpu and cluster.get("GPU", 0) < scaling.num_workers:
        raise DataError(
            f"scaling.use_gpu: {scaling.num_workers} GPU workers requested but the cluster has "
            f"{cluster.get('GPU', 0):g} GPUs")
    if scaling.cpus_per_worker is not None:
        needed = scaling.cpus_per_worker * scaling.num_workers + scaling.data_cpus
        if needed > cluster.get("CPU", 0):
            raise DataError(
                f"scaling.cpus_per_worker: {scaling.num_workers} x {scaling.cpus_per_worker:g} CPUs plus "
                f"{scaling.data_cpus:g} for Ray Data exceeds the cluster's {cluster.get('CPU', 0):g} CPUs")
        resources = {"CPU": scaling.cpus_per_worker}
    else:
        resources = train_worker_resources(scaling.num_workers, cluster.get("CPU", 0), scaling.data_cpus)
    if scaling.use_gpu:
        resources["GPU"] = 1.0
    return resources


StepCallback = Callable[[dict[str, Any]], None]
# Ray Train's run folder inside the stage folder: Ray keeps its state there, the platform keeps
# checkpoints in checkpoints/ (workers report metrics only, so Ray's state lists no checkpoint).
RAY_RUN_DIR = "ray-train"


def build_trainer(config: StageConfig, resources: dict[str, float], s3: storage.S3Settings | None = None,
                  progress_queue: Any = None) -> Any:
    """The stage's ``TorchTrainer`` with ``resources`` per worker (Ray must be up); rank 0 puts
    a row per optimizer step into ``progress_queue`` (a ray.util.queue.Queue) when given."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.training.loop import train_loop_per_worker

    load_plan(config.data_uri, s3)  # a stage without prepared data fails here, before any worker starts
    filesystem, root = storage.filesystem(config.output_uri, s3)
    if not storage.is_remote(config.output_uri):
        filesystem = None  # a plain path lets Ray Train use its local storage path directly
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"stage": config.model_dump(mode="json"), "s3": s3.model_dump(mode="json") if s3 else None,
                           "progress": progress_queue},
        scaling_config=ScalingConfig(num_workers=config.scaling.num_workers, use_gpu=config.scaling.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if config.scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=RAY_RUN_DIR, storage_path=root, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=config.scaling.max_failures),
        ),
    )  # no datasets: each worker streams its own part of the stage (pipelines/reader.py)


def run_stage(config: StageConfig, s3: storage.S3Settings | None = None,
              on_step: StepCallback | None = None) -> StageRunResult:
    """Train one stage to ``num_steps`` (resuming if it has checkpoints) and return its checkpoints.
    On an autoscaling cluster (``LLADA_SCALE_UP_TIMEOUT_S`` set) the cluster grows to the stage first.
    ``on_step`` gets each optimizer step's row (``stage``, ``step``, ``num_steps``, ``loss``,
    ``tokens_per_s``, ...) in this process while the stage trains."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    prepare_resume(config, s3, on_step or (lambda row: print(row["note"], flush=True)))
    with scale_up.scaled_up(config.scaling, scale_up.timeout_from_env()) as cluster:
        with progress_relay(on_step) as queue:
            build_trainer(config, worker_resources(config, cluster), s3, queue).fit()
    return StageRunResult(
        config=config,
        checkpoints=ckpt.list_checkpoints(config.output_uri, s3),
        history_uri=storage.join(config.output_uri, "metrics.jsonl"),
        plot_uri=storage.join(config.output_uri, "training.png"),
    )


def prepare_resume(config: StageConfig, s3: storage.S3Settings | None, note: StepCallback) -> None:
    """Before the workers start: discard checkpoints whose save never finished (never
    half-used; the stage writes them again), name the complete ones whose files do not verify,
    and fail here when the stage has checkpoints but none to resume from."""
    for ref in ckpt.incomplete_checkpoints(config.output_uri, s3):
        note({"note": f"[{config.name}] discarding checkpoint step {ref.step}: it has no completion record "
                      "(its save was interrupted)"})
        storage.remove_tree(ref.uri, s3)
    usable, skipped = ckpt.resume_candidates(config.output_uri, s3)
    for info, why in skipped:
        note({"note": f"[{config.name}] checkpoint step {info.step} cannot be resumed from: {why}"})
    if skipped and not usable:
        raise ckpt.ResumeError(f"stage {config.name}: no checkpoint can be resumed from (see above); restart the "
                               f"stage (llada run --restart-stage {config.name}) to train it from its start")
    if usable:
        note({"note": f"[{config.name}] resuming from step {usable[0].step}"})


@contextlib.contextmanager
def progress_relay(on_step: StepCallback | None, poll_s: float = 0.5) -> Iterator[Any]:
    """A queue the rank-0 worker puts step rows into, drained into ``on_step`` by a thread of
    this process (None without ``on_step``). A Ray queue rather than the workers' stdout: the
    rows arrive whatever happens to logs, and no line is printed twice."""
    if on_step is None:
        yield None
        return
    from queue import Empty

    from ray.util.queue import Queue

    queue = Queue(actor_options={"num_cpus": 0})
    stop = threading.Event()

    def drain() -> None:
        while True:
            try:
                on_step(queue.get(timeout=poll_s))
            except Empty:
                if stop.is_set():
                    return
            except Exception:  # a dead queue actor must not kill the stage; progress is best-effort
                if stop.is_set():
                    return
                stop.wait(poll_s)

    thread = threading.Thread(target=drain, name="llada-progress", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        stop.set()
        thread.join(timeout=10)
        queue.shutdown()


def read_history(stage_uri: str, s3: storage.S3Settings | None = None) -> list[dict[str, Any]]:
    import json

    uri = storage.join(stage_uri, "metrics.jsonl")
    if not storage.exists(uri, s3):
        return []
    return [json.loads(line) for line in storage.read_text(uri, s3).splitlines() if line.strip()]
