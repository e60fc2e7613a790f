"""The Ray Train worker loop of one stage: DeepSpeed engine, masked-diffusion objective, MoE aux
losses, checkpoints with exact resume, per-step metrics.

Legend: B micro-batch, L length, E experts.

The loop reads straight down (CONVENTIONS 4): each iteration first does the occasional work
(checkpoint), then exactly one optimizer step; it runs once more after the last step so the final
state is always saved. Everything resume needs (weights, optimizer, LR schedule, step, tokens
seen, data cursor, metrics so far) is inside the checkpoint.

The platform owns the checkpoints, not Ray: every rank writes its own DeepSpeed files into the
checkpoint folder in storage, rank 0 writes the completion record last (with every file's size
and the config fingerprint), and a starting worker (a rerun, or Ray restarting a failed worker
group) resumes from the newest checkpoint that verifies and loads on every rank, falling back to
older ones and saying why. Ray is only told metrics; its checkpoint bookkeeping holds nothing
that rotation could make stale.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import deepspeed
import numpy as np
import ray.train
import torch
import torch.distributed as dist

from jobs import checkpoints as ckpt
from jobs.training.expert_parallel import enable_expert_parallel, native_state_dict
from jobs.training.metrics import StepMetrics, device_peak_flops, model_flops_per_token, write_training_plot
from jobs.stage_config import StageConfig, config_fingerprint
from llada_core.checkpoint import load_model, save_model
from llada_core.losses import (forward_process, maybe_truncate_length, pretrain_loss_from_hidden,
                               sft_loss_from_hidden, total_loss)
from llada_core.model import LLaDAMoEModelLM
from pipelines import storage
from pipelines.reader import DataCursor, iterate_batches, load_plan, worker_dataset

DEEPSPEED_TAG = "deepspeed"


class InjectedFault(RuntimeError):
    """Raised by ``fault_injection`` (reliability tests)."""


@dataclass
class TrainState:
    step: int = 0
    checkpointed_step: int = 0
    tokens_seen: int = 0
    cursor: DataCursor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def learning_rate_factor(step: int, config: StageConfig) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based)."""
    schedule, total = config.schedule, config.num_steps
    if schedule.warmup_steps and step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.kind == "constant":
        return 1.0
    floor = schedule.min_lr_ratio
    if schedule.kind == "wsd":
        decay_steps = max(1, round(schedule.decay_fraction * total))
        decay_start = total - decay_steps
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - floor) * (step - decay_start + 1) / decay_steps
    progress = (step - schedule.warmup_steps + 1) / max(1, total - schedule.warmup_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def deepspeed_config(config: StageConfig) -> dict[str, Any]:
    scaling = config.scaling
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accumulation_steps,
        "gradient_clipping": config.optimizer.grad_clip,
        "zero_optimization": {"stage": scaling.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW, so no DeepSpeed op build is needed
        "bf16": {"enabled": scaling.use_gpu},
        "steps_per_print": 10**9,
        "checkpoint": {"use_node_local_storage": True},  # each worker saves into its own folder
    }


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms; expert parameters in their own groups (DeepSpeed-MoE + ZeRO)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def build_model(config: StageConfig, s3: storage.S3Settings | None) -> LLaDAMoEModelLM:
    """Fresh weights from the preset, or the ``init_from`` checkpoint with the stage's RoPE and
    context applied (anneal 2 raises them)."""
    torch.manual_seed(config.seed)
    if config.init_from is None:
        return LLaDAMoEModelLM(config.model_config_resolved())
    with storage.local_copy(config.init_from, s3) as source:
        model = load_model(source, dtype=torch.float32)
    # Only what this stage sets changes; otherwise the checkpoint's values carry on (SFT keeps
    # anneal 2's RoPE base and context).
    stage_overrides = {k: getattr(config, k) for k in ("rope_theta", "max_position_embeddings")
                       if getattr(config, k) is not None}
    model.config = model.config.replace(**stage_overrides)
    return model


def restore(engine: Any, config: StageConfig, s3: storage.S3Settings | None, note: Any = print) -> TrainState:
    """The state to continue from: the newest complete checkpoint whose files verify and whose
    DeepSpeed state loads on every rank; a fresh state when the stage has no checkpoint. Each
    skipped checkpoint is reported through ``note`` with the reason."""
    usable, skipped = ckpt.resume_candidates(config.output_uri, s3)
    reasons = [f"step {info.step}: {why}" for info, why in skipped]
    for info in usable:
        loaded = _try_load(engine, info, s3)
        if isinstance(loaded, dict):
            if reasons:
                note(f"[{config.name}] resuming from step {info.step}; not from newer checkpoint(s): {'; '.join(reasons)}")
            return _state_from(loaded)
        reasons.append(f"step {info.step}: {loaded}")
    if reasons:
        raise ckpt.ResumeError(f"stage {config.name}: no checkpoint can be resumed from ({'; '.join(reasons)}); "
                               f"restart the stage (llada run --restart-stage {config.name}) to train it from its start")
    return TrainState()


def _try_load(engine: Any, info: ckpt.CheckpointInfo, s3: storage.S3Settings | None) -> dict[str, Any] | str:
    """The checkpoint's client state when every rank loaded it, else why not (the ranks agree:
    a checkpoint one rank cannot read is used by none)."""
    problem = None
    client_state = None
    try:
        with storage.local_copy(storage.join(info.uri, DEEPSPEED_TAG), s3, prefix="llada-resume-") as folder:
            load_path, client_state = engine.load_checkpoint(folder, tag=DEEPSPEED_TAG)
        if load_path is None:
            problem = "DeepSpeed found no state to load in it"
    except Exception as error:  # a truncated or corrupt file: torch, pickle and zip raise many kinds
        problem = f"its DeepSpeed state does not load ({type(error).__name__}: {str(error)[:200]})"
    if not _all_ranks_agree(engine, problem is None):
        return problem or "another rank could not load its part"
    return client_state or {}


def _all_ranks_agree(engine: Any, ok: bool) -> bool:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], device=engine.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _state_from(client_state: dict[str, Any]) -> TrainState:
    cursor = DataCursor.model_validate(client_state["cursor"]) if client_state.get("cursor") else None
    step = client_state["step"]
    history = [row for row in client_state.get("history", []) if row.get("step", 0) <= step]
    return TrainState(step=step, checkpointed_step=step, tokens_seen=client_state["tokens_seen"], cursor=cursor,
                      history=history + [{"step": step, "resumed_from": step}])


