"""Training at the real shapes: activation checkpointing, the grouped-GEMM expert path and the
load-balancing convention (llada_core), and their recipe switches. CPU, small shapes."""

from __future__ import annotations

import pytest
import torch

from jobs.stage_config import ScalingSpec
from llada_core import LLaDAMoEModelLM, preset
from llada_core.losses import MaskedBatch, load_balance_loss, pretrain_loss_from_hidden
from llada_core.model import GroupedExperts, grouped_mm_supported


def _small_model(seed: int = 0) -> LLaDAMoEModelLM:
    torch.manual_seed(seed)
    config = preset("tiny", vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=4, expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
    return LLaDAMoEModelLM(config).train()


def _loss_and_grads(model: LLaDAMoEModelLM, ids: torch.Tensor, masked: torch.Tensor) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    noisy = torch.where(masked, model.config.mask_token_id, ids)
    batch = MaskedBatch(noisy, masked, torch.full((ids.shape[0],), 0.5))
    hidden = model(noisy, hidden_only=True).hidden_states
    loss = pretrain_loss_from_hidden(hidden, model.lm_head.weight, ids, batch)
    loss.backward()
    return float(loss.detach()), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    model = _small_model()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 256, (2, 48), generator=generator)
    masked = torch.rand(2, 48, generator=generator) < 0.5
    loss, grads = _loss_and_grads(model, ids, masked)
    model.activation_checkpointing = True
    loss_ckpt, grads_ckpt = _loss_and_grads(model, ids, masked)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_recomputes_the_layers_in_backward(monkeypatch):
    from llada_core import model as model_module

    calls = []
    forward = model_module.DecoderLayer.forward

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(model_module.DecoderLayer, "forward", counted)
    model = _small_model()
    ids = torch.randint(2, 256, (1, 16))
    masked = torch.ones(1, 16, dtype=torch.bool)
    _loss_and_grads(model, ids, masked)
    plain = len(calls)
    calls.clear()
    model.activation_checkpointing = True
    _loss_and_grads(model, ids, masked)
    assert plain == 3 and len(calls) == 6  # each layer runs again in the backward pass
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(ids)
    assert len(calls) == 3  # no recomputation outside training


def _experts(dtype: torch.dtype = torch.float32) -> GroupedExperts:
    torch.manual_seed(0)
    experts = GroupedExperts(num_experts=8, hidden_size=32, ffn_size=16).to(dtype)
    for param in experts.parameters():
        torch.nn.init.normal_(param, std=0.2)
    return experts


@pytest.mark.parametrize("skewed", [False, True])
def test_the_grouped_gemm_path_equals_the_per_expert_path(skewed):
    assert grouped_mm_supported(torch.device("cpu"), torch.float32, 32, 16)
    experts = _experts()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(40, 32, generator=generator, requires_grad=True)
    expert_idx = torch.randint(0, 8, (40, 2), generator=generator)
    if skewed:
        expert_idx[:30, 0] = 3  # one crowded expert, some empty ones
    weights = torch.rand(40, 2, generator=generator)
    results = {}
    for path, (grouped, max_padding) in {"grouped": (True, 2.0), "per_expert": (False, -1.0)}.items():
        experts.use_grouped_mm, experts.max_padding = grouped, max_padding
        experts.zero_grad(set_to_none=True)
        x.grad = None
        out = experts(x, expert_idx, weights)
        out.pow(2).sum().backward()
        results[path] = (out.detach(), x.grad.clone(), [p.grad.clone() for p in experts.parameters()])
    torch.testing.assert_close(results["grouped"][0], results["per_expert"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["grouped"][1], results["per_expert"][1], rtol=1e-5, atol=1e-6)
    for grouped_grad, loop_grad in zip(results["grouped"][2], results["per_expert"][2]):
        torch.testing.assert_close(grouped_grad, loop_grad, rtol=1e-5, atol=1e-6)


def test_the_grouped_gemm_is_chosen_only_where_it_runs():
    experts = _experts()
    x = torch.randn(4, 32)
    assert experts._grouped_gemm(x)  # auto: wherever it runs, the CPU included
    experts.use_grouped_mm = False
    assert not experts._grouped_gemm(x)
    experts.use_grouped_mm = None
    assert not experts._grouped_gemm(x.double())  # dtypes differ (and float64 is not supported)
    assert not grouped_mm_supported(torch.device("cpu"), torch.float32, 32, 3)  # a 12-byte row
    assert not grouped_mm_supported(torch.device("cpu"), torch.float64, 32, 16)


def test_load_balance_layers_mean_or_sum():
    torch.manual_seed(0)
    layers = [torch.randn(64, 8) for _ in range(4)]
    mean = load_balance_loss(layers, top_k=2)
    total = load_balance_loss(layers, top_k=2, layers="sum")
    assert float(total) == pytest.approx(4 * float(mean), rel=1e-6)
    uniform = [torch.zeros(64, 8)] * 4  # equal probabilities; top-k picks the first k: f = (1/2, 1/2, 0...)
    assert float(load_balance_loss(uniform, top_k=2)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="layers: 'max'"):
        load_balance_loss(layers, top_k=2, layers="max")


def test_new_switches_are_left_out_of_dumps_at_their_defaults():
    assert "activation_checkpointing" not in ScalingSpec().model_dump()
    assert ScalingSpec(activation_checkpointing=True).model_dump()["activation_checkpointing"] is True
    assert ScalingSpec.model_validate(ScalingSpec().model_dump()) == ScalingSpec()
