"""The configuration of one training stage (pretrain, anneal or SFT), validated.

A recipe (the whole run) is a list of these plus run-level settings; a stage can also be run on
its own with ``llada train``. Every field that changes the result is here, and the resolved
config is saved with every checkpoint the stage writes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llada_core.config import LLaDAMoEConfig, preset
from pipelines import storage


class Strict(BaseModel):
    # strict: "16" or true is not an int here (YAML gives real numbers and booleans)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSpec(Strict):
    preset: str
    overrides: dict[str, Any] = Field(default_factory=dict)

    def build_config(self, **stage_overrides: Any) -> LLaDAMoEConfig:
        return preset(self.preset, **{**self.overrides, **stage_overrides})


class OptimizerSpec(Strict):
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.95), strict=False)  # a YAML/JSON list is fine here
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)


class ScheduleSpec(Strict):
    """``warmup_cosine``: linear warmup then cosine to ``min_lr_ratio * lr``.
    ``wsd`` (warmup-stable-decay): warmup, constant, then linear decay over the last
    ``decay_fraction`` of the steps. ``constant``: warmup then constant."""

    kind: Literal["warmup_cosine", "wsd", "constant"] = "warmup_cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    decay_fraction: float = Field(0.1, gt=0, le=1)


class ScalingSpec(Strict):
    num_workers: int = Field(1, ge=1)
    expert_parallel_size: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2] = 0
    use_gpu: bool = False
    # CPUs per worker; None computes them from the cluster, leaving CPU for Ray Data.
    cpus_per_worker: float | None = Field(None, gt=0)
    # Ray Data's read tasks take 1 CPU each; with less left free, ingest waits for ever.
    data_cpus: float = Field(1.0, ge=1.0)
    max_failures: int = Field(1, ge=0)
    # torch intra-op threads per worker; None keeps Ray's setting (one per whole CPU the worker
    # holds). More threads than CPUs pays off on CPU-only runs where Ray Data only streams a
    # stage's already materialised rows and leaves its reserved CPU idle (the tiny-cpu recipe).
    torch_threads: int | None = Field(None, ge=1)
    # Recompute each decoder layer's activations in the backward pass instead of keeping them:
    # the same loss and gradients for about one more forward of compute (llada_core.model). Left
    # out of the config's dump while off, so stages fingerprinted before it existed still match.
    activation_checkpointing: bool = Field(False, exclude_if=lambda on: on is False)

    @model_validator(mode="after")
    def _check(self) -> "ScalingSpec":
        if self.num_workers % self.expert_parallel_size:
            raise ValueError(
                f"scaling.expert_parallel_size: {self.expert_parallel_size} must divide "
                f"scaling.num_workers={self.num_workers}"
            )
        return self


class FaultInjection(Strict):
    """Reliability testing only: crash ``rank`` once at ``step``, at ``point``: right before that
    optimizer step; after that step's checkpoint is in storage but before its completion record;
    or while that checkpoint's files are copied (a write failing as on a full disk)."""

    step: int = Field(ge=1)
    rank: int = Field(0, ge=0)
    point: Literal["before_step", "before_completion_record", "checkpoint_upload"] = "before_step"


class StageConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["pretrain", "anneal", "sft"]
    model: ModelSpec
    data_uri: str  # a stage's data: the folder of its plan (pipelines.prepare.write_stage_plan)
    output_uri: str  # this stage's folder: checkpoints, metrics, plots, records
    tokenizer_uri: str | None = None  # copied into every HF export
    init_from: str | None = None  # an HF-layout checkpoint to start from (fresh optimizer)
    num_steps: int = Field(ge=1)
    micro_batch_size: int = Field(ge=1)  # sequences per worker per micro-step
    grad_accumulation_steps: int = Field(1, ge=1)
    max_seq_len: int | None = Field(None, ge=8)  # SFT cap; longer rows are cut
    rope_theta: float | None = Field(None, gt=0)  # anneal 2 raises it (10k -> 50k)
    max_position_embeddings: int | None = Field(None, ge=8)
    variable_length_prob: float = Field(0.01, ge=0, le=1)
    optimizer: OptimizerSpec
    schedule: ScheduleSpec = ScheduleSpec()
    scaling: ScalingSpec = ScalingSpec()
    # The load-balancing loss over layers: their mean (megablocks/OLMoE) or their sum
    # (llada_core.losses.load_balance_loss); left out of the dump at the default.
    load_balance_layers: Literal["mean", "sum"] = Field("mean", exclude_if=lambda value: value == "mean")
    checkpoint_every: int = Field(ge=1)
    keep_last: int = Field(3, ge=1)
    log_every: int = Field(1, ge=1)
    seed: int = 0
    fault_injection: FaultInjection | None = None

    @field_validator("data_uri", "output_uri", "tokenizer_uri", "init_from")
    @classmethod
    def _absolute(cls, uri: str | None) -> str | None:
        return None if uri is None else absolute_uri(uri)

    @model_validator(mode="after")
    def _check(self) -> "StageConfig":
        config = self.model_config_resolved()  # raises with the field path on a bad model
        if config.num_experts % self.scaling.expert_parallel_size:
            raise ValueError(
                f"scaling.expert_parallel_size: {self.scaling.expert_parallel_size} does not divide "
                f"model num_experts={config.num_experts}"
            )
        if self.schedule.warmup_steps >= self.num_steps and self.schedule.kind != "constant":
            raise ValueError(
                f"schedule.warmup_steps: {self.schedule.warmup_steps} leaves no steps after warmup "
                f"(num_steps={self.num_steps})"
            )
        if self.fault_injection and self.fault_injection.rank >= self.scaling.num_workers:
            raise ValueError("fault_injection.rank: no such worker")
        return self

    def model_config_resolved(self) -> LLaDAMoEConfig:
        """The model config of this stage: preset + overrides + the stage's RoPE / context."""
        stage_overrides: dict[str, Any] = {}
        if self.rope_theta is not None:
            stage_overrides["rope_theta"] = self.rope_theta
        if self.max_position_embeddings is not None:
            stage_overrides["max_position_embeddings"] = self.max_position_embeddings
        try:
            return self.model.build_config(**stage_overrides)
        except ValueError as error:
            raise ValueError(f"model: {error}") from error


def absolute_uri(uri: str) -> str:
    """``storage.absolute`` for a validator: a relative path becomes absolute here, in the
    driver, because Ray Train workers run in another directory."""
    try:
        return storage.absolute(uri)
    except storage.StorageError as error:
        raise ValueError(str(error)) from None


# Fields a stage may change between an interruption and its resume without changing what the
# resumed run computes (with `--accept-changes`): how often it saves and logs, how many
# checkpoints it keeps, how it uses CPUs and retries, and fault injection. Everything else
# (the model, data, batch sizes, steps, optimizer and schedule, the starting checkpoint, the
# number of workers, which fixes how data is split) needs `--restart-stage`.
SAFE_TO_CHANGE = ("checkpoint_every", "keep_last", "log_every", "scaling.max_failures", "scaling.cpus_per_worker",
                  "scaling.data_cpus", "scaling.torch_threads", "scaling.activation_checkpointing", "fault_injection")


def flat_fields(value: Any, prefix: str = "") -> dict[str, Any]:
    """A config dump as dotted paths -> leaf values (lists are leaves)."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flat_fields(item, f"{prefix}{key}."))
        return flat if value else {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): value}


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted paths whose values differ between two StageConfig dumps (``model_dump(mode="json")``)."""
    old_flat, new_flat = flat_fields(old), flat_fields(new)
    return sorted(path for path in old_flat.keys() | new_flat.keys() if old_flat.get(path) != new_flat.get(path))


def is_safe_to_change(path: str) -> bool:
    return any(path == safe or path.startswith(safe + ".") for safe in SAFE_TO_CHANGE)


def config_fingerprint(config: StageConfig) -> str:
    """sha256 of everything in the stage config (recorded in every checkpoint it writes)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]
