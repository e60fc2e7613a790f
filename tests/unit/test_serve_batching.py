"""Continuous batching of sampling requests (serve/batching.py, llada_core.sampling.next_blocks),
without Ray: which requests share the running batch, every row equal to the request served alone
(mixed gen_length, mixed prompt lengths, rows at different blocks, joins mid-flight), and the
batcher's joins, leaves, failures and counts.

Legend: B batch, P prompt width, G gen_length, K block_length.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import torch

from llada_core import BlockRow, LLaDAMoEModelLM, SamplingOptions, generate, left_pad, next_blocks, preset
from llada_core.sampling import resolve
from serve.batching import BlockUpdate, ContinuousBatcher, SampleFailure, SampleRequest, batch_key


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
            name: str = "r", seed: int | None = None, deadline: float = math.inf, **options: object) -> SampleRequest:
    gen_length = math.ceil(max_tokens / block_length) * block_length
    sampling = SamplingOptions(gen_length=gen_length, steps=steps or gen_length, block_length=block_length, **options)
    return SampleRequest(request_id=name, prompt_ids=tuple(prompt), max_tokens=max_tokens, options=sampling,
                         seed=seed, deadline=deadline)


def prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(5, 64, (length,), generator=generator).tolist()  # ids 0-4 are special


def alone(model: LLaDAMoEModelLM, single: SampleRequest) -> tuple[int, ...]:
    """The request's answer from generate() on its prompt alone (the bar for every batched row)."""
    generator = None
    if single.seed is not None:
        generator = torch.Generator().manual_seed(single.seed)
    ids = torch.tensor([single.prompt_ids], dtype=torch.long).reshape(1, -1)
    x = generate(model, ids, options=single.options, eot_id=single.eot_id, generator=generator)
    return tuple(x[0, len(single.prompt_ids):len(single.prompt_ids) + single.max_tokens].tolist())


def serve_all(batcher: ContinuousBatcher, arrivals: list[tuple[int, SampleRequest]]) -> dict[str, list]:
    """Each request's stream; ``(n, request)`` sends the request once n updates of earlier
    requests have arrived (joins while the batch runs)."""
    streams: dict[str, list] = {}
    seen = asyncio.Event

    async def drive() -> None:
        counter = {"updates": 0}
        progressed = seen()

        async def one(after: int, single: SampleRequest) -> None:
            while counter["updates"] < after:
                progressed.clear()
                await progressed.wait()
            items = streams.setdefault(single.request_id, [])
            async for item in batcher.stream(single):
                items.append(item)
                counter["updates"] += 1
                progressed.set()

        await asyncio.gather(*(one(after, single) for after, single in arrivals))

    asyncio.run(drive())
    return streams


def answer_of(updates: list) -> tuple[int, ...]:
    assert all(isinstance(u, BlockUpdate) for u in updates), updates
    assert updates[-1].final, "the last update must be final"
    assert [u.blocks_done for u in updates] == sorted(set(u.blocks_done for u in updates)), "blocks out of order"
    return sum((u.token_ids for u in updates), ())


# ---------------------------------------------------------------- who may share a batch


def test_lengths_and_steps_share_the_running_batch_other_settings_do_not():
    base = request([5], max_tokens=8)
    assert batch_key(base) == batch_key(request([6, 7], max_tokens=128)) == batch_key(request([8], 8, steps=4))
    assert batch_key(base) == batch_key(request([9], 8, early_stop=True))
    for other in (request([5], 8, block_length=8), request([5], 8, temperature=0.5), request([5], 8, cfg_scale=1.0),
                  request([5], 8, threshold=0.9), request([5], 8, cache="dual"), request([5], 8, logits_eos_inf=True)):
        assert batch_key(other) != batch_key(base), other.options
    seeded = [request([5], 8, name=n, temperature=0.5, seed=3) for n in "ab"]
    assert batch_key(seeded[0]) != batch_key(seeded[1])  # a seeded stochastic request runs alone
    assert batch_key(request([5], 8, name="a", temperature=0.5)) == batch_key(request([6], 8, name="b", temperature=0.5))


