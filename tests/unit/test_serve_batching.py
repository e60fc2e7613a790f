"""Dynamic batching of sampling requests (serve/batching.py), without Ray: which requests share a
batch, left padding, a batched group equals each request alone, and the block-by-block runner.

Legend: B batch, P prompt width, G gen_length, K block_length.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import torch

from llada_core import LLaDAMoEModelLM, SamplingOptions, generate, left_pad, preset
from serve.batching import (
    BatchRunner,
    BlockUpdate,
    SampleFailure,
    SampleRequest,
    batch_key,
    group_requests,
    sample_group,
)


@pytest.fixture(scope="module")
def model() -> LLaDAMoEModelLM:
    torch.manual_seed(0)
    config = preset("tiny", num_hidden_layers=2, vocab_size=64, hidden_size=32, num_attention_heads=4,
                    num_key_value_heads=4, expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    model = LLaDAMoEModelLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # distinct confidences: a wrong commit order shows
    return model


def request(prompt: list[int], max_tokens: int = 8, block_length: int = 4, steps: int | None = None,
            name: str = "r", seed: int | None = None, **options: object) -> SampleRequest:
    gen_length = math.ceil(max_tokens / block_length) * block_length
    sampling = SamplingOptions(gen_length=gen_length, steps=steps or gen_length, block_length=block_length, **options)
    return SampleRequest(request_id=name, prompt_ids=tuple(prompt), max_tokens=max_tokens, options=sampling,
                         seed=seed)


def prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(5, 64, (length,), generator=generator).tolist()  # ids 0-4 are special


def test_max_tokens_rounding_to_one_gen_length_share_a_batch_other_lengths_do_not():
    requests = [request(prompt(3, 0), max_tokens=5), request(prompt(4, 1), max_tokens=8),
                request(prompt(2, 2), max_tokens=9), request(prompt(2, 3), max_tokens=7)]
    assert group_requests(requests) == [[0, 1, 3], [2]]


def test_sampling_parameters_split_batches_and_seeded_stochastic_requests_run_alone():
    requests = [
        request([5], name="a"), request([6], name="b", temperature=0.5), request([7], name="c", temperature=0.5),
        request([8], name="d", temperature=0.5, seed=3), request([9], name="e", temperature=0.5, seed=3),
        request([10], name="f", steps=4), request([11], name="g", cfg_scale=1.0), request([12], name="h"),
    ]
    assert group_requests(requests) == [[0, 7], [1, 2], [3], [4], [5], [6]]
    assert batch_key(requests[3]) != batch_key(requests[4])


def test_left_pad_gives_no_mask_when_lengths_match_and_pads_on_the_left_otherwise():
    ids, mask = left_pad([[5, 6], [7, 8]], pad_id=0)
    assert ids.tolist() == [[5, 6], [7, 8]] and mask is None
    ids, mask = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_batched_group_equals_each_request_alone_greedy(model):
    # Prompt lengths 7, 3, 1 and 0; max_tokens 5, 8 and 6 all round up to gen_length 8.
    requests = [request(prompt(7, 1), 5, name="a"), request(prompt(3, 2), 8, name="b"),
                request(prompt(1, 3), 6, name="c"), request([], 8, name="d")]
    assert len(group_requests(requests)) == 1
    batched = sample_group(model, requests)
    for row, single in enumerate(requests):
        alone = sample_group(model, [single])
        assert batched[row] == alone[0], f"row {row} differs from the request served alone"
        assert len(batched[row]) == single.max_tokens


FAST_OPTIONS = [{"threshold": 0.9}, {"cache": "prefix"}, {"cache": "dual"}, {"early_stop": True},
                {"cache": "dual", "early_stop": True, "threshold": 0.9}]


@pytest.mark.parametrize("fast", FAST_OPTIONS, ids=lambda e: "+".join(f"{k}={v}" for k, v in e.items()))
def test_batched_equals_alone_with_the_sampler_accelerations(model, fast):
    requests = [request(prompt(7, 1), 5, name="a", **fast), request(prompt(3, 2), 8, name="b", **fast),
                request([], 8, name="c", **fast)]
    batched = sample_group(model, requests)
    for row, single in enumerate(requests):
        assert batched[row] == sample_group(model, [single])[0], f"row {row} differs from the request alone"


def test_a_row_alone_is_exactly_the_official_generate_call(model):
    single = request(prompt(5, 7), max_tokens=6, block_length=4, steps=4)
    expected = generate(model, torch.tensor([single.prompt_ids]), steps=4, gen_length=8, block_length=4)
    assert sample_group(model, [single])[0] == tuple(expected[0, 5:11].tolist())


def test_gen_length_changes_a_rows_answer_so_it_is_part_of_the_batch_key(model):
    """Why gen_length is in the key: the same prompt generated to 8 and to 16 tokens commits
    different first 8 tokens (bidirectional attention sees the extra masks)."""
    same_prompt = prompt(6, 11)
    short = sample_group(model, [request(same_prompt, max_tokens=8)])[0]
    long = sample_group(model, [request(same_prompt, max_tokens=16)])[0]
    assert short != long[:8]


def test_blocks_stream_in_order_and_add_up_to_the_answer(model):
    requests = [request(prompt(4, 5), 10, name="a"), request(prompt(2, 6), 12, name="b")]
    seen: list[tuple[int, list[tuple[int, ...]]]] = []
    answers = sample_group(model, requests, on_block=lambda index, tokens: seen.append((index, tokens)))
    assert [blocks_done for blocks_done, _ in seen] == [1, 2, 3]
    for row, answer in enumerate(answers):
        assert sum((tokens[row] for _, tokens in seen), ()) == answer


def collect(runner: BatchRunner, requests: list[SampleRequest]) -> dict[int, list]:
    """Drive the runner like @serve.batch does: per request, its items until StopIteration."""
    streams: dict[int, list] = {i: [] for i in range(len(requests))}
    stopped: set[int] = set()

    async def drive() -> None:
        async for slots in runner.run(requests):
            assert len(slots) == len(requests)
            for i, item in enumerate(slots):
                if item is StopIteration:
                    stopped.add(i)
                elif item is not None:
                    assert i not in stopped, "an item after the end of a stream"
                    streams[i].append(item)

    asyncio.run(drive())
    assert stopped == set(range(len(requests))), "every stream must end"
    return streams


def test_runner_streams_every_group_block_by_block(model):
    requests = [request(prompt(3, 1), 8, name="a"), request(prompt(5, 2), 4, name="b"),
                request(prompt(2, 3), 7, name="c")]
    runner = BatchRunner(model)
    streams = collect(runner, requests)
    assert runner.batch_sizes == [2, 1]  # a and c share gen_length 8; b has 4
    for i, single in enumerate(requests):
        updates = streams[i]
        assert all(isinstance(u, BlockUpdate) for u in updates)
        assert [u.blocks_done for u in updates] == list(range(1, single.options.num_blocks + 1))
        assert updates[-1].final
        assert sum((u.token_ids for u in updates), ()) == sample_group(model, [single])[0]


def test_runner_merges_requests_that_wait_while_the_model_is_busy(model):
    """@serve.batch hands batches over one after the other; those that arrive while a generate
    call runs are sampled together in the next one, not one by one."""
    started = []

    def slow_generate(*args, **kwargs):
        started.append(args[1].shape[0])
        time.sleep(0.3)
        return generate(*args, **kwargs)

    runner = BatchRunner(model, max_batch_size=3, generate_fn=slow_generate)
    requests = [request(prompt(n + 1, n), 4, name=str(n)) for n in range(5)]

    async def drive() -> dict[str, tuple[int, ...]]:
        async def one_call(batch: list[SampleRequest]) -> None:
            async for slots in runner.run(batch):
                for single, item in zip(batch, slots, strict=True):
                    if isinstance(item, BlockUpdate):
                        answers[single.request_id] = answers.get(single.request_id, ()) + item.token_ids

        answers: dict[str, tuple[int, ...]] = {}
        first = asyncio.create_task(one_call(requests[:1]))
        await asyncio.sleep(0.1)  # the first generate call is running
        await asyncio.gather(first, *(one_call([r]) for r in requests[1:]))
        return answers

    answers = asyncio.run(drive())
    assert runner.batch_sizes == [1, 3, 1]  # four waited; max_batch_size takes three of them
    for single in requests:
        assert answers[single.request_id] == sample_group(model, [single])[0]


def test_after_a_batch_a_group_that_is_not_full_waits_briefly_for_returning_clients(model):
    def slow_generate(*args, **kwargs):
        time.sleep(0.2)
        return generate(*args, **kwargs)

    runner = BatchRunner(model, max_batch_size=4, refill_wait_s=0.5, generate_fn=slow_generate)
    requests = [request(prompt(n + 1, n), 4, name=str(n)) for n in range(3)]

    async def drive() -> None:
        async def one_call(single: SampleRequest, delay: float) -> None:
            await asyncio.sleep(delay)
            async for _ in runner.run([single]):
                pass

        # 0 runs alone; 1 arrives while it runs; 2 arrives just after it ended (a returning client).
        await asyncio.gather(one_call(requests[0], 0), one_call(requests[1], 0.05), one_call(requests[2], 0.35))

    asyncio.run(drive())
    assert runner.batch_sizes == [1, 2]


def test_runner_fails_expired_requests_with_504_and_bad_arguments_with_400(model):
    expired = SampleRequest("late", (5, 6), 4, SamplingOptions(gen_length=4, steps=4, block_length=4),
                            deadline=time.time() - 1)

    def broken_generate(*args, **kwargs):
        raise ValueError("steps: not allowed here")

    streams = collect(BatchRunner(model, generate_fn=broken_generate), [expired, request([7], 4)])
    assert streams[0] == [SampleFailure(504, "the request timed out while waiting for a sampler batch")]
    assert streams[1] == [SampleFailure(400, "steps: not allowed here")]


def test_runner_reports_unexpected_errors_as_500_and_tells_the_replica(model):
    errors = []

    def crashing_generate(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    streams = collect(BatchRunner(model, on_fatal=errors.append, generate_fn=crashing_generate), [request([7], 4)])
    assert streams[0] == [SampleFailure(500, "the sampler failed: RuntimeError")]
    assert len(errors) == 1 and "CUDA" in str(errors[0])
