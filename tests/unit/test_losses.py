"""Losses against hand computations on small tensors (LLADA_SPEC sections 2 and 4)."""

import math

import pytest
import torch

from llada_core.losses import (
    MaskedBatch, forward_process, load_balance_loss, maybe_truncate_length, pad_sft_batch,
    pretrain_loss, router_z_loss, select_sft_turn, sft_loss, total_loss,
)

MASK = 9


def test_pretrain_loss_weights_by_one_over_t_and_normalises_by_b_times_l():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    masked = torch.tensor([[True, False, True], [False, False, True]])
    t = torch.tensor([0.5, 0.25])
    logits = torch.zeros(2, 3, 10)
    logits[0, 0, 1] = 2.0  # the right token gets a higher logit at one masked position
    batch = MaskedBatch(noisy_ids=ids, masked=masked, t=t)
    ce_uniform = math.log(10)
    ce_boosted = -(2.0 - math.log(math.exp(2.0) + 9))
    expected = ((ce_boosted + ce_uniform) / 0.5 + ce_uniform / 0.25) / 6
    assert pretrain_loss(logits, ids, batch).item() == pytest.approx(expected, rel=1e-6)


def test_forward_process_masks_with_probability_t_and_respects_maskable():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (64, 512))
    batch = forward_process(ids, MASK, generator=g)
    assert ((batch.t >= 1e-3) & (batch.t <= 1)).all()
    rate = batch.masked.float().mean(-1)
    assert torch.allclose(rate, batch.t, atol=0.08)
    assert (batch.noisy_ids[batch.masked] == MASK).all()
    assert (batch.noisy_ids[~batch.masked] == ids[~batch.masked]).all()
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, 100:] = True
    sft = forward_process(ids, MASK, maskable=maskable, generator=g)
    assert not sft.masked[:, :100].any()
    assert (sft.noisy_ids[:, :100] == ids[:, :100]).all()


def test_sft_never_masks_the_prompt_and_normalises_by_response_length():
    sequences = [[5, 6, 7, 1, 2], [5, 6, 3]]
    ids, response = pad_sft_batch(sequences, prompt_lengths=[3, 2], eos_id=0, max_length=16)
    assert ids.tolist() == [[5, 6, 7, 1, 2], [5, 6, 3, 0, 0]]  # EOS padding
    assert response.tolist() == [[False] * 3 + [True] * 2, [False] * 2 + [True] * 3]
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        batch = forward_process(ids, MASK, maskable=response, generator=g)
        assert not (batch.masked & ~response).any()
    # Hand computation: uniform logits, everything in the response masked, t = 1.
    batch = MaskedBatch(noisy_ids=ids, masked=response.clone(), t=torch.ones(2))
    loss = sft_loss(torch.zeros(2, 5, 10), ids, batch, response)
    assert loss.item() == pytest.approx(math.log(10), rel=1e-6)
    # With half the response masked at t = 0.5 the per-sequence value is unchanged in expectation.
    half = response.clone()
    half[0, 4] = False
    half[1, 3:] = False
    batch = MaskedBatch(noisy_ids=ids, masked=half, t=torch.full((2,), 0.5))
    expected = ((math.log(10) / 0.5) / 2 + (math.log(10) / 0.5) / 3) / 2
    assert sft_loss(torch.zeros(2, 5, 10), ids, batch, response).item() == pytest.approx(expected, rel=1e-6)


def test_sft_batch_rejects_a_prompt_without_room():
    with pytest.raises(ValueError, match="prompt_lengths"):
        pad_sft_batch([[1, 2, 3, 4]], [4], eos_id=0, max_length=4)


def test_load_balance_loss_equals_hand_computation():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]))
    # top-1: token 0 -> expert 0, token 1 -> expert 1: f = [0.5, 0.5, 0]; P = [0.4, 0.4, 0.2]
    expected = 3 * (0.5 * 0.4 + 0.5 * 0.4)
    assert load_balance_loss([logits], top_k=1).item() == pytest.approx(expected, rel=1e-5)
    # top-2: slots {0,1}, {1,2}: f = [1/4, 2/4, 1/4]
    expected_k2 = 3 * (0.25 * 0.4 + 0.5 * 0.4 + 0.25 * 0.2)
    assert load_balance_loss([logits], top_k=2).item() == pytest.approx(expected_k2, rel=1e-5)
    # Averaged over layers; a padding token is left out.
    assert load_balance_loss([logits, logits], top_k=1).item() == pytest.approx(expected, rel=1e-5)
    only_first = load_balance_loss([logits], top_k=1, token_mask=torch.tensor([[True, False]]))
    assert only_first.item() == pytest.approx(3 * 1.0 * 0.7, rel=1e-5)