def test_left_pad_gives_no_mask_when_lengths_match_and_pads_on_the_left_otherwise():
    ids, mask = left_pad([[5, 6], [7, 8]], pad_id=0)
    assert ids.tolist() == [[5, 6], [7, 8]] and mask is None
    ids, mask = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_gen_length_changes_a_rows_answer_so_each_row_keeps_its_own_tail(model):
    """Why rows must not share a tail: the same prompt generated to 8 and to 16 tokens commits
    different first 8 tokens (bidirectional attention sees the extra masks)."""
    same_prompt = prompt(6, 11)
    assert alone(model, request(same_prompt, max_tokens=8)) != alone(model, request(same_prompt, max_tokens=16))[:8]


# ---------------------------------------------------------------- next_blocks: equal to alone

SETTINGS = {
    "reference": {},
    "threshold": {"threshold": 0.9},
    "prefix": {"cache": "prefix"},
    "dual": {"cache": "dual"},
    "fast": {"threshold": 0.9, "cache": "dual"},
    "cfg": {"cfg_scale": 1.5, "cache": "dual"},
}


def run_rows_block_by_block(model, requests: list[SampleRequest], starts: list[int]) -> list[tuple[int, ...]]:
    """Sample every request with next_blocks in one batch whose rows start at different rounds
    (request i joins at round starts[i]) -> each one's whole answer (before max_tokens)."""
    run = resolve(model, requests[0].options)
    answers = {i: () for i in range(len(requests))}
    finished: set[int] = set()
    round_index = 0
    while len(finished) < len(requests):
        active = [i for i in range(len(requests)) if starts[i] <= round_index and i not in finished]
        if active:
            rows = [BlockRow(requests[i].prompt_ids, answers[i], requests[i].options.gen_length,
                             requests[i].options.steps_per_block) for i in active]
            blocks, forwards = next_blocks(model, rows, run)
            assert all(f >= 1 for f in forwards)
            for i, block in zip(active, blocks, strict=True):
                answers[i] += block
                if len(answers[i]) == requests[i].options.gen_length:
                    finished.add(i)
        round_index += 1
    return [answers[i] for i in range(len(requests))]


@pytest.mark.parametrize("name", SETTINGS)
def test_rows_of_mixed_lengths_and_blocks_equal_each_request_alone(model, name):
    """Prompts of 7, 3, 1 and 0 tokens; answers of 4, 16, 8 and 12 tokens; two rows join after
    others have final blocks, so a batch holds rows at blocks 0, 1 and 2 at once."""
    fast = SETTINGS[name]
    requests = [request(prompt(7, 1), 4, name="a", **fast), request(prompt(3, 2), 16, name="b", **fast),
                request(prompt(1, 3), 8, name="c", **fast), request([], 12, name="d", **fast)]
    answers = run_rows_block_by_block(model, requests, starts=[0, 0, 1, 2])
    for single, answer in zip(requests, answers, strict=True):
        assert answer[:single.max_tokens] == alone(model, single), f"{single.request_id} differs from alone"


def test_rows_with_their_own_fixed_steps_equal_each_request_alone(model):
    requests = [request(prompt(4, 1), 8, steps=8, name="a"), request(prompt(2, 2), 8, steps=2, name="b"),
                request(prompt(5, 3), 12, steps=6, name="c")]
    answers = run_rows_block_by_block(model, requests, starts=[0, 1, 0])
    for single, answer in zip(requests, answers, strict=True):
        assert answer == alone(model, single), f"{single.request_id} differs from alone"


def test_a_row_alone_is_exactly_the_official_generate_call(model):
    single = request(prompt(5, 7), max_tokens=8, block_length=4, steps=4)
    expected = generate(model, torch.tensor([single.prompt_ids]), steps=4, gen_length=8, block_length=4)
    assert run_rows_block_by_block(model, [single], [0])[0] == tuple(expected[0, 5:13].tolist())


def test_a_row_with_no_next_block_is_refused(model):
    run = resolve(model, SamplingOptions(gen_length=8, block_length=4, steps=8))
    with pytest.raises(ValueError, match="no next block"):
        next_blocks(model, [BlockRow((5,), (6, 7, 8, 9, 10, 11, 12, 13), 8, 2)], run)


# ---------------------------------------------------------------- the batcher


