"""The serve configuration: one strict pydantic model, loaded from YAML, embeddable in a recipe.

    llada serve --checkpoint ./runs/tiny-cpu/stages/sft/checkpoints/checkpoint_000800/hf --config serve.yaml

A ``ServeConfig`` says how to serve (sampling defaults, request limits, batching, autoscaling,
backpressure, replica resources, API key); *what* to serve (the checkpoint URI) is given beside
it in :class:`AppArgs`, so a recipe can embed a ``serve:`` block and hand the selected
checkpoint in at deploy time. Every field has a default: an empty YAML file is a valid config
that serves on 127.0.0.1:8000 with one CPU (or GPU, where the cluster has one) replica.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llada_core.options import FAST_OPTIONS, SamplingOptions
from pipelines import storage
from pipelines.storage import S3Settings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingDefaults(_Strict):
    """How a request is sampled when it does not say (LLADA_SPEC section 6); the fields of
    :class:`llada_core.options.SamplingOptions` the server takes from requests, with
    ``max_tokens`` in place of gen_length (rounded up to whole blocks) and ``steps_per_block``
    in place of steps: ``null`` means one commit per step (steps = generated length), the
    reference setting. The defaults here are the measured fast options
    (``llada_core.options.FAST_OPTIONS``: threshold 0.9, dual cache, early stop); set them to
    null / false for the reference loop.
    """

    max_tokens: int = Field(64, ge=1)
    steps_per_block: int | None = Field(None, ge=1)
    block_length: int = Field(32, ge=1)
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    temperature: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    cfg_scale: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    threshold: float | None = Field(FAST_OPTIONS["threshold"], gt=0.0, le=1.0)
    cache: Literal["prefix", "dual"] | None = FAST_OPTIONS["cache"]
    early_stop: bool = FAST_OPTIONS["early_stop"]
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False

    @model_validator(mode="after")
    def _check(self) -> "SamplingDefaults":
        """The defaults must make a valid SamplingOptions for a one-block answer."""
        steps = self.block_length if self.steps_per_block is None else min(self.block_length, self.steps_per_block)
        values = self.model_dump(exclude={"max_tokens", "steps_per_block"})
        SamplingOptions.checked(gen_length=self.block_length, steps=steps, **values)
        return self


class Limits(_Strict):
    """What a client may ask for; anything beyond gets a 4xx naming the field."""

    max_prompt_tokens: int = Field(2048, ge=1)
    max_tokens: int = Field(1024, ge=1)
    max_steps: int = Field(1024, ge=1)
    max_cfg_scale: float = Field(20.0, ge=0.0, allow_inf_nan=False)
    max_prompts_per_request: int = Field(16, ge=1)
    max_request_bytes: int = Field(1_048_576, ge=1024)


class BatchingSettings(_Strict):
    """The continuous batcher of a sampler replica (serve/batching.py): at most
    ``max_batch_size`` requests in a round (one block of each), and when the model is idle the
    first request waits up to ``batch_wait_timeout_s`` for others; ``max_batch_size: 1`` turns
    batching off."""

    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.02, ge=0.0, allow_inf_nan=False)


class AutoscalingSettings(_Strict):
    """Ray Serve autoscaling of the sampler deployment. Ray's defaults (upscale 30 s, downscale
    600 s, target 2) suit small CPU models, so every value is set here explicitly."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(8.0, gt=0.0, allow_inf_nan=False)
    upscale_delay_s: float = Field(10.0, ge=0.0, allow_inf_nan=False)
    downscale_delay_s: float = Field(120.0, ge=0.0, allow_inf_nan=False)
    look_back_period_s: float = Field(15.0, gt=0.0, allow_inf_nan=False)

    def to_ray(self) -> dict[str, Any]:
        """Ray Serve's ``autoscaling_config``."""
        return self.model_dump(exclude_none=True)