def test_uniform_routing_gives_load_balance_of_one():
    logits = torch.zeros(8, 4)
    logits += torch.eye(4).repeat(2, 1) * 1e-3  # break ties so each expert gets 2 tokens
    assert load_balance_loss([logits], top_k=1).item() == pytest.approx(1.0, rel=1e-3)


def test_z_loss_equals_hand_computation():
    logits = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    expected = (math.log(math.e + math.e**2) ** 2 + math.log(2) ** 2) / 2
    assert router_z_loss([logits]).item() == pytest.approx(expected, rel=1e-6)
    assert router_z_loss([logits], token_mask=torch.tensor([[False, True]])).item() == pytest.approx(math.log(2) ** 2)


def test_total_loss_uses_the_paper_weights():
    logits = torch.randn(6, 4)
    terms = total_loss(torch.tensor(2.0), (logits,), top_k=2)
    expected = 2.0 + 0.01 * load_balance_loss([logits], 2) + 0.001 * router_z_loss([logits])
    torch.testing.assert_close(terms.total, expected)


def test_variable_length_truncates_in_about_one_percent_of_steps():
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(2, 64, dtype=torch.long)
    lengths = [maybe_truncate_length(ids, generator=g).shape[1] for _ in range(5000)]
    truncated = [n for n in lengths if n < 64]
    assert 20 <= len(truncated) <= 85  # 1% of 5000 = 50
    assert min(lengths) >= 8
    always = [maybe_truncate_length(ids, probability=1.0, generator=g).shape[1] for _ in range(200)]
    assert min(always) >= 8 and max(always) <= 64 and len(set(always)) > 20


def test_select_sft_turn_keeps_earlier_turns_as_prompt():
    ids = list(range(20))
    spans = [(4, 8), (12, 16)]
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        tokens, prompt_length = select_sft_turn(ids, spans, g)
        assert (prompt_length, len(tokens)) in {(4, 8), (12, 16)}
        assert tokens == ids[: len(tokens)]
        seen.add(prompt_length)
    assert seen == {4, 12}
    with pytest.raises(ValueError, match="assistant_spans"):
        select_sft_turn(ids, [(18, 25)])


# ---------------------------------------------------------------- loss only where it counts


def _hidden_and_batch(seed: int, sft: bool):
    """A small model's final hidden states and lm_head, with a masked batch (fp32)."""
    from llada_core import LLaDAMoEModelLM, preset

    torch.manual_seed(seed)
    config = preset("tiny", vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    model = LLaDAMoEModelLM(config)
    ids = torch.randint(5, 96, (3, 20), generator=torch.Generator().manual_seed(seed))
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, 8:] = True
    batch = forward_process(ids, config.mask_token_id, maskable=response if sft else None,
                            generator=torch.Generator().manual_seed(seed + 1))
    return model, ids, batch, response


@pytest.mark.parametrize("sft", [False, True], ids=["pretrain", "sft"])
@pytest.mark.parametrize("chunk", [None, 3], ids=["one-chunk", "chunks-of-3"])
def test_the_loss_from_hidden_states_equals_the_full_logits_loss_with_equal_gradients(sft, chunk):
    """Eq. 2 / Eq. 5 computed on masked positions only (in chunks, recomputed in backward) give
    the loss and every gradient of the full-logits form, to 1e-5 relative in fp32."""
    from llada_core.losses import pretrain_loss_from_hidden, sft_loss_from_hidden

    model, ids, batch, response = _hidden_and_batch(0, sft)
    assert batch.masked.sum() > 6  # several chunks of 3
    full = sft_loss(model(batch.noisy_ids).logits, ids, batch, response) if sft else \
        pretrain_loss(model(batch.noisy_ids).logits, ids, batch)
    full.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    hidden = model(batch.noisy_ids, hidden_only=True).hidden_states
    lm_head = model.lm_head.weight
    loss = sft_loss_from_hidden(hidden, lm_head, ids, batch, response, chunk=chunk) if sft else \
        pretrain_loss_from_hidden(hidden, lm_head, ids, batch, chunk=chunk)
    loss.backward()
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_no_chunk_holds_more_logits_than_the_cap():
    from llada_core.losses import MAX_CHUNK_LOGITS, chunk_positions

    assert chunk_positions(157_184) * 157_184 <= MAX_CHUNK_LOGITS < (chunk_positions(157_184) + 1) * 157_184
    assert chunk_positions(4096) == 32768 and chunk_positions(10**9) == 1