def test_mixed_lengths_join_mid_flight_and_each_answer_equals_alone(model):
    """A 16-token request starts alone; an 4-, 8- and 12-token one join while it runs, and the
    4-token one is answered long before the 16-token one is."""
    fast = {"threshold": 0.9, "cache": "dual", "early_stop": False}
    requests = [request(prompt(6, 1), 16, name="long", **fast), request(prompt(2, 2), 4, name="short", **fast),
                request(prompt(9, 3), 8, name="mid", **fast), request([], 12, name="empty", **fast)]
    batcher = ContinuousBatcher(model, max_batch_size=4)
    streams = serve_all(batcher, [(0, requests[0]), (1, requests[1]), (1, requests[2]), (2, requests[3])])
    for single in requests:
        assert answer_of(streams[single.request_id]) == alone(model, single), single.request_id
    assert batcher.stats.joined_running >= 3, batcher.stats
    assert batcher.stats.rounds < sum(r.options.num_blocks for r in requests), "rows never shared a round"
    assert batcher.stats.max_rows >= 3
    assert batcher.running == 0 and batcher.queue_depth == 0


def test_updates_count_the_forwards_each_request_needs_alone(model):
    fast = {"threshold": 0.9, "cache": "dual"}
    requests = [request(prompt(3, n), 4 * (n + 1), name=str(n), **fast) for n in range(3)]
    together = serve_all(ContinuousBatcher(model, max_batch_size=3), [(0, r) for r in requests])
    for single in requests:
        apart = serve_all(ContinuousBatcher(model), [(0, single)])[single.request_id]
        mine = together[single.request_id]
        assert [u.forwards for u in mine] == [u.forwards for u in apart]
        assert all(1 <= u.forwards <= 4 for u in mine)  # threshold: 1 to K forwards per block


def test_early_stop_ends_a_row_at_eos_with_eos_to_its_end(model):
    eos = model.config.eos_token_id
    biased = LLaDAMoEModelLM(model.config).eval()
    biased.load_state_dict(model.state_dict())
    biased.lm_head.register_forward_hook(lambda module, args, out: out.index_add(
        -1, torch.tensor([eos]), torch.full((*out.shape[:-1], 1), 1e3)))  # EOS everywhere
    single = request(prompt(3, 4), 16, early_stop=True)
    updates = serve_all(ContinuousBatcher(biased), [(0, single)])["r"]
    assert len(updates) == 1 and updates[0].final and updates[0].blocks_done == 4
    assert answer_of(updates) == alone(biased, single) == (eos,) * 16


def test_seeded_stochastic_request_runs_alone_and_reproduces_its_seed(model):
    seeded = request(prompt(4, 1), 8, name="seeded", temperature=1.0, seed=11)
    others = [request(prompt(3, n), 8, name=f"o{n}", temperature=1.0) for n in range(2)]
    batcher = ContinuousBatcher(model, max_batch_size=4)
    streams = serve_all(batcher, [(0, others[0]), (0, seeded), (0, others[1])])
    assert answer_of(streams["seeded"]) == alone(model, seeded)
    assert all(answer_of(streams[o.request_id]) for o in others)


def test_a_request_of_another_key_waits_for_the_batch_to_drain_and_is_not_starved(model):
    rounds: list[list[str]] = []

    def recording_step(model_, rows, run, generator):
        rounds.append([f"{len(row.prompt_ids)}:{run.options.block_length}" for row in rows])
        return next_blocks(model_, rows, run, generator)

    first = request(prompt(1, 1), 12, name="first")
    other = request(prompt(2, 2), 8, block_length=8, name="other")
    late = request(prompt(3, 3), 4, name="late")  # first's key, but it arrived after `other`
    batcher = ContinuousBatcher(model, max_batch_size=4, step_fn=recording_step)
    streams = serve_all(batcher, [(0, first), (1, other), (1, late)])
    assert rounds == [["1:4"], ["1:4"], ["1:4"], ["2:8"], ["3:4"]]
    for single in (first, other, late):
        assert answer_of(streams[single.request_id]) == alone(model, single)


