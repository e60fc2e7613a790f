"""GPU tier: runs only where CUDA is present (skipped, never passing, elsewhere).

bf16 at the real LLaDA-MoE-7B-A1B layer shapes with random weights.
"""

import pytest
import torch

from llada_core.config import preset
from llada_core.model import GroupedExperts, LLaDAMoEModelLM, route

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_grouped_experts_match_loop_at_7b_shapes_in_bf16():
    torch.manual_seed(0)
    config = preset("llada-moe-7b-a1b")
    experts = GroupedExperts(config.num_experts, config.hidden_size, config.expert_intermediate_size)
    experts = experts.to("cuda", torch.bfloat16)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(4096, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    weights, idx = route(torch.randn(4096, config.num_experts, device="cuda"), config.num_experts_per_tok, False)
    out = experts(x, idx, weights).float()
    ref = torch.zeros_like(out)
    for e in range(config.num_experts):
        token, slot = torch.where(idx == e)
        xe = x[token].float()
        ye = (torch.nn.functional.silu(xe @ experts.gate_proj[e].float().T) * (xe @ experts.up_proj[e].float().T))
        ref.index_add_(0, token, (ye @ experts.down_proj[e].float().T) * weights[token, slot, None])
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)


def test_two_layer_7b_model_runs_forward_backward_in_bf16():
    torch.manual_seed(0)
    config = preset("llada-moe-7b-a1b", num_hidden_layers=2)
    model = LLaDAMoEModelLM(config).to("cuda", torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (2, 1024), device="cuda")
    out = model(ids)
    assert out.logits.shape == (2, 1024, config.vocab_size) and out.logits.dtype == torch.bfloat16
    out.logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_mfu_denominator_of_a_known_gpu_is_its_bf16_datasheet_peak():
    from jobs.training.metrics import GPU_PEAK_FLOPS, device_peak_flops

    name = torch.cuda.get_device_name(0).upper()
    peak, source = device_peak_flops("cuda", torch.bfloat16)
    known = [gpu for gpu in GPU_PEAK_FLOPS if gpu in name]
    if known:
        assert peak == GPU_PEAK_FLOPS[known[0]] and "datasheet" in source
    else:
        assert "timed" in source and peak > 1e12
