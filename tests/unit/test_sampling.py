"""The diffusion sampler against a literal, step-by-step version of the paper's loop written here.

Legend: B batch, P prompt length, G gen_length, L = P + G, K block_length, V vocab.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llada_core.config import preset
from llada_core.model import LLaDAMoEModelLM
from llada_core.sampling import generate, num_transfer_tokens, select_top_k


def tiny_model(seed: int = 0) -> LLaDAMoEModelLM:
    torch.manual_seed(seed)
    config = preset(
        "tiny", num_hidden_layers=2, vocab_size=64, hidden_size=32, num_attention_heads=4,
        num_key_value_heads=4, expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
    )
    model = LLaDAMoEModelLM(config).eval()
    with torch.no_grad():
        # A fresh init predicts almost uniformly; sharper logits give distinct confidences,
        # so a wrong commit order would change the output.
        model.lm_head.weight.mul_(50.0)
    return model


def random_prompt(batch: int, length: int, model, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Ids 5.. avoid the special tokens (EOS/pad 0, MASK 1, role markers 2-4).
    return torch.randint(5, model.config.vocab_size, (batch, length), generator=g)


class Recorder(nn.Module):
    """Wraps a model and keeps a copy of every input it is given."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner, self.config, self.inputs = model, model.config, []

    def forward(self, input_ids, attention_mask=None):
        self.inputs.append(input_ids.clone())
        return self.inner(input_ids, attention_mask=attention_mask)


class TableModel(nn.Module):
    """Logits that depend only on the absolute position: table[i] at position i."""

    def __init__(self, table_LV: torch.Tensor, config) -> None:
        super().__init__()
        self.table, self.config = table_LV, config

    def forward(self, input_ids, attention_mask=None):
        batch, length = input_ids.shape
        return SimpleNamespace(logits=self.table[:length].expand(batch, -1, -1).clone())


@torch.no_grad()
def literal_generate(model, prompt, steps, gen_length, block_length, temperature=0.0,
                     cfg_scale=0.0, remasking="low_confidence", generator=None):
    """The paper's loop, one position at a time. Random draws per step: Gumbel noise for the
    block [B, K, V] when temperature > 0, then uniform confidences [B, K] for 'random'."""
    mask_id = model.config.mask_token_id
    batch, prompt_length = prompt.shape
    x = torch.cat([prompt, torch.full((batch, gen_length), mask_id)], dim=1)
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for block in range(num_blocks):
        start = prompt_length + block * block_length
        for step in range(steps_per_block):
            count = block_length // steps_per_block + (1 if step < block_length % steps_per_block else 0)
            if cfg_scale > 0:
                unconditional = x.clone()
                unconditional[:, :prompt_length] = mask_id
                cond = model(x).logits.float()
                uncond = model(unconditional).logits.float()
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model(x).logits
            noise = torch.rand(batch, block_length, logits.shape[-1], generator=generator, dtype=torch.float64) if temperature > 0 else None
            random_conf = torch.rand(batch, block_length, generator=generator, dtype=torch.float64) if remasking == "random" else None
            for b in range(batch):
                candidates = []
                for i in range(start, start + block_length):
                    if x[b, i] != mask_id:
                        continue
                    row = logits[b, i].double()
                    scores = row.clone()
                    if temperature > 0:  # the official Gumbel-max formula
                        scores = row.exp() / (-torch.log(noise[b, i - start])) ** temperature
                    scores[mask_id] = -math.inf
                    token = int(scores.argmax())
                    if remasking == "low_confidence":
                        confidence = float(torch.softmax(row, dim=-1)[token])
                    else:
                        confidence = float(random_conf[b, i - start])
                    candidates.append((confidence, i, token))
                candidates.sort(key=lambda c: -c[0])  # stable: ties keep the leftmost first
                for _, i, token in candidates[:count]:
                    x[b, i] = token
    return x


LITERAL_CASES = {
    "greedy": dict(),
    "temperature": dict(temperature=0.8),
    "random_remasking": dict(remasking="random"),
    "random_remasking_with_temperature": dict(remasking="random", temperature=1.3),
    "cfg": dict(cfg_scale=1.5),
    "cfg_with_temperature": dict(cfg_scale=0.5, temperature=0.7),
}


