"""Fast sampling options (threshold, prefix/dual KV cache, early stop) against the reference sampler.

Legend: B batch, P prompt length, G gen_length, L = P + G, K block_length, V vocab.

The reference sampler itself is held to a literal loop in test_sampling.py; here every fast
option is compared with it where they must agree, and with hand-made logits where the option
is meant to differ.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llada_core.config import preset
from llada_core.model import LLaDAMoEModelLM
from llada_core.sampling import generate, threshold_counts


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """These models are a few thousand parameters: on a small shared CPU, intra-op threads only
    contend (25x slower measured on 2 busy cores). Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0, num_layers: int = 2, sharpen: float = 50.0) -> LLaDAMoEModelLM:
    torch.manual_seed(seed)
    config = preset(
        "tiny", num_hidden_layers=num_layers, vocab_size=64, hidden_size=32, num_attention_heads=4,
        num_key_value_heads=2, expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
    )
    model = LLaDAMoEModelLM(config).eval()
    with torch.no_grad():
        # Sharper logits give distinct confidences, so a wrong commit changes the output.
        model.lm_head.weight.mul_(sharpen)
    return model


def random_prompt(batch: int, length: int, vocab_size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab_size, (batch, length), generator=g)  # 0-4 are special ids


def left_padded(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), width), pad_id)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, width - len(p):] = p
        attention_mask[row, width - len(p):] = 1
    return batch, attention_mask


