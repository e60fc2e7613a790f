"""Continuous batching of diffusion sampling requests (no Ray here): requests of any length join
the running batch and leave it at block boundaries, and each one's answer is the one it gets
alone.

Legend: B batch, K block_length, G gen_length.

A masked-diffusion answer is sampled block by block, and under the dual KV cache every block
starts with a full forward of the whole sequence, so a block boundary is where a batch can
change for free. :class:`ContinuousBatcher` runs one *round* at a time: the next block of every
running request in one batch (llada_core.sampling.next_blocks). After each round, finished
requests leave (their last block, or an early stop on EOS) and waiting ones join, so an 8-token
request is answered after its one block while a 128-token one next to it goes on.

What a row sees is exactly what it sees alone (greedy fp32 answers equal the request served
alone, tests/unit/test_serve_batching.py): its prompt, its final blocks, its current block and
its own masked tail at its own positions; everything else in the batch tensor is padding that
no query attends to. Attention is bidirectional, so this matters: a row generated to 16 tokens
alone sees 8 more MASK tokens than the same row generated to 8, and a tail of another row's
length would change its logits from the first step on. Per row, too: gen_length, the fixed
schedule's steps and early stop.

Which requests may share the running batch (:func:`batch_key`): every other sampling setting
is shared (block_length, temperature, cfg_scale, remasking, the EOS options, threshold, cache)
along with the end-of-turn id. A seeded stochastic request runs alone: one generator draws the
noise of the whole batch, so a row's noise would depend on its batch mates and the seed would
not reproduce the output. When the oldest waiting request cannot join, the running batch stops
admitting and drains, then the waiting one's batch starts (no request waits behind a stream of
later compatible ones).

SGLang's and vLLM's diffusion schedulers schedule at block granularity the same way; they serve
block-causal models, where a finished block is never recomputed, while LLaDA is bidirectional,
which is why "equal to alone" is the bar here rather than a property of the model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Hashable, Protocol

import torch
from torch import nn

from llada_core.options import SamplingOptions
from llada_core.sampling import BlockRow, Resolved, next_blocks, resolve

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
    ``forwards`` counts the model forwards this request needed since its previous update: the
    batched forwards in which its block still had masked positions, which is what it takes alone
    whatever its batch mates; summed over the updates, it is the request's cost in forwards (the
    API reports it in ``usage``).
    """

    blocks_done: int
    num_blocks: int
    token_ids: tuple[int, ...]
    forwards: int = 0
    # Which checkpoint and replica sampled it (set by the replica, serve/sampler.py): during a
    # roll-out both the old and the new checkpoint serve, and the API says which one answered.
    checkpoint: str | None = None
    replica: str | None = None

    @property
    def final(self) -> bool:
        return self.blocks_done == self.num_blocks


@dataclass(frozen=True)
class SampleFailure:
    """A request the sampler could not serve; ``status`` is the HTTP status to answer with."""

    status: int
    message: str


def batch_key(request: SampleRequest) -> Hashable:
    """Requests with equal keys may share the running batch (see the module docstring)."""
    options = request.options
    key = (options.block_length, options.temperature, options.cfg_scale, options.remasking,
           options.logits_eos_inf, options.confidence_eos_eot_inf, options.threshold, options.cache,
           request.eot_id)
    if request.seed is not None and options.stochastic:
        return (*key, request.request_id)
    return key


class BatchMetrics(Protocol):
    """Where the batcher reports what it does (the replica exports it to Prometheus)."""

    def round_done(self, rows: int, forwards: int, tokens: int, seconds: float, waiting: int) -> None: ...

    def request_done(self, seconds: float, first_block_seconds: float | None, ok: bool) -> None: ...


@dataclass
class BatchStats:
    """Totals since the batcher started (read deltas of them: tests and benchmarks)."""

    rounds: int = 0
    row_rounds: int = 0  # sum of the rounds' batch sizes: mean batch = row_rounds / rounds
    forwards: int = 0  # batched model forwards
    tokens: int = 0  # answer tokens handed out
    model_seconds: float = 0.0
    max_rows: int = 0
    joined_running: int = 0  # requests that joined a batch already running
    refused: int = 0  # requests refused with 503: the queue was full


_END = object()  # a request's stream is over