@pytest.mark.parametrize("case", sorted(LITERAL_CASES))
def test_sampler_equals_the_literal_loop(case):
    model = tiny_model()
    prompt = random_prompt(2, 5, model)
    # 2 blocks of 6 with 4 steps each: the schedule 2, 2, 1, 1 in every block.
    args = dict(steps=8, gen_length=12, block_length=6, **LITERAL_CASES[case])
    out = generate(model, prompt, generator=torch.Generator().manual_seed(7), **args)
    expected = literal_generate(model, prompt, generator=torch.Generator().manual_seed(7), **args)
    assert out.shape == (2, 5 + 12)
    assert torch.equal(out, expected)


def test_schedule_spreads_masks_evenly_first_steps_take_the_remainder():
    got = num_transfer_tokens(torch.tensor([10, 4, 3, 0]), 4)
    assert got.tolist() == [[3, 3, 2, 2], [1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]]


def test_commits_per_step_follow_the_schedule_and_the_prompt_is_kept():
    recorder = Recorder(tiny_model())
    prompt = random_prompt(2, 4, recorder)
    out = generate(recorder, prompt, steps=4, gen_length=10, block_length=10)
    mask_id = recorder.config.mask_token_id
    states = [*recorder.inputs, out]
    masks_left = [int((s[0, 4:] == mask_id).sum()) for s in states]
    assert masks_left == [10, 7, 4, 2, 0]  # commits 3, 3, 2, 2
    for state in states:
        assert torch.equal(state[:, :4], prompt)
    assert not (out == mask_id).any()


def test_left_padded_batch_equals_each_prompt_alone():
    model = tiny_model()
    pad_id = model.config.pad_token_id
    prompts = [random_prompt(1, n, model, seed=n)[0] for n in (3, 7, 1)]
    width = max(len(p) for p in prompts)
    batch = torch.full((3, width), pad_id)
    attention_mask = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, width - len(p):] = p
        attention_mask[row, width - len(p):] = 1
    args = dict(steps=6, gen_length=8, block_length=4)
    out = generate(model, batch, attention_mask=attention_mask, **args)
    assert torch.equal(out[:, :width], batch)
    for row, p in enumerate(prompts):
        alone = generate(model, p[None], **args)
        assert torch.equal(out[row, width:], alone[0, len(p):]), f"row {row} differs from its prompt alone"


def test_blocks_fill_left_to_right():
    recorder = Recorder(tiny_model())
    mask_id = recorder.config.mask_token_id
    prompt = random_prompt(2, 3, recorder)
    seen = []
    out = generate(recorder, prompt, steps=6, gen_length=12, block_length=4, temperature=1.0,
                   generator=torch.Generator().manual_seed(0), on_block=seen.append)
    assert len(recorder.inputs) == 6

    def blocks(x):
        return [x[:, 3 + 4 * k: 3 + 4 * (k + 1)] for k in range(3)]

    for state in [*recorder.inputs, out]:
        parts = blocks(state)
        for k in range(2):
            if (parts[k + 1] != mask_id).any():
                assert not (parts[k] == mask_id).any(), "block k+1 committed before block k was full"
    assert [c.blocks for c in seen] == [range(0, 1), range(1, 2), range(2, 3)]
    assert [c.answer_start for c in seen] == [0, 4, 8] and [c.final for c in seen] == [False, False, True]
    assert all((c.tokens_BT != mask_id).all() for c in seen), "a block was handed out before it was final"
    assert torch.equal(torch.cat([c.tokens_BT for c in seen], dim=1), out[:, 3:])


def test_same_generator_seed_same_sample_other_seed_other_sample():
    model = tiny_model()
    prompt = random_prompt(2, 4, model)
    args = dict(steps=8, gen_length=8, block_length=8, temperature=1.5)
    first = generate(model, prompt, generator=torch.Generator().manual_seed(3), **args)
    again = generate(model, prompt, generator=torch.Generator().manual_seed(3), **args)
    other = generate(model, prompt, generator=torch.Generator().manual_seed(4), **args)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def eos_heavy_table(config, length: int) -> torch.Tensor:
    """Positions 0, 2, 4, ... predict EOS almost surely; odd positions predict token 7 less surely."""
    table = torch.zeros(length, config.vocab_size)
    table[0::2, config.eos_token_id] = 12.0
    table[1::2, 7] = 4.0
    return table


def test_logits_eos_inf_never_predicts_eos():
    config = tiny_model().config
    model = TableModel(eos_heavy_table(config, 16), config)
    prompt = torch.full((1, 2), 9)
    args = dict(steps=8, gen_length=8, block_length=8)
    assert (generate(model, prompt, **args)[0, 2:] == config.eos_token_id).any()
    assert not (generate(model, prompt, logits_eos_inf=True, **args)[0, 2:] == config.eos_token_id).any()