def maybe_inject_fault(config: StageConfig, step: int, rank: int, s3: storage.S3Settings | None,
                       point: str = "before_step") -> None:
    fault = config.fault_injection
    if fault is None or fault.step != step or fault.rank != rank or fault.point != point:
        return
    marker = storage.join(config.output_uri, f"_fault_injected_{point}_{step}")
    if storage.exists(marker, s3):
        return  # once only: the restarted worker trains on
    storage.write_json(marker, {"step": step, "rank": rank, "point": point}, s3)
    if point == "checkpoint_upload":
        raise storage.StorageError(f"cannot write {config.output_uri}: [Errno 28] No space left on device "
                                   "(fault injection)")
    raise InjectedFault(f"fault injection: worker {rank} crashes at step {step} ({point})")


def trim_sft_batch(input_ids: torch.Tensor, maskable: torch.Tensor,
                   num_tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """SFT rows are stored EOS-padded to the shards' seq_len; LLADA_SPEC section 4 pads each
    response with EOS to the *batch's* length. Cut the columns past the batch's longest row
    (its ``num_tokens`` counts prompt, response and one EOS), so every row keeps at least one
    EOS and no step computes on padding that no row needs."""
    length = int(np.max(num_tokens))
    if not 0 < length <= input_ids.shape[1]:
        raise ValueError(f"num_tokens: a row of {length} tokens in a batch of length {input_ids.shape[1]}")
    return input_ids[:, :length], maskable[:, :length]


def train_step(engine: Any, batch: dict[str, np.ndarray], config: StageConfig, generator: torch.Generator) -> dict[str, Any]:
    """One micro-batch: forward process, model, Eq. 2 or Eq. 5 plus aux losses, backward, step."""
    model_config = engine.module.config
    input_ids = torch.from_numpy(batch["input_ids"])
    maskable = torch.from_numpy(batch["loss_mask"]) if config.kind == "sft" else None
    if maskable is not None:
        input_ids, maskable = trim_sft_batch(input_ids, maskable, batch["num_tokens"])
    if config.max_seq_len is not None:
        input_ids = input_ids[:, : config.max_seq_len]
        maskable = maskable[:, : config.max_seq_len] if maskable is not None else None
    if config.kind != "sft":
        input_ids = maybe_truncate_length(input_ids, config.variable_length_prob, generator=generator)
    masked = forward_process(input_ids, model_config.mask_token_id, maskable=maskable, generator=generator)
    # Hidden states, not logits: the losses apply the lm_head only at masked positions.
    out = engine(masked.noisy_ids.to(engine.device), hidden_only=True)
    target = input_ids.to(engine.device)
    masked = type(masked)(masked.noisy_ids, masked.masked.to(engine.device), masked.t.to(engine.device))
    lm_head_VD = engine.module.lm_head.weight
    if config.kind == "sft":
        diffusion = sft_loss_from_hidden(out.hidden_states, lm_head_VD, target, masked, maskable.to(engine.device))
    else:
        diffusion = pretrain_loss_from_hidden(out.hidden_states, lm_head_VD, target, masked)
    terms = total_loss(diffusion, out.router_logits, model_config.num_experts_per_tok,
                       model_config.router_aux_loss_coef, model_config.router_z_loss_coef,
                       load_balance_layers=config.load_balance_layers)
    engine.backward(terms.total)
    engine.step()
    return {"terms": terms, "router_logits": [r.detach() for r in out.router_logits],
            "num_tokens": int(input_ids.numel()), "seq_len": int(input_ids.shape[1])}


def save_checkpoint(engine: Any, model: torch.nn.Module, config: StageConfig, state: TrainState,
                    s3: storage.S3Settings | None, placement: dict[str, int] | None = None) -> None:
    """Every rank stages its DeepSpeed files locally and copies them into the checkpoint folder
    in storage; rank 0 adds the HF export, config and metrics; after a barrier rank 0 writes the
    completion record last, then rotates. The staging folder is removed whatever happens."""
    rank = dist.get_rank()
    ref = ckpt.CheckpointRef.at(config.output_uri, state.step)
    last = state.history[-1] if state.history else {}
    metrics = {"step": state.step, "tokens_seen": state.tokens_seen, "loss": last.get("loss"), **(placement or {})}
    if rank == 0:  # a save of this step that crashed earlier left files: start from an empty folder
        storage.remove_tree(ref.uri, s3)
    dist.barrier()
    folder = Path(tempfile.mkdtemp(prefix="llada-ckpt-"))
    try:
        client_state = {"step": state.step, "tokens_seen": state.tokens_seen,
                        "cursor": state.cursor.model_dump() if state.cursor else None, "history": state.history}
        engine.save_checkpoint(str(folder / DEEPSPEED_TAG), tag=DEEPSPEED_TAG, client_state=client_state)
        native_state = native_state_dict(model)  # a collective when experts are sharded
        if rank == 0:
            export_hf(native_state, engine.module.config, config, folder / ckpt.HF_DIR, s3)
            (folder / "stage_config.json").write_text(config.model_dump_json(indent=2))
            (folder / "metrics.json").write_text(json.dumps(metrics))
        _copy_into_storage(folder, ref, config, rank, s3)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()  # every rank's files are in storage
    ray.train.report(metrics)  # Ray hears the metrics only: the checkpoint is the platform's
    if rank == 0:
        maybe_inject_fault(config, state.step, rank, s3, point="before_completion_record")
        ckpt.write_completion_record(ref, metrics, s3, fingerprint=config_fingerprint(config))
        write_history(config.output_uri, state.history, s3)
        ckpt.rotate_checkpoints(config.output_uri, config.keep_last, s3)


def _copy_into_storage(folder: Path, ref: ckpt.CheckpointRef, config: StageConfig, rank: int,
                       s3: storage.S3Settings | None) -> None:
    """This rank's files into the checkpoint folder; a failed write names the checkpoint."""
    try:
        storage.copy_dir_to(str(folder), ref.uri, s3)
        maybe_inject_fault(config, ref.step, rank, s3, point="checkpoint_upload")  # as if the last write failed
    except storage.StorageError as error:
        raise storage.StorageError(f"checkpoint step {ref.step} of stage {config.name} could not be saved "
                                   f"({error}); its staging folder was removed and the incomplete checkpoint "
                                   "is discarded when the stage resumes") from error


def export_hf(native_state: dict[str, torch.Tensor], model_config: Any, config: StageConfig, folder: Path,
              s3: storage.S3Settings | None) -> None:
    with torch.device("meta"):
        model = LLaDAMoEModelLM(model_config)
    model.load_state_dict({k: v.detach().float().cpu() for k, v in native_state.items()}, assign=True)
    save_model(model, folder)
    if config.tokenizer_uri:
        for file_uri in storage.list_files(config.tokenizer_uri, s3):
            name = file_uri.rstrip("/").rsplit("/", 1)[-1]
            if name != "config.json":
                (folder / name).write_bytes(storage.read_bytes(file_uri, s3))


def write_history(stage_uri: str, history: list[dict[str, Any]], s3: storage.S3Settings | None) -> None:
    text = "".join(json.dumps(row) + "\n" for row in history)
    storage.write_text(storage.join(stage_uri, "metrics.jsonl"), text, s3)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: ``loop_config = {"stage": StageConfig dict, "s3": S3Settings dict|None}``."""
    config = StageConfig.model_validate(loop_config["stage"])
    s3 = storage.S3Settings.model_validate(loop_config["s3"]) if loop_config.get("s3") else None
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if config.scaling.torch_threads is not None:
        torch.set_num_threads(config.scaling.torch_threads)
    deepspeed.init_distributed(dist_backend="nccl" if config.scaling.use_gpu else "gloo", verbose=False)
    placement = worker_placement(world)
    model = enable_expert_parallel(build_model(config, s3), config.scaling.expert_parallel_size)
    model.activation_checkpointing = config.scaling.activation_checkpointing
    # foreach: one fused update over all tensors (torch picks the per-tensor loop on CPU otherwise)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, config.optimizer.weight_decay),
                                  lr=config.optimizer.lr, betas=config.optimizer.betas, eps=config.optimizer.eps,
                                  foreach=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                      config=deepspeed_config(config))
    progress = loop_config.get("progress") if rank == 0 else None
    state = restore(engine, config, s3, note=lambda line: _note(progress, line) if rank == 0 else None)
    cursor = state.cursor or DataCursor(world_size=world, batch_size=config.micro_batch_size)
    peak, _ = device_peak_flops(next(engine.module.parameters()).device, next(engine.module.parameters()).dtype)
    meter = StepMetrics(model_flops_per_token(engine.module.config), peak, world)
    batches = _batch_stream(cursor, rank, world, config, state, s3)
    while True:
        due = state.step % config.checkpoint_every == 0 or state.step == config.num_steps
        if state.step > state.checkpointed_step and due:
            save_checkpoint(engine, model, config, state, s3, placement)
            state.checkpointed_step = state.step
        if state.step >= config.num_steps:
            break
        maybe_inject_fault(config, state.step + 1, rank, s3)
        state = _optimizer_step(engine, batches, config, state, meter, rank, progress)
    if rank == 0:
        write_training_plot(config.output_uri, state.history, s3)


def worker_placement(world: int) -> dict[str, int]:
    """The workers and the Ray nodes they run on, recorded with each checkpoint (a rehearsal on
    several nodes proves its workers spanned them)."""
    node = ray.get_runtime_context().get_node_id()
    nodes = [node] * world
    if dist.is_initialized() and world > 1:
        dist.all_gather_object(nodes, node)
    return {"world_size": world, "nodes": len(set(nodes))}


def _batch_stream(cursor: DataCursor, rank: int, world: int, config: StageConfig, state: TrainState,
                  s3: storage.S3Settings | None) -> Iterator[tuple[dict[str, np.ndarray], DataCursor]]:
    """This worker's batches from its cursor to the end of the stage (pipelines/reader.py):
    the rows it still needs, streamed by Ray Data from the packed shards."""
    plan = load_plan(config.data_uri, s3)
    rows = (config.num_steps - state.step) * config.grad_accumulation_steps * config.micro_batch_size
    dataset = worker_dataset(plan, rank, world, cursor, rows, s3)
    return iterate_batches(dataset, cursor, world, config.micro_batch_size, rows)


def _optimizer_step(engine: Any, batches: Any, config: StageConfig, state: TrainState, meter: StepMetrics,
                    rank: int, progress: Any = None) -> TrainState:
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + state.step * 1009 + rank)
    results = []
    for _ in range(config.grad_accumulation_steps):
        batch, state.cursor = next(batches)
        results.append(train_step(engine, batch, config, generator))
    row = meter.summarise(results, time.perf_counter() - started, state.step + 1,
                          engine.get_lr()[0], engine.module.config.num_experts_per_tok)
    state.step += 1
    state.tokens_seen += row["tokens"]
    row["tokens_seen"] = state.tokens_seen
    state.history.append(row)
    if rank == 0 and (state.step % config.log_every == 0 or state.step == config.num_steps):
        if progress is not None:  # the driver's console shows it (jobs.training.stage.progress_relay)
            report_progress(progress, {**row, "stage": config.name, "num_steps": config.num_steps})
        else:
            print(meter.progress_line(row, config.num_steps, config.name), flush=True)
    return state


def _note(progress: Any, line: str) -> None:
    """A line for the driver's console (through the progress queue when there is one)."""
    if progress is not None:
        report_progress(progress, {"note": line})
    else:
        print(line, flush=True)


def report_progress(queue: Any, row: dict[str, Any]) -> None:
    """Best-effort: a driver that went away must not stop training."""
    try:
        queue.put_nowait({k: v for k, v in row.items() if not isinstance(v, list)})
    except Exception:
        pass
