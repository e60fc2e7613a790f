"""`llada plan RECIPE`: what each stage of a recipe will do, on what and for how long, and every
problem that would stop it later, found before anything trains.

Per stage: kind, mixture, tokens, rows, passes over each domain (once the data is prepared),
row length, RoPE base, micro / global batch, optimizer steps, checkpoints, selection rule,
init_from, model FLOPs and GPU-hours at a stated MFU on a named GPU's dense bf16 peak. The
FLOPs are the training loop's own (jobs/training/metrics.model_flops_per_token), so the plan's
estimate and the MFU the training log reports use one definition.

Checks, all of them (the exit status names every problem, not the first): each data source is
listed (files and bytes, on S3 or local), the tokenizer exists, each stage's config builds
(steps, warmup, context), the parallel layout fits the GPUs (``--gpus N``) and the experts, and
each eval task's files exist.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from jobs.training.metrics import GPU_PEAK_FLOPS
from pipelines import storage

DEFAULT_MFU = 0.35


@dataclass
class StagePlan:
    name: str
    kind: str
    mixture: dict[str, float]
    tokens: int
    seq_len: int
    rows: int
    rope_theta: float
    micro_batch: int
    global_batch_rows: int
    steps: int
    checkpoints: int
    select: str
    init_from: str | None
    workers: int
    expert_parallel: int
    flops: float
    gpu_hours: dict[str, float]
    passes: dict[str, float] | None = None


@dataclass
class Plan:
    recipe: str
    mfu: float
    gpus: int | None
    gpus_from: str = "--gpus"  # or "the connected cluster"
    stages: list[StagePlan] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def plan_recipe(recipe: Any, s3: storage.S3Settings | None = None, gpus: int | None = None,
                mfu: float = DEFAULT_MFU, gpus_from: str = "--gpus") -> Plan:
    """Everything `llada plan` prints, with every problem found. ``gpus``: the GPUs the layout
    must fit (``gpus_from`` says where the number came from, for the messages)."""
    from jobs.dag import check_eval_sources
    from jobs.training.metrics import model_flops_per_token

    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu: must be in (0, 1], got {mfu}")
    plan = Plan(recipe=recipe.run_id, mfu=mfu, gpus=gpus, gpus_from=gpus_from)
    _check_sources(recipe, s3, plan)
    try:
        check_eval_sources(recipe, s3)
    except (ValueError, storage.StorageError) as error:
        plan.problems.append(str(error))
    for stage in recipe.stages:
        try:
            config = recipe.stage_config(stage.name, data_uri="-", output_uri=recipe.stage_uri(stage.name))
            model = config.model_config_resolved()
        except ValueError as error:
            plan.problems.append(f"stages.{stage.name}: {' '.join(str(error).split())}")
            continue
        scaling = config.scaling
        seq_len = recipe.seq_len_of(stage.name)
        global_rows = config.micro_batch_size * config.grad_accumulation_steps * scaling.num_workers
        tokens = config.num_steps * global_rows * seq_len
        fixed, per_length = model_flops_per_token(model)
        flops = tokens * (fixed + per_length * seq_len)
        hours = {gpu: flops / (mfu * peak) / 3600 for gpu, peak in GPU_PEAK_FLOPS.items()}
        plan.stages.append(StagePlan(
            name=stage.name, kind=stage.kind, mixture=dict(stage.mixture.weights), tokens=tokens, seq_len=seq_len,
            rows=config.num_steps * global_rows, rope_theta=model.rope_theta, micro_batch=config.micro_batch_size,
            global_batch_rows=global_rows, steps=config.num_steps,
            checkpoints=math.ceil(config.num_steps / config.checkpoint_every), select=stage.select,
            init_from=stage.init_from, workers=scaling.num_workers, expert_parallel=scaling.expert_parallel_size,
            flops=flops, gpu_hours=hours if scaling.use_gpu else {}, passes=_passes(recipe, stage.name, s3)))
        _check_layout(stage.name, scaling, model, gpus, plan)
    return plan


def _check_sources(recipe: Any, s3: storage.S3Settings | None, plan: Plan) -> None:
    data = recipe.data
    if data.demo:
        plan.sources.append({"uri": "demo corpus (built in)", "files": None, "bytes": None})
        return
    for index, source in enumerate(data.sources):
        try:
            files = storage.list_files(source.uri, s3)
        except (storage.StorageError, OSError) as error:
            plan.problems.append(f"data.sources.{index}: cannot list {source.uri} ({' '.join(str(error).split())[:200]})")
            continue
        if not files:
            plan.problems.append(f"data.sources.{index}: no file matches {source.uri}")
            continue
        plan.sources.append({"uri": source.uri, "domain": source.domain, "files": len(files),
                             "bytes": _total_bytes(files, s3)})
    if data.tokenizer_uri is not None:
        try:
            if not storage.list_files(data.tokenizer_uri, s3):
                plan.problems.append(f"data.tokenizer_uri: nothing at {data.tokenizer_uri}")
        except (storage.StorageError, OSError) as error:
            plan.problems.append(f"data.tokenizer_uri: cannot list {data.tokenizer_uri} "
                                 f"({' '.join(str(error).split())[:200]})")


def _total_bytes(files: list[str], s3: storage.S3Settings | None) -> int:
    filesystem, _ = storage.filesystem(files[0], s3)  # one store: the files of one source
    return sum(info.size or 0 for info in filesystem.get_file_info([storage.parse_uri(uri).path for uri in files]))


def _passes(recipe: Any, name: str, s3: storage.S3Settings | None) -> dict[str, float] | None:
    """Passes over each domain, from the stage's data plan once `llada data prepare` wrote it."""
    uri = storage.join(recipe.data_uri(), "stages", name, "stage.json")
    try:
        return storage.read_json(uri, s3).get("passes") if storage.exists(uri, s3) else None
    except (storage.StorageError, OSError, ValueError):
        return None


