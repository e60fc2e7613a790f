"""The Monte Carlo ELBO against hand computations on fake models whose predictions are known.

Legend: B batch, P prompt length, A answer length, S = P + A, V vocab.
"""

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llada_core.config import preset
from llada_core.likelihood import choose, elbo_nll, elbo_nll_choices, mask_answer, stratified_mask_counts
from llada_core.model import LLaDAMoEModelLM

CONFIG = preset(
    "tiny", num_hidden_layers=2, vocab_size=64, hidden_size=32, num_attention_heads=4,
    num_key_value_heads=4, expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
)
MASK = CONFIG.mask_token_id


class TableModel(nn.Module):
    """Logits depend only on the absolute position (table[i] at position i); keeps its inputs."""

    def __init__(self, table_SV: torch.Tensor) -> None:
        super().__init__()
        self.table, self.config, self.inputs = table_SV, CONFIG, []

    def forward(self, input_ids, attention_mask=None):
        self.inputs.append(input_ids.clone())
        batch, length = input_ids.shape
        return SimpleNamespace(logits=self.table[:length].expand(batch, -1, -1).clone())


class GuidedTableModel(nn.Module):
    """table_cond when the prompt is visible, table_uncond when it is all MASK."""

    def __init__(self, table_cond: torch.Tensor, table_uncond: torch.Tensor, prompt_length: int) -> None:
        super().__init__()
        self.cond, self.uncond, self.prompt_length, self.config = table_cond, table_uncond, prompt_length, CONFIG

    def forward(self, input_ids, attention_mask=None):
        length = input_ids.shape[1]
        prompt_masked = (input_ids[:, : self.prompt_length] == MASK).all(-1)[:, None, None]
        return SimpleNamespace(logits=torch.where(prompt_masked, self.uncond[:length], self.cond[:length]))