def test_a_caller_that_leaves_is_dropped_at_the_next_block_boundary(model):
    rows_per_round: list[int] = []

    def recording_step(model_, rows, run, generator):
        rows_per_round.append(len(rows))
        return next_blocks(model_, rows, run, generator)

    batcher = ContinuousBatcher(model, max_batch_size=4, step_fn=recording_step)
    keeps, leaves = request(prompt(2, 1), 16, name="keeps"), request(prompt(2, 2), 16, name="leaves")

    async def drive() -> tuple[int, int]:
        async def one(single: SampleRequest, limit: int | None) -> int:
            received = 0
            async for _ in batcher.stream(single):
                received += 1
                if received == limit:
                    break
            return received

        return tuple(await asyncio.gather(one(keeps, None), one(leaves, 1)))

    assert asyncio.run(drive()) == (4, 1)
    assert rows_per_round[0] == 2 and rows_per_round[-1] == 1 and len(rows_per_round) == 4


def test_expired_requests_get_504_and_bad_arguments_400(model):
    expired = request([5, 6], 4, name="late", deadline=time.time() - 1)

    def broken_step(*args):
        raise ValueError("steps: not allowed here")

    streams = serve_all(ContinuousBatcher(model, step_fn=broken_step), [(0, expired), (0, request([7], 4))])
    assert streams["late"] == [SampleFailure(504, "the request timed out in the sampler")]
    assert streams["r"] == [SampleFailure(400, "steps: not allowed here")]


def test_unexpected_errors_are_500_and_tell_the_replica(model):
    errors: list[BaseException] = []

    def crashing_step(*args):
        raise RuntimeError("CUDA error: device-side assert triggered")

    batcher = ContinuousBatcher(model, on_fatal=errors.append, step_fn=crashing_step)
    streams = serve_all(batcher, [(0, request([7], 4))])
    assert streams["r"] == [SampleFailure(500, "the sampler failed: RuntimeError")]
    assert len(errors) == 1 and "CUDA" in str(errors[0])


def test_when_idle_the_first_request_waits_briefly_for_others(model):
    batcher = ContinuousBatcher(model, max_batch_size=4, idle_wait_s=0.5)

    async def drive() -> None:
        async def one(single: SampleRequest, delay: float) -> None:
            await asyncio.sleep(delay)
            async for _ in batcher.stream(single):
                pass

        await asyncio.gather(*(one(request(prompt(2, n), 4, name=str(n)), 0.05 * n) for n in range(3)))

    asyncio.run(drive())
    assert batcher.stats.rounds == 1 and batcher.stats.max_rows == 3


def test_a_full_replica_refuses_at_once_with_503_and_takes_requests_again_when_room_frees(model):
    """capacity counts running and waiting requests; the one past it gets a 503 failure without
    waiting, and once the batch has answered, requests are taken again."""
    batcher = ContinuousBatcher(model, max_batch_size=2, capacity=3)

    async def drive() -> list[list]:
        streams: list[list] = [[] for _ in range(5)]

        async def one(index: int, single: SampleRequest) -> None:
            async for item in batcher.stream(single):
                streams[index].append(item)

        first = [asyncio.create_task(one(i, request(prompt(2, i), 8, name=str(i)))) for i in range(4)]
        await asyncio.gather(*first)
        await one(4, request(prompt(2, 4), 8, name="4"))
        return streams

    streams = asyncio.run(drive())
    refused = [s for s in streams if len(s) == 1 and isinstance(s[0], SampleFailure)]
    assert len(refused) == 1 and refused[0][0].status == 503 and "queue is full" in refused[0][0].message
    assert sum(answer_of(s) != () for s in streams if s not in refused) == 4
    assert batcher.stats.refused == 1 and batcher.stats.max_rows == 2


def test_with_the_dual_cache_a_round_is_as_wide_as_its_longest_row(model):
    """Rows at different blocks keep their own columns: no padding to align their blocks (the
    aligned layout would be 3 + 8 + 4 + 8 = 23 wide here, the longest row is 3 + 16 = 19)."""
    widths: list[int] = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(args[0].shape[1]),
                                           with_kwargs=True)
    try:
        run = resolve(model, SamplingOptions(gen_length=16, block_length=4, steps=16, cache="dual"))
        rows = [BlockRow((5, 6, 7), (8,) * 8, 16, 4), BlockRow((9,), (), 16, 4)]
        next_blocks(model, rows, run)
    finally:
        hook.remove()
    assert widths[0] == 3 + 16 and set(widths[1:]) == {4}  # the full forward, then the blocks alone