def _check_layout(name: str, scaling: Any, model: Any, gpus: int | None, plan: Plan) -> None:
    ep = scaling.expert_parallel_size
    if scaling.num_workers % ep:
        plan.problems.append(f"stages.{name}: {scaling.num_workers} workers do not split into expert-parallel "
                             f"groups of {ep}")
    if model.num_experts % ep:
        plan.problems.append(f"stages.{name}: {model.num_experts} experts do not split over expert_parallel_size {ep}")
    if gpus is not None and scaling.use_gpu and scaling.num_workers > gpus:
        where = (f"--gpus is {gpus}" if plan.gpus_from == "--gpus" else
                 f"{plan.gpus_from} has {gpus} (an autoscaling cluster grows to a stage: give --gpus with its "
                 "largest size)")
        plan.problems.append(f"stages.{name}: needs {scaling.num_workers} GPUs (one per worker), {where}")


def connected_gpus(address: str) -> int:
    """The GPUs of the Ray cluster at ``address`` (connected for the count, then left), or of the
    Ray this process is already connected to."""
    import ray

    if ray.is_initialized():
        return int(ray.cluster_resources().get("GPU", 0))
    ray.init(address=address, log_to_driver=False)
    try:
        return int(ray.cluster_resources().get("GPU", 0))
    finally:
        ray.shutdown()


def render(plan: Plan) -> str:
    """The plan as text: sources, a table per stage, totals and the problems."""
    lines = [f"plan of {plan.recipe}: GPU-hours at MFU {plan.mfu:.0%} of each GPU's dense bf16 peak "
             f"({', '.join(f'{gpu} {peak / 1e12:.0f} TFLOP/s' for gpu, peak in GPU_PEAK_FLOPS.items())})", ""]
    for source in plan.sources:
        size = "" if source["bytes"] is None else f": {source['files']} file(s), {source['bytes'] / 1e9:.3g} GB"
        lines.append(f"data {source.get('domain', '')} {source['uri']}{size}".replace("data  ", "data "))
    for stage in plan.stages:
        passes = ", ".join(f"{d} {p:.2f}" for d, p in stage.passes.items()) if stage.passes else \
            "- (known after `llada data prepare`)"
        hours = ", ".join(f"{gpu} {h:,.0f}" for gpu, h in stage.gpu_hours.items()) or "- (CPU stage)"
        rows = [
            ("kind / select", f"{stage.kind} / {stage.select}"),
            ("init_from", stage.init_from or "- (fresh model)"),
            ("mixture", ", ".join(f"{d} {w:g}" for d, w in stage.mixture.items())),
            ("tokens", f"{stage.tokens:,} ({stage.tokens:.3g})"),
            ("rows x seq_len", f"{stage.rows:,} x {stage.seq_len}"),
            ("passes per domain", passes),
            ("RoPE base", f"{stage.rope_theta:g}"),
            ("batch", f"micro {stage.micro_batch}, global {stage.global_batch_rows} rows on {stage.workers} workers "
                      f"(expert parallel {stage.expert_parallel})"),
            ("optimizer steps", f"{stage.steps:,}"),
            ("checkpoints", f"{stage.checkpoints:,}"),
            ("model FLOPs", f"{stage.flops:.3g}"),
            ("GPU-hours", hours),
        ]
        lines += ["", f"stage {stage.name}"] + [f"  {key:<18} {value}" for key, value in rows]
    totals = {gpu: sum(stage.gpu_hours.get(gpu, 0.0) for stage in plan.stages) for gpu in GPU_PEAK_FLOPS}
    if any(totals.values()):
        lines += ["", "total GPU-hours: " + ", ".join(f"{gpu} {h:,.0f}" for gpu, h in totals.items())]
    if plan.problems:
        lines += ["", f"{len(plan.problems)} problem(s):"] + [f"  - {problem}" for problem in plan.problems]
    else:
        lines += ["", "no problems found"]
    return "\n".join(lines)