class CountingModel(nn.Module):
    """Knows that text counts up by one: predicts, at each position, the nearest visible token to
    its left plus the distance (so [10, 11, 12] -> 13, 14, ... is the likely continuation)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = CONFIG

    def forward(self, input_ids, attention_mask=None):
        batch, length = input_ids.shape
        position_BS = torch.arange(length).expand(batch, length)
        visible_BS = input_ids != MASK
        left_BS = torch.where(visible_BS, position_BS, 0).cummax(dim=1).values
        predicted_BS = (input_ids.gather(1, left_BS) + position_BS - left_BS) % CONFIG.vocab_size
        logits = torch.zeros(batch, length, CONFIG.vocab_size).scatter(2, predicted_BS[..., None], 6.0)
        return SimpleNamespace(logits=logits)


def test_one_token_answer_is_exactly_its_cross_entropy():
    torch.manual_seed(0)
    table = torch.randn(4, CONFIG.vocab_size) * 3
    expected = -F.log_softmax(table[3], dim=-1)[9]
    got = elbo_nll(TableModel(table), [5, 6, 7], [9], num_samples=8, batch_size=4)
    assert got == pytest.approx(float(expected), rel=1e-6)


def test_equals_a_hand_computation_from_the_masks_the_model_saw():
    torch.manual_seed(0)
    prompt, answer = torch.tensor([5, 6, 7]), torch.tensor([20, 21, 22, 23, 24])
    table = torch.randn(8, CONFIG.vocab_size) * 3
    model = TableModel(table)
    got = elbo_nll(model, prompt, answer, num_samples=10, batch_size=5, generator=torch.Generator().manual_seed(1))
    assert len(model.inputs) == 2
    log_probs_SV = F.log_softmax(table, dim=-1)
    per_sample = []
    for batch in model.inputs:
        assert batch.shape == (5, 8)
        assert torch.equal(batch[:, :3], prompt.expand(5, -1)), "the prompt must never be masked"
        is_masked = batch[:, 3:] == MASK
        visible = ~is_masked
        assert torch.equal(batch[:, 3:][visible], answer.expand(5, -1)[visible])
        # Stratified with batch_size == A: the five samples mask 1, 2, 3, 4 and 5 tokens.
        assert sorted(is_masked.sum(-1).tolist()) == [1, 2, 3, 4, 5]
        for row in range(5):
            masked = is_masked[row].nonzero().flatten().tolist()
            nll = -sum(float(log_probs_SV[3 + i, answer[i]]) for i in masked)
            per_sample.append(nll * 5 / len(masked))
    assert got == pytest.approx(sum(per_sample) / len(per_sample), rel=1e-5)


def test_classifier_free_guidance_combines_the_two_passes():
    torch.manual_seed(0)
    cond, uncond = torch.randn(4, CONFIG.vocab_size), torch.randn(4, CONFIG.vocab_size)
    model = GuidedTableModel(cond, uncond, prompt_length=3)
    guided = uncond[3] + (2.0 + 1) * (cond[3] - uncond[3])
    expected = -F.log_softmax(guided, dim=-1)[9]
    assert elbo_nll(model, [5, 6, 7], [9], num_samples=4, batch_size=4, cfg_scale=2.0) == pytest.approx(float(expected), rel=1e-5)
    plain = -F.log_softmax(cond[3], dim=-1)[9]
    assert elbo_nll(model, [5, 6, 7], [9], num_samples=4, batch_size=4) == pytest.approx(float(plain), rel=1e-5)


def test_the_right_answer_scores_lowest_and_is_chosen():
    model, prompt = CountingModel(), [10, 11, 12]
    choices = [[13, 14, 20, 16], [13, 14, 15, 16], [20, 21, 22, 23], [12, 14, 15]]
    scores = elbo_nll_choices(model, prompt, choices, num_samples=32, batch_size=8, generator=torch.Generator().manual_seed(0))
    assert min(scores) == scores[1]
    assert scores[1] < 1.0 < min(scores[0], scores[2], scores[3])
    assert choose(model, prompt, choices, num_samples=32, batch_size=8, generator=torch.Generator().manual_seed(0)) == 1


def test_choices_together_equal_choices_one_by_one_on_the_real_model():
    torch.manual_seed(0)
    model = LLaDAMoEModelLM(CONFIG).eval()
    prompt, choices = [7, 8, 9, 10], [[11, 12], [13, 14, 15, 16, 17], [18, 19, 20]]
    together = elbo_nll_choices(model, prompt, choices, num_samples=8, batch_size=4, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    alone = [elbo_nll(model, prompt, c, num_samples=8, batch_size=4, generator=generator) for c in choices]
    assert together == pytest.approx(alone, rel=1e-6)
    assert all(0 < s < float("inf") for s in together)
    other_seed = elbo_nll_choices(model, prompt, choices, num_samples=8, batch_size=4, generator=torch.Generator().manual_seed(4))
    assert other_seed != together


@pytest.mark.parametrize("answer_length,batch_size", [(5, 5), (10, 4), (3, 8), (1, 3)])
def test_stratified_counts_are_evenly_spaced_over_1_to_A(answer_length, batch_size):
    seen = set()
    for seed in range(40):
        counts = stratified_mask_counts(answer_length, batch_size, torch.Generator().manual_seed(seed))
        assert counts.shape == (batch_size,) and counts.min() >= 1 and counts.max() <= answer_length
        if batch_size == answer_length:
            assert sorted(counts.tolist()) == list(range(1, answer_length + 1))
        # Consecutive counts are A / B apart (modulo A), within rounding.
        steps = (counts[1:] - counts[:-1]) % answer_length
        assert ((steps - answer_length / batch_size).abs() <= 1).all()
        seen.add(int(counts[0]))
    assert seen == set(range(1, answer_length + 1)), "the random offset must reach every count"


def test_masked_positions_are_exact_in_number_and_uniform_over_the_answer():
    sequence = torch.tensor([5, 6, 20, 21, 22, 23])
    generator = torch.Generator().manual_seed(0)
    counts = torch.tensor([1, 2, 3, 4] * 500)
    noisy, is_masked = mask_answer(sequence, 2, counts, MASK, generator)
    assert not is_masked[:, :2].any()
    assert torch.equal(is_masked.sum(-1), counts)
    assert torch.equal(noisy == MASK, is_masked)
    for count in (1, 2, 3):
        frequency = is_masked[counts == count, 2:].float().mean(0)
        assert ((frequency - count / 4).abs() < 0.07).all(), frequency


BAD_ARGUMENTS = [
    ("num_samples", dict(num_samples=10, batch_size=4)),
    ("batch_size", dict(batch_size=0)),
    ("num_samples", dict(num_samples=-4)),
    ("cfg_scale", dict(cfg_scale=-1.0)),
    ("mask_id", dict(mask_id=1_000_000)),
    ("prompt_ids", dict(prompt_ids=[[5, 6], [7, 8]])),
    ("prompt_ids", dict(prompt_ids=[5.0, 6.0])),
    ("prompt_ids", dict(prompt_ids=[5, MASK])),
    ("choices_ids", dict(choices_ids=[])),
    ("choices_ids", dict(choices_ids=7)),
    ("choices_ids[1]", dict(choices_ids=[[9], []])),
    ("choices_ids[0]", dict(choices_ids=[[9, MASK]])),
]


@pytest.mark.parametrize("name,kwargs", BAD_ARGUMENTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_raise_value_error_naming_the_argument(name, kwargs):
    args = dict(prompt_ids=[5, 6], choices_ids=[[9], [10]], num_samples=4, batch_size=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}:"):
        elbo_nll_choices(TableModel(torch.zeros(8, CONFIG.vocab_size)), **args)


def test_empty_prompt_is_allowed():
    torch.manual_seed(0)
    table = torch.randn(2, CONFIG.vocab_size)
    expected = -F.log_softmax(table[0], dim=-1)[9]
    assert elbo_nll(TableModel(table), [], [9], num_samples=4, batch_size=4) == pytest.approx(float(expected), rel=1e-6)
