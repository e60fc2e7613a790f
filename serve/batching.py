"""Dynamic batching of diffusion sampling requests: which requests may share a batch, how a
group is padded and sampled, and how its blocks are streamed out (no Ray here).

Legend: B batch, P prompt width (the longest prompt of the batch), G gen_length, K block_length,
L = P + G.

Which requests may be sampled together, with each output equal to the request served alone
(greedy):
- Prompts of different lengths: yes. They are LEFT-padded to P with an attention mask; the
  model gives every row its own positions (cumsum of the mask) and no query attends to padding,
  so a row sees exactly what it sees alone (tests/unit/test_sampling.py holds the sampler to it).
- Different gen_length: NO. Attention is bidirectional, so every position also attends to the
  still-masked answer positions after it: a row generated to 16 tokens sees 8 more MASK tokens
  than the same row generated to 8, and its logits (so its commits) differ from the first step
  on. The schedule differs too (steps are split over gen_length / K blocks). So gen_length is
  part of the batch key, not padded to the largest in the batch.
- Different max_tokens: yes, when they round up to the same gen_length. gen_length is max_tokens
  rounded up to a multiple of block_length (served alone, the request is rounded the same way);
  each row is cut back to its own max_tokens.
- Every other sampling option (the request's whole :class:`~llada_core.options.SamplingOptions`:
  steps, block_length, temperature, cfg_scale, remasking, the EOS options, threshold, cache,
  early_stop) is part of the key.
- A seeded stochastic request runs alone: one generator draws the noise of the whole batch, so
  a row's noise depends on its batch mates and the seed would not reproduce the output.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Hashable, Sequence

import torch
from torch import nn

from llada_core.options import SamplingOptions
from llada_core.sampling import CommittedBlocks, generate, left_pad

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleRequest:
    """One prompt to sample: token ids, how many answer tokens to return, and how to sample.

    ``deadline`` is a ``time.time()`` after which nobody waits for the answer any more;
    ``stream_blocks`` False asks the replica for one message at the end instead of one per block
    (each message between processes costs about a millisecond).
    """

    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    options: SamplingOptions
    eot_id: int | None = None  # the tokenizer's end of turn (generate()'s eot_id)
    seed: int | None = None  # only kept for stochastic sampling
    deadline: float = math.inf
    stream_blocks: bool = True


@dataclass(frozen=True)
class BlockUpdate:
    """One request's answer tokens that became final since its previous update (one block, or
    after an early stop the rest of the answer), cut at its max_tokens.

    ``blocks_done`` counts the answer blocks final so far: the updates of a request carry every
    answer token exactly once, in order, and the last one has ``blocks_done == num_blocks``.
    """

    blocks_done: int
    num_blocks: int
    token_ids: tuple[int, ...]

    @property
    def final(self) -> bool:
        return self.blocks_done == self.num_blocks


@dataclass(frozen=True)
class SampleFailure:
    """A request the sampler could not serve; ``status`` is the HTTP status to answer with."""

    status: int
    message: str


def batch_key(request: SampleRequest) -> Hashable:
    """Requests with equal keys may share a batch (see the module docstring)."""
    key = (request.options, request.eot_id)
    if request.seed is not None and request.options.stochastic:
        return (*key, request.request_id)
    return key


def group_requests(requests: Sequence[SampleRequest]) -> list[list[int]]:
    """Indices of ``requests`` grouped by :func:`batch_key`, groups in order of first arrival."""
    groups: dict[Hashable, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(batch_key(request), []).append(index)
    return list(groups.values())


def committed_tokens(committed: CommittedBlocks, max_tokens: Sequence[int]) -> list[tuple[int, ...]]:
    """Each row's newly final answer tokens, cut at that row's max_tokens."""
    rows = committed.tokens_BT.tolist()
    keep = [max(0, limit - committed.answer_start) for limit in max_tokens]
    return [tuple(row[:n]) for row, n in zip(rows, keep, strict=True)]


BlockHook = Callable[[int, list[tuple[int, ...]]], None]  # (blocks done, tokens per request)


def sample_group(model: nn.Module, requests: Sequence[SampleRequest], on_block: BlockHook | None = None,
                 generate_fn: Callable[..., torch.Tensor] = generate) -> list[tuple[int, ...]]:
    """Sample requests that share a :func:`batch_key` in one ``generate`` call.

    Returns each request's answer tokens (cut at its max_tokens). ``on_block(blocks_done,
    [new tokens per request])`` is called whenever blocks become final (generate()'s
    :class:`~llada_core.sampling.CommittedBlocks` contract): concatenated over the calls, each
    request's tokens are exactly its returned answer.
    """
    first = requests[0]
    assert all(batch_key(r) == batch_key(first) for r in requests), "mixed batch keys"
    device = next(model.parameters()).device
    prompt_BP, mask_BP = left_pad([r.prompt_ids for r in requests], model.config.pad_token_id, device)
    width = prompt_BP.shape[1]
    max_tokens = [r.max_tokens for r in requests]
    generator = None
    if first.options.stochastic and first.seed is not None:
        generator = torch.Generator(device=device).manual_seed(first.seed)

    def blocks_done(committed: CommittedBlocks) -> None:
        if on_block is not None:
            on_block(committed.blocks.stop, committed_tokens(committed, max_tokens))

    x_BL = generate_fn(model, prompt_BP, attention_mask=mask_BP, options=first.options, generator=generator,
                       eot_id=first.eot_id, on_block=blocks_done)
    answers = x_BL[:, width:].tolist()
    return [tuple(answer[:limit]) for answer, limit in zip(answers, max_tokens, strict=True)]


BatchSlot = Any  # BlockUpdate | SampleFailure | None (nothing new) | StopIteration (stream over)


@dataclass(eq=False)
class _Waiting:
    """A request waiting for the model: where its results go (its run() call and slot)."""

    request: SampleRequest
    slot: int
    outbox: asyncio.Queue


class BatchRunner:
    """Samples requests in batches on one worker thread and streams each request's blocks back.

    ``run(requests)`` is the body of the ``@serve.batch`` method: it yields results in
    ``@serve.batch``'s streaming format, one list per yield with one slot per request (a
    BlockUpdate or SampleFailure, None for nothing new, StopIteration when its stream is over).

    Requests of concurrent ``run`` calls wait in one queue. Whenever the model is free, the
    group (:func:`batch_key`) of the oldest waiting request is taken whole, up to
    ``max_batch_size``: batches that ``@serve.batch`` formed while a generate call was running
    are merged into the next call instead of running one after the other in pieces. Right after
    a batch, a group that is not full waits up to ``refill_wait_s`` for more requests: the
    clients just answered tend to come back at once, and without the wait they would miss the
    next batch and form cohorts that never meet again. The event loop stays free while the
    model runs.
    """

    def __init__(self, model: nn.Module, max_batch_size: int = 8, refill_wait_s: float = 0.0,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 generate_fn: Callable[..., torch.Tensor] = generate) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.refill_wait_s = refill_wait_s
        self.on_fatal = on_fatal
        self.generate_fn = generate_fn
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llada-sampler")
        self._waiting: list[_Waiting] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.num_batches = 0
        self.batch_sizes: list[int] = []
        self.batch_seconds: list[float] = []  # model time of each generate call

    async def run(self, requests: Sequence[SampleRequest]) -> AsyncIterator[list[BatchSlot]]:
        outbox: asyncio.Queue = asyncio.Queue()
        self._waiting.extend(_Waiting(request, slot, outbox) for slot, request in enumerate(requests))
        self._wake_worker()
        open_streams = len(requests)
        try:
            while open_streams:
                slot, item = await outbox.get()
                if item is StopIteration:
                    open_streams -= 1
                yield _slots(len(requests), {slot: item})
        finally:  # the caller is gone: its requests that have not started are dropped
            self._waiting = [w for w in self._waiting if w.outbox is not outbox]

    def _wake_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._work())
        assert self._wakeup is not None
        self._wakeup.set()

    async def _work(self) -> None:
        assert self._wakeup is not None
        after_batch = False
        while True:
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                after_batch = False
                continue
            if after_batch:
                after_batch = False
                await self._refill()
                continue  # callers may have left while it waited
            batch = self._take_batch()
            after_batch = True
            try:
                await self._run_batch(batch)
            except Exception as error:  # a bug here must not leave callers waiting for ever
                failure = self._failure(error)
                for waiting in batch:
                    waiting.outbox.put_nowait((waiting.slot, failure))
                    waiting.outbox.put_nowait((waiting.slot, StopIteration))

    async def _refill(self) -> None:
        """Wait up to refill_wait_s while the next batch is not full."""
        assert self._wakeup is not None
        deadline = time.monotonic() + self.refill_wait_s
        while self._waiting and len(self._next_group()) < self.max_batch_size \
                and (left := deadline - time.monotonic()) > 0:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except asyncio.TimeoutError:
                return

    def _next_group(self) -> list[_Waiting]:
        key = batch_key(self._waiting[0].request)
        return [w for w in self._waiting if batch_key(w.request) == key]

    def _take_batch(self) -> list[_Waiting]:
        batch = self._next_group()[: self.max_batch_size]
        self._waiting = [w for w in self._waiting if w not in batch]
        return batch

    async def _run_batch(self, batch: list[_Waiting]) -> None:
        now = time.time()
        for waiting in batch:
            if waiting.request.deadline <= now:
                waiting.outbox.put_nowait((waiting.slot, SampleFailure(
                    504, "the request timed out while waiting for a sampler batch")))
                waiting.outbox.put_nowait((waiting.slot, StopIteration))
        live = [w for w in batch if w.request.deadline > now]
        if not live:
            return
        loop = asyncio.get_running_loop()
        num_blocks = live[0].request.options.num_blocks

        def deliver(blocks_done: int, tokens: list[tuple[int, ...]]) -> None:
            for waiting, row in zip(live, tokens, strict=True):
                waiting.outbox.put_nowait((waiting.slot, BlockUpdate(blocks_done, num_blocks, row)))

        def on_block(blocks_done: int, tokens: list[tuple[int, ...]]) -> None:  # worker thread
            loop.call_soon_threadsafe(deliver, blocks_done, tokens)

        self.num_batches += 1
        self.batch_sizes.append(len(live))
        try:
            await loop.run_in_executor(self._executor, self._timed_sample_group,
                                       [w.request for w in live], on_block)
        except Exception as error:
            failure = self._failure(error)
            for waiting in live:
                waiting.outbox.put_nowait((waiting.slot, failure))
        for waiting in live:  # after every block: call_soon_threadsafe keeps the order
            waiting.outbox.put_nowait((waiting.slot, StopIteration))

    def _timed_sample_group(self, group: list[SampleRequest], on_block: BlockHook) -> list[tuple[int, ...]]:
        started = time.perf_counter()
        try:
            return sample_group(self.model, group, on_block, self.generate_fn)
        finally:
            self.batch_seconds.append(time.perf_counter() - started)

    def _failure(self, error: BaseException) -> SampleFailure:
        if isinstance(error, ValueError):  # generate names the bad argument
            return SampleFailure(400, str(error))
        logger.error("sampler failed on a batch", exc_info=error)
        if self.on_fatal is not None:
            self.on_fatal(error)
        return SampleFailure(500, f"the sampler failed: {type(error).__name__}")


def _slots(size: int, values: dict[int, BatchSlot]) -> list[BatchSlot]:
    return [values.get(i) for i in range(size)]
