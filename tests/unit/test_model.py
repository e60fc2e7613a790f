"""Equivalence tests for the model: each compares against plain, literal code in this file."""

import math

import pytest
import torch
import torch.nn.functional as F

from llada_core.config import preset
from llada_core.model import GroupedExperts, LLaDAMoEModelLM, MoE, route


def tiny_config(**overrides):
    base = dict(num_hidden_layers=2, vocab_size=97, hidden_size=32, num_attention_heads=4,
                num_key_value_heads=4, expert_intermediate_size=24, num_experts=6, num_experts_per_tok=2)
    return preset("tiny", **{**base, **overrides})


def swiglu(x, gate_FD, up_FD, down_DF):
    return (F.silu(x @ gate_FD.T) * (x @ up_FD.T)) @ down_DF.T


def loop_experts(experts: GroupedExperts, x_TD, idx_TK, weights_TK):
    """The released code's way: one expert at a time over the tokens routed to it."""
    out = torch.zeros_like(x_TD)
    for e in range(experts.gate_proj.shape[0]):
        token, slot = torch.where(idx_TK == e)
        if token.numel():
            y = swiglu(x_TD[token], experts.gate_proj[e], experts.up_proj[e], experts.down_proj[e])
            out = out.index_add(0, token, y * weights_TK[token, slot, None])
    return out


def test_moe_with_one_expert_and_top1_equals_dense_swiglu():
    torch.manual_seed(0)
    moe = MoE(tiny_config(num_experts=1, num_experts_per_tok=1))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 5, 32)
    out, _ = moe(x)
    e = moe.experts
    torch.testing.assert_close(out, swiglu(x, e.gate_proj[0], e.up_proj[0], e.down_proj[0]))


@pytest.mark.parametrize("max_padding", [10.0, 0.0], ids=["padded-bmm", "per-group"])
def test_grouped_experts_equal_a_per_expert_loop_outputs_and_gradients(max_padding, monkeypatch):
    monkeypatch.setattr(GroupedExperts, "max_padding", max_padding)  # force each path
    torch.manual_seed(0)
    experts = GroupedExperts(num_experts=6, hidden_size=16, ffn_size=12)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(40, 16, requires_grad=True)
    logits = torch.randn(40, 6)
    logits[:, 5] = -30.0  # an expert that receives no token must work too
    logits[:, 0] += 2.0  # uneven load, as early in training
    weights, idx = route(logits, top_k=3, normalize=False)
    grouped = experts(x, idx, weights)
    looped = loop_experts(experts, x, idx, weights)
    torch.testing.assert_close(grouped, looped)
    upstream = torch.randn_like(grouped)
    grads_grouped = torch.autograd.grad(grouped, [x, *experts.parameters()], upstream)
    grads_looped = torch.autograd.grad(looped, [x, *experts.parameters()], upstream)
    for a, b in zip(grads_grouped, grads_looped):
        torch.testing.assert_close(a, b)


def test_routing_keeps_softmax_weights_without_renormalisation():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights, idx = route(logits, top_k=2, normalize=False)
    probs = torch.softmax(logits, -1)
    assert idx.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, probs[:, :2])
    assert weights.sum() < 0.99  # not renormalised to 1
    renormalised, _ = route(logits, top_k=2, normalize=True)
    torch.testing.assert_close(renormalised.sum(-1), torch.ones(1))


def literal_forward(model: LLaDAMoEModelLM, ids):
    """LLaDA-MoE written out plainly for one unpadded sequence: per-token expert loop."""
    c = model.config
    h = model.model.embed_tokens.weight[ids]  # [L, D]
    length, dh = ids.shape[0], c.head_dim

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps))

    pos = torch.arange(length).float()
    inv = 1.0 / c.rope_theta ** (torch.arange(0, dh, 2).float() / dh)
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)

    def rope(x):  # [H, L, Dh]
        rot = torch.cat([-x[..., dh // 2:], x[..., : dh // 2]], -1)
        return x * ang.cos() + rot * ang.sin()

    for layer in model.model.layers:
        a = layer.self_attn
        x = rms(h, layer.input_layernorm.weight)
        q = (x @ a.q_proj.weight.T).view(length, -1, dh).transpose(0, 1)
        k = (x @ a.k_proj.weight.T).view(length, -1, dh).transpose(0, 1)
        v = (x @ a.v_proj.weight.T).view(length, -1, dh).transpose(0, 1)
        q, k = rope(rms(q, a.q_norm.weight)), rope(rms(k, a.k_norm.weight))
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dh), -1)  # no causal mask
        h = h + (att @ v).transpose(0, 1).reshape(length, -1) @ a.o_proj.weight.T
        x = rms(h, layer.post_attention_layernorm.weight)
        probs = torch.softmax(x @ layer.mlp.gate.weight.T, -1)
        moe = torch.zeros_like(h)
        for t in range(length):
            top = torch.topk(probs[t], c.num_experts_per_tok)
            for p, e in zip(top.values, top.indices):
                ex = layer.mlp.experts
                moe[t] += p * swiglu(x[t], ex.gate_proj[e], ex.up_proj[e], ex.down_proj[e])
        h = h + moe
    return rms(h, model.model.norm.weight) @ model.lm_head.weight.T


def test_model_equals_a_literal_implementation():
    torch.manual_seed(0)
    model = LLaDAMoEModelLM(tiny_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)  # norms that are not all ones, so a skipped norm shows
    ids = torch.randint(0, 97, (9,))
    out = model(ids[None])
    assert out.logits.shape == (1, 9, 97)
    torch.testing.assert_close(out.logits[0], literal_forward(model, ids), rtol=1e-4, atol=1e-4)


def test_attention_is_bidirectional():
    torch.manual_seed(0)
    model = LLaDAMoEModelLM(tiny_config())
    ids = torch.randint(0, 97, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 97
    assert not torch.allclose(model(ids).logits[0, 0], model(changed).logits[0, 0])


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_row_equals_the_sequence_alone(side):
    torch.manual_seed(0)
    model = LLaDAMoEModelLM(tiny_config())
    short, long = torch.randint(2, 97, (5,)), torch.randint(2, 97, (9,))
    pad = torch.zeros(4, dtype=torch.long)
    row = torch.cat([pad, short]) if side == "left" else torch.cat([short, pad])
    mask = (torch.arange(9) >= 4) if side == "left" else (torch.arange(9) < 5)
    out = model(torch.stack([row, long]), attention_mask=torch.stack([mask, torch.ones(9, dtype=torch.bool)]))
    alone_short, alone_long = model(short[None]).logits[0], model(long[None]).logits[0]
    torch.testing.assert_close(out.logits[0][mask], alone_short, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[1], alone_long, rtol=1e-5, atol=1e-5)


def test_hf_style_attributes_and_router_outputs():
    model = LLaDAMoEModelLM(tiny_config()).to(torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.device == torch.device("cpu")
    out = model(torch.randint(0, 97, (2, 7)))
    assert out.logits.dtype == torch.bfloat16
    assert len(out.router_logits) == 2
    assert all(r.shape == (14, 6) and r.dtype == torch.float32 for r in out.router_logits)


def test_rope_base_changes_the_output():
    torch.manual_seed(0)
    model = LLaDAMoEModelLM(tiny_config())
    ids = torch.randint(0, 97, (1, 12))
    before = model(ids).logits
    model.config = model.config.replace(rope_theta=50_000.0)
    assert not torch.allclose(before, model(ids).logits)


def test_bad_inputs_are_rejected():
    model = LLaDAMoEModelLM(tiny_config())
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4))