@dataclass(eq=False)
class _Entry:
    """A request in the batcher: where its results go and what is final so far."""

    request: SampleRequest
    outbox: asyncio.Queue
    arrived: float = field(default_factory=time.perf_counter)
    answer: tuple[int, ...] = ()
    first_block_at: float | None = None
    gone: bool = False  # its caller stopped listening

    @property
    def row(self) -> BlockRow:
        options = self.request.options
        return BlockRow(self.request.prompt_ids, self.answer, options.gen_length, options.steps_per_block)


class ContinuousBatcher:
    """Samples requests in one running batch on one worker thread and streams each one's blocks.

    ``stream(request)`` yields the request's :class:`BlockUpdate` s (or one SampleFailure) as its
    blocks become final. Between rounds, the worker drops requests whose caller left or whose
    deadline passed, admits waiting ones of the running batch's key (up to max_batch_size, in
    order of arrival), and runs the next round. When the model is idle, the first request waits
    up to ``idle_wait_s`` for others (clients answered together come back together). The event
    loop stays free while the model runs.

    The queue is here, in the replica, not in Serve's router: a request that finds ``capacity``
    requests running and waiting is refused at once with a 503 failure. A waiting request costs an idle
    coroutine; one queued in the router costs queue-length probes of the replicas every 25 to
    500 ms until a slot frees, which on a small machine took the CPU from the model and left it
    idle between probes (benchmarks/RESULTS.md, "Serving under real traffic").
    """

    def __init__(self, model: nn.Module, max_batch_size: int = 8, idle_wait_s: float = 0.0,
                 on_fatal: Callable[[BaseException], None] | None = None, metrics: BatchMetrics | None = None,
                 step_fn: Callable[..., tuple[list[tuple[int, ...]], list[int]]] = next_blocks,
                 capacity: int | None = None) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.capacity = capacity
        self.idle_wait_s = idle_wait_s
        self.on_fatal = on_fatal
        self.metrics = metrics
        self.step_fn = step_fn
        self.stats = BatchStats()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llada-sampler")
        self._waiting: list[_Entry] = []
        self._running: list[_Entry] = []
        self._generator: torch.Generator | None = None  # the running batch's, for a seeded request
        self._run: Resolved | None = None  # the running batch's options on this model
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    @property
    def queue_depth(self) -> int:
        """Requests waiting to join."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    async def stream(self, request: SampleRequest) -> AsyncIterator[BlockUpdate | SampleFailure]:
        if self.capacity is not None and len(self._running) + len(self._waiting) >= self.capacity:
            self.stats.refused += 1
            yield SampleFailure(503, f"the sampler replica's queue is full ({len(self._running)} running, "
                                     f"{len(self._waiting)} waiting)")
            return
        entry = _Entry(request, asyncio.Queue())
        self._waiting.append(entry)
        self._wake_worker()
        try:
            while (item := await entry.outbox.get()) is not _END:
                yield item
        finally:  # the caller is gone or the stream is over: the worker drops it at the next boundary
            entry.gone = True

    def _wake_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._work())
        assert self._wakeup is not None
        self._wakeup.set()

    async def _work(self) -> None:
        assert self._wakeup is not None
        while True:
            self._drop_gone()
            if not self._running:
                if not self._waiting:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._gather()
                self._drop_gone()
            self._admit()
            if not self._running:
                continue
            try:
                await self._round()
            except Exception as error:  # a bug here must not leave callers waiting for ever
                failure = self._failure(error)
                for entry in self._running:
                    self._finish(entry, failure)
                self._running = []

    async def _gather(self) -> None:
        """With the model idle, wait up to idle_wait_s while the first batch is not full."""
        assert self._wakeup is not None
        deadline = time.monotonic() + self.idle_wait_s
        while self._waiting and len(self._admissible(self._waiting[0])) < self.max_batch_size \
                and (left := deadline - time.monotonic()) > 0:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except asyncio.TimeoutError:
                return

    def _admissible(self, first: _Entry) -> list[_Entry]:
        key = batch_key(first.request)
        return [entry for entry in self._waiting if batch_key(entry.request) == key]

    def _drop_gone(self) -> None:
        """Forget requests nobody waits for; answer 504 to those past their deadline."""
        now = time.time()
        for entries in (self._waiting, self._running):
            for entry in entries:
                if not entry.gone and entry.request.deadline <= now:
                    self._finish(entry, SampleFailure(504, "the request timed out in the sampler"))
        self._waiting = [entry for entry in self._waiting if not entry.gone]
        self._running = [entry for entry in self._running if not entry.gone]
        if not self._running:
            self._generator, self._run = None, None

    def _admit(self) -> None:
        """Waiting requests of the running batch's key join it, oldest first, while it has room;
        none join while the oldest waiting request has another key (the batch drains for it)."""
        if not self._waiting:
            return
        if self._running and batch_key(self._waiting[0].request) != batch_key(self._running[0].request):
            return
        room = self.max_batch_size - len(self._running)
        joining = self._admissible(self._waiting[0])[:room]
        if not joining:
            return
        self._waiting = [entry for entry in self._waiting if entry not in joining]
        if self._running:
            self.stats.joined_running += len(joining)
        else:  # a new batch: its key's options against the model, once
            first = joining[0].request
            try:
                self._run = resolve(self.model, first.options, eot_id=first.eot_id)
            except ValueError as error:  # names the bad argument
                for entry in joining:
                    self._finish(entry, SampleFailure(400, str(error)))
                return
            if first.seed is not None and first.options.stochastic:
                device = next(self.model.parameters()).device
                self._generator = torch.Generator(device=device).manual_seed(first.seed)
        self._running.extend(joining)

    async def _round(self) -> None:
        """The next block of every running request; finished ones leave."""
        batch, run = self._running, self._run
        assert run is not None, "a running batch has resolved options"
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            blocks, forwards = await loop.run_in_executor(self._executor, self.step_fn, self.model,
                                                          [entry.row for entry in batch], run, self._generator)
        except ValueError as error:  # next_blocks names the bad argument
            for entry in batch:
                self._finish(entry, SampleFailure(400, str(error)))
            blocks, forwards = [], []
        seconds = time.perf_counter() - started
        tokens = sum(self._deliver(entry, block, needed, run.eos_id)
                     for entry, block, needed in zip(batch, blocks, forwards, strict=True))
        self._running = [entry for entry in batch if not entry.gone]
        if not blocks:
            return
        stats, round_forwards = self.stats, max(forwards)
        stats.rounds += 1
        stats.row_rounds += len(batch)
        stats.max_rows = max(stats.max_rows, len(batch))
        stats.forwards += round_forwards
        stats.tokens += tokens
        stats.model_seconds += seconds
        if self.metrics is not None:
            self.metrics.round_done(len(batch), round_forwards, tokens, seconds, len(self._waiting))

    def _deliver(self, entry: _Entry, block: tuple[int, ...], forwards: int, eos_id: int | None) -> int:
        """Hand out the request's new final tokens (cut at its max_tokens) -> how many; a request
        whose answer is complete (or ended in EOS under early stop) gets its final update."""
        request = entry.request
        options = request.options
        answer = entry.answer + block
        if options.early_stop and eos_id is not None and block[-1] == eos_id:
            answer += (eos_id,) * (options.gen_length - len(answer))  # EOS to the end, as alone
        new = answer[len(entry.answer):request.max_tokens] if len(entry.answer) < request.max_tokens else ()
        entry.answer = answer
        if entry.first_block_at is None:
            entry.first_block_at = time.perf_counter()
        if not entry.gone:
            entry.outbox.put_nowait(BlockUpdate(len(answer) // options.block_length, options.num_blocks, new,
                                                forwards))
        if len(answer) == options.gen_length:
            self._finish(entry)
        return len(new)

    def _finish(self, entry: _Entry, failure: SampleFailure | None = None) -> None:
        if entry.gone:
            return
        if failure is not None:
            entry.outbox.put_nowait(failure)
        entry.outbox.put_nowait(_END)
        entry.gone = True
        if self.metrics is not None:
            now = time.perf_counter()
            first = None if entry.first_block_at is None else entry.first_block_at - entry.arrived
            self.metrics.request_done(now - entry.arrived, first, failure is None)

    def _failure(self, error: BaseException) -> SampleFailure:
        logger.error("sampler failed on a batch", exc_info=error)
        if self.on_fatal is not None:
            self.on_fatal(error)
        return SampleFailure(500, f"the sampler failed: {type(error).__name__}")