def test_confidence_eos_eot_inf_commits_stop_tokens_last():
    config = tiny_model().config
    eot_id = 4
    table = eos_heavy_table(config, 16)
    table[3, eot_id] = 20.0  # answer position 1 predicts end-of-turn with the top confidence
    recorder = Recorder(TableModel(table, config))
    prompt = torch.full((1, 2), 9)
    args = dict(steps=8, gen_length=8, block_length=8, eot_id=eot_id)
    plain = generate(recorder, prompt, **args)
    assert plain[0, 3] == eot_id and len(recorder.inputs) == 8
    assert recorder.inputs[1][0, 3] == eot_id  # the most confident goes first without the flag
    recorder.inputs.clear()
    demoted = generate(recorder, prompt, confidence_eos_eot_inf=True, **args)
    assert torch.equal(demoted, plain)  # same tokens, only the order of commits changes
    stop = torch.tensor([config.eos_token_id, eot_id])
    committed_order = []
    for before, after in zip(recorder.inputs, [*recorder.inputs[1:], demoted]):
        committed_order += [int(after[0, i]) for i in range(2, 10) if before[0, i] != after[0, i]]
    assert len(committed_order) == 8
    assert committed_order[:3] == [7, 7, 7]  # every ordinary prediction first, then EOS/EOT
    assert all(t in stop for t in committed_order[3:])


def test_select_top_k_takes_the_most_confident_per_row_with_leftmost_ties():
    confidence = torch.tensor([[0.1, 0.9, -math.inf, 0.5], [0.3, 0.3, 0.3, 0.2]])
    chosen = select_top_k(confidence, torch.tensor([2, 2]))
    assert chosen.tolist() == [[False, True, False, True], [True, True, False, False]]


def test_empty_prompt_generates_unconditionally():
    model = tiny_model()
    out = generate(model, torch.zeros(2, 0, dtype=torch.long), steps=4, gen_length=4, block_length=2)
    assert out.shape == (2, 4) and not (out == model.config.mask_token_id).any()


BAD_ARGUMENTS = [
    ("steps", dict(steps=0)),
    ("steps", dict(steps=3, gen_length=8, block_length=4)),
    ("steps", dict(steps=16, gen_length=8, block_length=8)),
    ("gen_length", dict(gen_length=-8)),
    ("block_length", dict(gen_length=10, block_length=4, steps=5)),
    ("block_length", dict(block_length=2.0)),
    ("temperature", dict(temperature=-0.5)),
    ("cfg_scale", dict(cfg_scale=float("nan"))),
    ("remasking", dict(remasking="top_p")),
    ("mask_id", dict(mask_id=10_000)),
    ("eot_id", dict(eot_id=-3)),
    ("prompt", dict(prompt=torch.tensor([5, 6, 7]))),
    ("prompt", dict(prompt=torch.tensor([[5.0, 6.0]]))),
    ("prompt", dict(prompt=torch.tensor([[5, 1, 7]]))),  # 1 is the tiny preset's mask id
    ("attention_mask", dict(attention_mask=torch.ones(1, 2, dtype=torch.long))),
    ("attention_mask", dict(attention_mask=torch.tensor([[0, 2, 1]]))),
]


@pytest.mark.parametrize("name,kwargs", BAD_ARGUMENTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_raise_value_error_naming_the_argument(name, kwargs):
    model = tiny_model()
    args = dict(prompt=torch.tensor([[5, 6, 7]]), steps=8, gen_length=8, block_length=8)
    args.update(kwargs)
    prompt = args.pop("prompt")
    with pytest.raises(ValueError, match=rf"^{name}:"):
        generate(model, prompt, **args)


def test_pad_positions_may_hold_the_mask_id():
    model = tiny_model()
    mask_id = model.config.mask_token_id
    prompt = torch.tensor([[mask_id, 5, 6]])
    out = generate(model, prompt, attention_mask=torch.tensor([[0, 1, 1]]), steps=4, gen_length=4, block_length=4)
    alone = generate(model, prompt[:, 1:], steps=4, gen_length=4, block_length=4)
    assert torch.equal(out[:, :3], prompt), "padding is returned as given, never filled"
    assert torch.equal(out[:, 3:], alone[:, 2:])
