"""Driver side of a stage: size the workers, build the Ray Train ``TorchTrainer``, run it.

The same call runs on a laptop (local Ray, local folder) and on a cluster (S3 storage, GPUs).
Rerunning a stage with the same ``output_uri`` resumes from its latest checkpoint: Ray Train
restores a run with the same name and storage path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobs import checkpoints as ckpt
from jobs.training import scale_up
from jobs.stage_config import StageConfig
from pipelines import storage
from pipelines.reader import DataError, ingest_execution_options, stage_dataset, train_worker_resources


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


def build_trainer(config: StageConfig, resources: dict[str, float], s3: storage.S3Settings | None = None) -> Any:
    """The stage's ``TorchTrainer`` with ``resources`` per worker (Ray must be up)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.training.loop import train_loop_per_worker

    dataset = stage_dataset(config.data_uri, s3)
    filesystem, root = storage.filesystem(config.output_uri, s3)
    if not storage.is_remote(config.output_uri):
        filesystem = None  # a plain path lets Ray Train use its local storage path directly
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"stage": config.model_dump(mode="json"), "s3": s3.model_dump(mode="json") if s3 else None},
        scaling_config=ScalingConfig(num_workers=config.scaling.num_workers, use_gpu=config.scaling.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if config.scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=ckpt.CHECKPOINTS_DIR, storage_path=root, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=config.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # rotation is ours: it spares selections
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=ingest_execution_options()),
    )


def run_stage(config: StageConfig, s3: storage.S3Settings | None = None) -> StageRunResult:
    """Train one stage to ``num_steps`` (resuming if it has checkpoints) and return its checkpoints.
    On an autoscaling cluster (``LLADA_SCALE_UP_TIMEOUT_S`` set) the cluster grows to the stage first."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    with scale_up.scaled_up(config.scaling, scale_up.timeout_from_env()) as cluster:
        build_trainer(config, worker_resources(config, cluster), s3).fit()
    return StageRunResult(
        config=config,
        checkpoints=ckpt.list_checkpoints(config.output_uri, s3),
        history_uri=storage.join(config.output_uri, "metrics.jsonl"),
        plot_uri=storage.join(config.output_uri, "training.png"),
    )


def read_history(stage_uri: str, s3: storage.S3Settings | None = None) -> list[dict[str, Any]]:
    import json

    uri = storage.join(stage_uri, "metrics.jsonl")
    if not storage.exists(uri, s3):
        return []
    return [json.loads(line) for line in storage.read_text(uri, s3).splitlines() if line.strip()]
