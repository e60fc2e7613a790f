"""The sampler replica: loads the model once, runs the continuous batcher (serve/batching.py)
that every request of the replica joins, streams each committed block back to the ingress, and
exports its metrics to Prometheus through Ray's metrics.

One batcher, not two in series: requests go straight from Serve's handle call into the running
batch at the next block boundary, instead of through ``@serve.batch`` (which forms batches of its
own and hands them over one after the other).

Deployment options (replicas, autoscaling, max_ongoing/queued requests, resources) are not set
here but from the serve config in serve/app.py, so the same class runs on a GPU cluster and a
laptop.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, AsyncIterator

import torch

from llada_core.checkpoint import load_model
from pipelines.storage import S3Settings
from serve.batching import BlockUpdate, ContinuousBatcher, SampleFailure, SampleRequest
from serve.checkpoint import checkpoint_label, local_checkpoint
from serve.config import ServeConfig

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Latency buckets (s): a one-block answer of a small model takes tens of ms on a GPU, a long
# answer under load tens of seconds.
_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0]
_BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


def _replica_id() -> str | None:
    """This replica's id in Serve (None outside Serve: tests that build a Sampler directly)."""
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # RayServeException outside a replica
        return None


def replica_device() -> torch.device:
    """The GPU Ray gave this replica, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class PrometheusMetrics:
    """The batcher's metrics as Ray metrics (``ray.serve.metrics``, which tags them with the
    application, deployment and replica): Ray's metrics agent serves them to Prometheus (the
    ``/metrics`` endpoint of each node's agent, ``ray.init(_metrics_export_port=...)``).

    llada_sampler_queue_depth         gauge: requests waiting to join the running batch
    llada_sampler_batch_rows          histogram: requests per round (one block of each)
    llada_sampler_forwards_total      counter: batched model forwards
    llada_sampler_tokens_total        counter: answer tokens handed out (rate() is tokens/s)
    llada_sampler_tokens_per_second   gauge: tokens/s of the last round
    llada_sampler_round_seconds       histogram: model time of a round
    llada_sampler_request_seconds     histogram: arrival to last block, by outcome (ok / failed)
    llada_sampler_first_block_seconds histogram: arrival to first block (time to first token)
    """

    def __init__(self) -> None:
        from ray.serve import metrics

        self.queue_depth = metrics.Gauge("llada_sampler_queue_depth", "requests waiting to join the running batch")
        self.batch_rows = metrics.Histogram("llada_sampler_batch_rows", "requests per round", _BATCH_BUCKETS)
        self.forwards = metrics.Counter("llada_sampler_forwards_total", "batched model forwards")
        self.tokens = metrics.Counter("llada_sampler_tokens_total", "answer tokens handed out")
        self.tokens_per_second = metrics.Gauge("llada_sampler_tokens_per_second", "tokens/s of the last round")
        self.round_seconds = metrics.Histogram("llada_sampler_round_seconds", "model time of a round",
                                               _LATENCY_BUCKETS)
        self.request_seconds = metrics.Histogram("llada_sampler_request_seconds", "arrival to last block",
                                                 _LATENCY_BUCKETS, tag_keys=("outcome",))
        self.first_block_seconds = metrics.Histogram("llada_sampler_first_block_seconds",
                                                     "arrival to first block", _LATENCY_BUCKETS)

    def round_done(self, rows: int, forwards: int, tokens: int, seconds: float, waiting: int) -> None:
        self.queue_depth.set(waiting)
        self.batch_rows.observe(rows)
        self.forwards.inc(forwards)
        if tokens:
            self.tokens.inc(tokens)
        self.tokens_per_second.set(tokens / seconds if seconds > 0 else 0.0)
        self.round_seconds.observe(seconds)

    def request_done(self, seconds: float, first_block_seconds: float | None, ok: bool) -> None:
        self.request_seconds.observe(seconds, tags={"outcome": "ok" if ok else "failed"})
        if first_block_seconds is not None:
            self.first_block_seconds.observe(first_block_seconds)


class Sampler:
    """One model replica. ``stream(request)`` yields the request's BlockUpdates (or one
    SampleFailure); concurrent calls are sampled together."""

    def __init__(self, checkpoint: str, config: dict[str, Any], s3: dict[str, Any] | None = None) -> None:
        settings = ServeConfig.model_validate(config)
        self.device = replica_device()
        threads = settings.replica.torch_threads or max(1, round(settings.replica.num_cpus))
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        started = time.perf_counter()
        with local_checkpoint(checkpoint, S3Settings.model_validate(s3) if s3 else None) as directory:
            self.model = load_model(directory, dtype=_DTYPES[settings.replica.dtype], device=self.device)
        self.model.eval()
        self.load_seconds = time.perf_counter() - started
        self.checkpoint_label = checkpoint_label(checkpoint)
        self.replica_id = _replica_id()
        self._broken: BaseException | None = None
        # With batching off there is nothing to wait for.
        batching = settings.batching
        wait_s = batching.batch_wait_timeout_s if batching.max_batch_size > 1 else 0.0
        self._batcher = ContinuousBatcher(self.model, batching.max_batch_size, idle_wait_s=wait_s,
                                          on_fatal=self._on_error, metrics=PrometheusMetrics(),
                                          capacity=settings.replica.max_ongoing_requests)
        logger.info("loaded %s on %s in %.1f s", checkpoint, self.device, self.load_seconds)

    async def stream(self, request: SampleRequest) -> AsyncIterator[BlockUpdate | SampleFailure]:
        """Each block as it becomes final (or the failure), naming this replica's checkpoint."""
        async for result in self._batcher.stream(request):
            yield self._signed(result)

    async def answer(self, request: SampleRequest) -> BlockUpdate | SampleFailure:
        """The whole answer as one BlockUpdate (or the failure): the plain call for requests
        that do not stream their blocks."""
        tokens: tuple[int, ...] = ()
        forwards = 0
        async for result in self._batcher.stream(request):
            if isinstance(result, SampleFailure):
                return result
            tokens += result.token_ids
            forwards += result.forwards
            if result.final:
                return self._signed(BlockUpdate(result.blocks_done, result.num_blocks, tokens, forwards))
        return SampleFailure(500, "the sampler ended the answer without its last block")

    def _signed(self, result: BlockUpdate | SampleFailure) -> BlockUpdate | SampleFailure:
        if isinstance(result, SampleFailure):
            return result
        return dataclasses.replace(result, checkpoint=self.checkpoint_label, replica=self.replica_id)

    async def ready(self) -> dict[str, Any]:
        return {"device": str(self.device), "load_seconds": round(self.load_seconds, 2),
                "rounds": self._batcher.stats.rounds}

    async def stats(self) -> dict[str, Any]:
        """The batcher's totals (serve/batching.py: BatchStats) and what is queued and running
        now, for tests and benchmarks (read deltas)."""
        return {**vars(self._batcher.stats), "waiting": self._batcher.queue_depth, "running": self._batcher.running}

    def check_health(self) -> None:
        """Serve restarts the replica when this raises: after a device failure (CUDA error, out
        of memory) the model may be unusable, so the replica reports itself broken."""
        if self._broken is not None:
            raise RuntimeError(f"sampler replica is broken after {type(self._broken).__name__}: {self._broken}")

    def _on_error(self, error: BaseException) -> None:
        text = str(error)
        if isinstance(error, torch.cuda.OutOfMemoryError) or "CUDA" in text or "device-side" in text:
            self._broken = error
