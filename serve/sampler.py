"""The sampler replica: loads the model once, batches concurrent requests with ``@serve.batch``
and streams each committed block back to the ingress.

Deployment options (replicas, autoscaling, max_ongoing/queued requests, resources) are not set
here but from the serve config in serve/app.py, so the same class runs on a GPU cluster and a
laptop.
"""

from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator

import torch
from ray import serve

from llada_core.checkpoint import load_model
from pipelines.storage import S3Settings
from serve.batching import BatchRunner, BatchSlot, BlockUpdate, SampleFailure, SampleRequest
from serve.checkpoint import local_checkpoint
from serve.config import ServeConfig

logger = logging.getLogger(__name__)

MAX_OPEN_BATCHES = 1024
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def replica_device() -> torch.device:
    """The GPU Ray gave this replica, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


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
        self._broken: BaseException | None = None
        # With batching off there is nothing to wait for (Serve would wait the timeout whenever
        # the queue is empty).
        batching = settings.batching
        wait_s = batching.batch_wait_timeout_s if batching.max_batch_size > 1 else 0.0
        self._runner = BatchRunner(self.model, batching.max_batch_size, refill_wait_s=wait_s, on_fatal=self._on_error)
        self._sample_batch.set_max_batch_size(batching.max_batch_size)
        self._sample_batch.set_batch_wait_timeout_s(wait_s)
        logger.info("loaded %s on %s in %.1f s", checkpoint, self.device, self.load_seconds)

    async def stream(self, request: SampleRequest) -> AsyncIterator[BlockUpdate | SampleFailure]:
        tokens: tuple[int, ...] = ()
        async for result in self._sample_batch(request):
            if result is None:
                continue
            if request.stream_blocks or isinstance(result, SampleFailure):
                yield result
            else:
                tokens += result.token_ids
                if result.final:  # the whole answer as one last block
                    yield BlockUpdate(result.blocks_done, result.num_blocks, tokens)

    # Many batches may be open at once: the runner queues their requests and merges those that
    # wait for the model into one generate call (serve/batching.py: BatchRunner).
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, max_concurrent_batches=MAX_OPEN_BATCHES)
    async def _sample_batch(self, requests: list[SampleRequest]) -> AsyncIterator[list[BatchSlot]]:
        async for slots in self._runner.run(requests):
            yield slots

    async def ready(self) -> dict[str, Any]:
        return {"device": str(self.device), "load_seconds": round(self.load_seconds, 2),
                "batches": self._runner.num_batches}

    async def batch_sizes(self) -> list[int]:
        """Sizes of the generate calls so far (for tests and benchmarks)."""
        return list(self._runner.batch_sizes)

    async def batch_seconds(self) -> list[float]:
        """Model time of each generate call so far (for benchmarks)."""
        return list(self._runner.batch_seconds)

    def check_health(self) -> None:
        """Serve restarts the replica when this raises: after a device failure (CUDA error, out
        of memory) the model may be unusable, so the replica reports itself broken."""
        if self._broken is not None:
            raise RuntimeError(f"sampler replica is broken after {type(self._broken).__name__}: {self._broken}")

    def _on_error(self, error: BaseException) -> None:
        text = str(error)
        if isinstance(error, torch.cuda.OutOfMemoryError) or "CUDA" in text or "device-side" in text:
            self._broken = error