class Recorder(nn.Module):
    """Keeps a copy of every input and the keyword arguments of every call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner, self.config, self.inputs, self.kwargs = model, model.config, [], []

    def forward(self, input_ids, attention_mask=None):
        self.inputs.append(input_ids.clone())
        self.kwargs.append({"attention_mask": attention_mask})
        return self.inner(input_ids, attention_mask=attention_mask)


class RowTableModel(nn.Module):
    """Logits that depend only on the row's first token and the absolute position:
    ``tables[first_token][i]`` at position i. Hand-made confidences, no context."""

    def __init__(self, tables: dict[int, torch.Tensor], config) -> None:
        super().__init__()
        self.tables, self.config, self.num_calls = tables, config, 0

    def forward(self, input_ids, attention_mask=None):
        self.num_calls += 1
        length = input_ids.shape[1]
        rows = [self.tables[int(first)][:length] for first in input_ids[:, 0]]
        return SimpleNamespace(logits=torch.stack(rows).clone())


def confident(config, length: int, tokens_and_logits: dict[int, tuple[int, float]]) -> torch.Tensor:
    """A [length, V] table: position i predicts token t with logit z (others 0) for i: (t, z)."""
    table = torch.zeros(length, config.vocab_size)
    for position, (token, logit) in tokens_and_logits.items():
        table[position, token] = logit
    return table


def logit_for(probability: float, vocab_size: int) -> float:
    """The logit z such that softmax([z, 0, ..., 0])[0] == probability."""
    return math.log(probability * (vocab_size - 1) / (1 - probability))


# ---------------------------------------------------------------- options off = the reference


def test_options_off_is_the_reference_loop_unchanged():
    recorder = Recorder(tiny_model())
    prompt = random_prompt(2, 4, 64)
    args = dict(steps=8, gen_length=12, block_length=6, temperature=0.7)
    default = generate(recorder, prompt, generator=torch.Generator().manual_seed(5), **args)
    calls_default = len(recorder.inputs)
    explicit = generate(recorder, prompt, generator=torch.Generator().manual_seed(5),
                        threshold=None, cache=None, early_stop=False, **args)
    assert torch.equal(default, explicit)
    # The reference path: one full [B, L] forward per step, with nothing but the attention mask.
    assert calls_default == 8 and len(recorder.inputs) == 16
    assert all(x.shape == (2, 16) for x in recorder.inputs)


# ---------------------------------------------------------------- the KV cache in the model


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_forward_of_the_block_equals_the_full_forward(mode):
    model = tiny_model(num_layers=3)
    config = model.config
    prompt, prompt_mask = left_padded([random_prompt(1, n, 64, seed=n)[0] for n in (3, 6)], config.pad_token_id)
    g = torch.Generator().manual_seed(0)
    answer = torch.randint(5, 64, (2, 12), generator=g)
    answer[:, 7:] = config.mask_token_id  # a partly committed answer, the rest masked
    x_BL = torch.cat([prompt, answer], dim=1)
    mask_BL = torch.cat([prompt_mask, torch.ones(2, 12, dtype=torch.long)], dim=1)
    start, stop = 6 + 4, 6 + 8  # the block: answer positions 4..7
    full = model(x_BL, attention_mask=mask_BL, use_cache=True)
    span_stop = x_BL.shape[1] if mode == "prefix" else stop
    cached = model(x_BL[:, start:span_stop], past_key_values=full.past_key_values, cache_start=start)
    torch.testing.assert_close(cached.logits, full.logits[:, start:span_stop], rtol=1e-5, atol=1e-5)
    # The same again with only the block's logits computed.
    sliced = model(x_BL[:, start:span_stop], past_key_values=full.past_key_values, cache_start=start,
                   logits_slice=slice(0, stop - start))
    torch.testing.assert_close(sliced.logits, full.logits[:, start:stop], rtol=1e-5, atol=1e-5)
    # Each padded row equals itself alone (the cache keeps its padding mask and positions).
    for row, length in ((0, 3), (1, 6)):
        alone = model(x_BL[row:row + 1, 6 - length:]).logits[0, start - (6 - length):stop - (6 - length)]
        torch.testing.assert_close(sliced.logits[row], alone, rtol=1e-5, atol=1e-5)


def test_cached_forward_at_per_row_starts_equals_each_rows_full_forward():
    """cache_start and logits_slice per row (continuous batching: rows at different blocks)."""
    model = tiny_model(num_layers=3)
    x_BL = torch.cat([random_prompt(1, 14, 64, seed=1), random_prompt(1, 14, 64, seed=2)])
    x_BL[0, 6:] = model.config.mask_token_id
    x_BL[1, 10:] = model.config.mask_token_id
    starts_B = torch.tensor([2, 9])
    columns_BK = starts_B[:, None] + torch.arange(4)
    full = model(x_BL, use_cache=True, logits_slice=columns_BK)
    expected = torch.stack([model(x_BL).logits[b, columns_BK[b]] for b in range(2)])
    torch.testing.assert_close(full.logits, expected, rtol=1e-5, atol=1e-5)
    cached = model(x_BL.gather(1, columns_BK), past_key_values=full.past_key_values, cache_start=starts_B)
    torch.testing.assert_close(cached.logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="^cache_start:"):
        model(x_BL.gather(1, columns_BK), past_key_values=full.past_key_values, cache_start=torch.tensor([2, 11]))


def test_cache_keys_carry_rope_at_absolute_positions():
    model = tiny_model()
    x_BL = random_prompt(1, 10, 64)
    full = model(x_BL, use_cache=True)
    # A span fed at the wrong offset must give other logits: positions come from the cache.
    right = model(x_BL[:, 4:8], past_key_values=full.past_key_values, cache_start=4).logits
    full = model(x_BL, use_cache=True)
    wrong = model(x_BL[:, 4:8], past_key_values=full.past_key_values, cache_start=4,
                  position_ids=torch.arange(4)[None]).logits
    torch.testing.assert_close(right, full.logits[:, 4:8], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(right, wrong, atol=1e-3)


def test_cached_forward_rejects_inconsistent_arguments():
    model = tiny_model()
    x_BL = random_prompt(1, 10, 64)
    cache = model(x_BL, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="^cache_start:"):
        model(x_BL[:, 4:8], past_key_values=cache, cache_start=8)
    with pytest.raises(ValueError, match="^attention_mask:"):
        model(x_BL[:, 4:8], attention_mask=torch.ones(1, 4), past_key_values=cache, cache_start=4)
    with pytest.raises(ValueError, match="^cache_start:"):
        model(x_BL, cache_start=0)


# ---------------------------------------------------------------- the cached sampler


CACHE_CASES = {
    "greedy": dict(),
    "temperature": dict(temperature=0.9),
    "cfg": dict(cfg_scale=1.5),
    "threshold": dict(threshold=0.6),
}


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("case", sorted(CACHE_CASES))
def test_cached_sampler_equals_uncached_where_the_cache_is_exact(mode, case):
    # With one layer a position's keys/values depend on its own token only, so cached keys of
    # unchanged positions are exact and the cached sampler must make the very same commits.
    model = tiny_model(num_layers=1)
    prompt, mask = left_padded([random_prompt(1, n, 64, seed=n)[0] for n in (2, 5)], model.config.pad_token_id)
    args = dict(steps=12, gen_length=12, block_length=4, attention_mask=mask, **CACHE_CASES[case])
    expected = generate(model, prompt, generator=torch.Generator().manual_seed(3), **args)
    out = generate(model, prompt, generator=torch.Generator().manual_seed(3), cache=mode, **args)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_each_step_after_the_first_recomputes_only_its_span(mode):
    model = tiny_model()
    calls = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0].shape[1], kwargs.get("cache_start"))), with_kwargs=True
    )
    prompt = random_prompt(2, 3, 64)
    generate(model, prompt, steps=9, gen_length=9, block_length=3, cache=mode)  # 3 steps per block
    # (input length, cache_start): a full forward of L = 12 at each block start, then the span.
    if mode == "prefix":
        expected = [(12, None), (9, 3), (9, 3), (12, None), (6, 6), (6, 6), (12, None), (3, 9), (3, 9)]
    else:
        expected = [(12, None), (3, 3), (3, 3), (12, None), (3, 6), (3, 6), (12, None), (3, 9), (3, 9)]
    assert calls == expected


def test_cache_is_an_approximation_with_more_layers():
    # The counterpart of the test above: with 2 layers the stale cache does change something,
    # so the exactness above is a property of the one-layer model, not a no-op cache.
    model = tiny_model(num_layers=2, sharpen=5.0)
    prompt = random_prompt(4, 5, 64)
    args = dict(steps=32, gen_length=32, block_length=16)
    reference = generate(model, prompt, **args)
    cached = generate(model, prompt, cache="dual", **args)
    assert not torch.equal(cached, reference)


@pytest.mark.parametrize("options", [
    dict(cache="prefix", threshold=0.5),
    dict(cache="dual", threshold=0.5, early_stop=True),
    dict(cache="dual", cfg_scale=1.0),
], ids=["prefix-threshold", "dual-threshold-early_stop", "dual-cfg"])
def test_batch_equals_its_rows_alone_with_cache_and_threshold(options):
    model = tiny_model(sharpen=20.0)
    prompts = [random_prompt(1, n, 64, seed=n)[0] for n in (3, 7, 1)]
    batch, mask = left_padded(prompts, model.config.pad_token_id)
    args = dict(steps=12, gen_length=12, block_length=4, **options)
    out = generate(model, batch, attention_mask=mask, **args)
    for row, p in enumerate(prompts):
        alone = generate(model, p[None], **args)
        assert torch.equal(out[row, batch.shape[1]:], alone[0, len(p):]), f"row {row} differs from its prompt alone"


# ---------------------------------------------------------------- threshold


def test_threshold_counts_everything_at_or_above_tau_and_at_least_one():
    confidence = torch.tensor([
        [0.95, 0.9, 0.2, -math.inf],  # two at or above 0.9
        [0.3, 0.1, -math.inf, 0.5],  # none above: the top one
        [-math.inf, -math.inf, -math.inf, -math.inf],  # nothing masked: nothing
        [-1.0, -math.inf, -1.0, -math.inf],  # only demoted EOS left: still one
    ], dtype=torch.float64)
    assert threshold_counts(confidence, 0.9).tolist() == [2, 1, 0, 1]


def test_threshold_commits_confident_positions_together_then_one_at_a_time():
    config = tiny_model().config
    v = config.vocab_size
    # Prompt of 1; a block of 4: confidences 0.95, 0.92, 0.6, 0.3 for tokens 7, 8, 9, 10.
    table = confident(config, 5, {1: (7, logit_for(0.95, v)), 2: (8, logit_for(0.92, v)),
                                  3: (9, logit_for(0.6, v)), 4: (10, logit_for(0.3, v))})
    model = RowTableModel({20: table}, config)
    out = generate(model, torch.tensor([[20]]), steps=4, gen_length=4, block_length=4, threshold=0.9)
    assert out[0, 1:].tolist() == [7, 8, 9, 10]
    assert model.num_calls == 3  # {7, 8} together, then 9 alone, then 10 alone
    model.num_calls = 0
    generate(model, torch.tensor([[20]]), steps=4, gen_length=4, block_length=4, threshold=0.5)
    assert model.num_calls == 2  # {7, 8, 9}, then 10


def test_threshold_one_is_one_token_per_step_like_the_reference_with_steps_equal_gen_length():
    recorder = Recorder(tiny_model(sharpen=10.0))
    prompt, mask = left_padded([random_prompt(1, n, 64, seed=n)[0] for n in (2, 4)], 0)
    reference = generate(recorder, prompt, attention_mask=mask, steps=12, gen_length=12, block_length=4)
    assert len(recorder.inputs) == 12
    recorder.inputs.clear()
    # steps is unused with a threshold: a block takes as many steps as it needs.
    out = generate(recorder, prompt, attention_mask=mask, steps=3, gen_length=12, block_length=4, threshold=1.0)
    assert torch.equal(out, reference)
    assert len(recorder.inputs) == 12
    masks_left = [int((x[:, 4:] == recorder.config.mask_token_id).sum(-1)[0]) for x in recorder.inputs]
    assert masks_left == list(range(12, 0, -1))


# ---------------------------------------------------------------- early stop


def test_early_stop_stops_after_a_block_ending_in_eos_and_fills_eos():
    config = tiny_model().config
    eos = config.eos_token_id
    # Row "20": 7 7 EOS EOS | 8 8 8 8 | ... : the first block closes on EOS, so it stops there
    # (the reference would go on to write 8s after the EOS).
    # Row "21": 7 EOS 7 7 | 7 7 7 EOS | ... : an EOS inside a block is not the end.
    length = 1 + 12
    stop_row = confident(config, length, {1: (7, 9.0), 2: (7, 9.0), 3: (eos, 9.0), 4: (eos, 9.0),
                                          **{i: (8, 9.0) for i in range(5, length)}})
    late_row = confident(config, length, {1: (7, 9.0), 2: (eos, 9.0), 3: (7, 9.0), 4: (7, 9.0),
                                          5: (7, 9.0), 6: (7, 9.0), 7: (7, 9.0), 8: (eos, 9.0),
                                          **{i: (9, 9.0) for i in range(9, length)}})
    model = RowTableModel({20: stop_row, 21: late_row}, config)
    args = dict(steps=12, gen_length=12, block_length=4)
    reference = generate(model, torch.tensor([[20], [21]]), **args)
    assert reference[0, 5:].tolist() == [8] * 8 and reference[1, 9:].tolist() == [9] * 4

    model.num_calls = 0
    seen = []
    out = generate(model, torch.tensor([[20]]), early_stop=True, on_block=seen.append, **args)
    assert out[0, 1:].tolist() == [7, 7, eos, eos] + [eos] * 8
    assert model.num_calls == 4  # block 0 only (4 steps)
    # One call that hands out every block, the one with the answer first: nothing is lost.
    assert [(c.blocks, c.answer_start, c.final) for c in seen] == [(range(0, 3), 0, True)]
    assert seen[0].tokens_BT.tolist() == [out[0, 1:].tolist()]

    model.num_calls = 0
    out = generate(model, torch.tensor([[20], [21]]), early_stop=True, **args)
    assert out[0, 1:].tolist() == [7, 7, eos, eos] + [eos] * 8
    assert out[1, 1:].tolist() == [7, eos, 7, 7, 7, 7, 7, eos] + [eos] * 4  # row 21 stops after block 1
    assert model.num_calls == 8


def test_early_stop_changes_nothing_when_the_model_pads_with_eos():
    config = tiny_model().config
    # An SFT-like model: a 6-token answer, then EOS to the end.
    answer = {1 + j: (7 + j, 9.0) for j in range(6)}
    padding = {1 + j: (config.eos_token_id, 9.0) for j in range(6, 16)}
    model = RowTableModel({20: confident(config, 17, {**answer, **padding})}, config)
    args = dict(steps=16, gen_length=16, block_length=4, threshold=0.9)
    full = generate(model, torch.tensor([[20]]), **args)
    calls_full, model.num_calls = model.num_calls, 0
    stopped = generate(model, torch.tensor([[20]]), early_stop=True, **args)
    assert torch.equal(stopped, full)
    assert (calls_full, model.num_calls) == (4, 2)  # one step per block; stops after block 1


# ---------------------------------------------------------------- bad option values


BAD_OPTIONS = [
    ("threshold", dict(threshold=0.0)),
    ("threshold", dict(threshold=1.5)),
    ("threshold", dict(threshold=float("nan"))),
    ("threshold", dict(threshold=True)),
    ("threshold", dict(threshold="0.9")),
    ("threshold", dict(threshold=0.9, remasking="random")),
    ("cache", dict(cache="full")),
    ("cache", dict(cache=True)),
    ("cache", dict(cache="dual", model="recorder")),  # a model whose forward takes no cache
    ("early_stop", dict(early_stop="yes")),
    ("early_stop", dict(early_stop=1)),
]


@pytest.mark.parametrize("name,kwargs", BAD_OPTIONS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_OPTIONS)])
def test_bad_option_values_raise_value_error_naming_the_option(name, kwargs):
    kwargs = dict(kwargs)
    model = tiny_model()
    if kwargs.pop("model", None) == "recorder":
        model = Recorder(model)
    with pytest.raises(ValueError, match=rf"^{name}:"):
        generate(model, torch.tensor([[5, 6, 7]]), steps=8, gen_length=8, block_length=8, **kwargs)