class ReplicaSettings(_Strict):
    """Resources and backpressure of one sampler replica.

    ``num_gpus: auto`` gives each replica one GPU when the Ray cluster has GPUs and none on a
    laptop, so the same config serves both; set it to 1 explicitly for clusters whose GPU nodes
    scale up from zero (there are no GPUs to see at deploy time).

    ``max_ongoing_requests`` is what a replica holds at once: ``batching.max_batch_size`` of
    them sampled together, the rest waiting in its own queue; one more is refused with 503 (and
    Retry-After) at once. ``max_queued_requests`` bounds the requests Serve's router holds while
    no replica can take them (replicas starting, or scaling up from zero); past it, 503 too.

    ``dtype`` float32 keeps every batched answer equal to the same request served alone: in
    bfloat16 the rounding depends on the batch's shape, and on an H100 greedy answers of a
    random model changed in 5 to 7 of 8 rows when batched (benchmarks/RESULTS.md, Serving).
    bfloat16 halves the memory of the weights at that price.
    """

    num_cpus: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    num_gpus: float | Literal["auto"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    torch_threads: int | None = Field(None, ge=1)
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    health_check_period_s: float = Field(10.0, gt=0.0, allow_inf_nan=False)
    health_check_timeout_s: float = Field(30.0, gt=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check(self) -> "ReplicaSettings":
        if self.num_gpus != "auto" and (self.num_gpus < 0 or not math.isfinite(self.num_gpus)):
            raise ValueError(f"replica.num_gpus: must be >= 0 or 'auto', got {self.num_gpus}")
        if self.max_queued_requests == 0:
            raise ValueError("replica.max_queued_requests: 0 would refuse every request; use -1 for no limit")
        return self


class IngressSettings(_Strict):
    """The FastAPI ingress deployment: tokenises, validates, streams; holds no model."""

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.1, ge=0.0, allow_inf_nan=False)
    max_ongoing_requests: int = Field(1000, ge=1)


class RolloutSettings(_Strict):
    """How a new checkpoint (or config) replaces the served one: Serve's rolling update of both
    deployments. ``max_surge_percent`` extra replicas (of the target count, rounded up) start
    and load the new checkpoint while the old ones keep serving; only then do old replicas stop,
    finishing what they hold (up to ``request_timeout_s``). 100 replaces them all at once with no
    gap, at the price of twice the replicas (GPUs) during the roll-out; 0 stops old replicas
    before starting new ones (requests wait in Serve's queue, up to
    ``replica.max_queued_requests``, while the new ones load)."""

    max_surge_percent: int = Field(100, ge=0, le=100)


class ServeConfig(_Strict):
    """How to serve a checkpoint. Loaded from YAML (``load_serve_config``)."""

    model_name: str = Field("llada-moe", min_length=1, max_length=200)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    request_timeout_s: float = Field(120.0, gt=0.0, allow_inf_nan=False)
    api_key_env: str | None = Field(None, min_length=1)
    sampling: SamplingDefaults = SamplingDefaults()
    limits: Limits = Limits()
    batching: BatchingSettings = BatchingSettings()
    autoscaling: AutoscalingSettings = AutoscalingSettings()
    replica: ReplicaSettings = ReplicaSettings()
    ingress: IngressSettings = IngressSettings()
    rollout: RolloutSettings = RolloutSettings()

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        scaling, sampling, limits = self.autoscaling, self.sampling, self.limits
        if scaling.min_replicas > scaling.max_replicas:
            raise ValueError(f"autoscaling.min_replicas: {scaling.min_replicas} exceeds "
                             f"max_replicas={scaling.max_replicas}")
        if scaling.initial_replicas is not None and not (
                scaling.min_replicas <= scaling.initial_replicas <= scaling.max_replicas):
            raise ValueError(f"autoscaling.initial_replicas: {scaling.initial_replicas} is outside "
                             f"[min_replicas, max_replicas] = [{scaling.min_replicas}, {scaling.max_replicas}]")
        if self.replica.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError(f"replica.max_ongoing_requests: {self.replica.max_ongoing_requests} is below "
                             f"batching.max_batch_size={self.batching.max_batch_size}, so a batch could never fill")
        if limits.max_prompts_per_request > self.replica.max_ongoing_requests:
            raise ValueError(f"limits.max_prompts_per_request: {limits.max_prompts_per_request} exceeds "
                             f"replica.max_ongoing_requests={self.replica.max_ongoing_requests}; the prompts of a "
                             "request are sampled at once and may all go to one replica")
        if sampling.max_tokens > limits.max_tokens:
            raise ValueError(f"sampling.max_tokens: the default {sampling.max_tokens} exceeds "
                             f"limits.max_tokens={limits.max_tokens}")
        if sampling.cfg_scale > limits.max_cfg_scale:
            raise ValueError(f"sampling.cfg_scale: the default {sampling.cfg_scale} exceeds "
                             f"limits.max_cfg_scale={limits.max_cfg_scale}")
        if self.api_key_env is not None and not self.api_key_env.replace("_", "").isalnum():
            raise ValueError(f"api_key_env: {self.api_key_env!r} is not an environment variable name")
        return self


class AppArgs(_Strict):
    """The arguments of the Serve application (``args:`` in the Serve config YAML)."""

    checkpoint: str = Field(min_length=1)
    config: ServeConfig = ServeConfig()
    s3: S3Settings | None = None


def load_serve_config(uri: str, overrides: dict[str, Any] | None = None) -> ServeConfig:
    """A ServeConfig from a YAML file (a path or a URI, s3:// too). ``overrides`` (top-level
    fields, e.g. from CLI flags) win over the file. A recipe's ``serve:`` block is read by the
    recipe itself (llada.recipe), not here."""
    try:
        text = storage.read_text(uri)
    except (OSError, storage.StorageError) as error:
        raise ValueError(f"{uri}: cannot read the serve config ({error})") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{uri}: not valid YAML ({error})") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{uri}: expected a mapping of serve settings, got {type(loaded).__name__}")
    if "stages" in loaded or "serve" in loaded:
        raise ValueError(f"{uri}: this is a recipe, not a serve config; use `llada serve RECIPE` (its serve: block)")
    return ServeConfig.model_validate({**loaded, **(overrides or {})})
