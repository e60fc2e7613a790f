import pytest
import torch

from llada_core.config import LLaDAMoEConfig, PRESETS, count_parameters, preset
from llada_core.model import LLaDAMoEModelLM


def test_7b_preset_counted_on_meta_device_matches_the_paper():
    config = preset("llada-moe-7b-a1b")
    with torch.device("meta"):
        model = LLaDAMoEModelLM(config)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - 7.36e9) / 7.36e9 < 0.02
    # Active per token: attention, norms, router, K of E experts, lm_head (the embedding is a lookup).
    per_layer_experts = sum(p.numel() for p in model.model.layers[0].mlp.experts.parameters())
    active = total - model.model.embed_tokens.weight.numel() - config.num_hidden_layers * per_layer_experts * (
        1 - config.num_experts_per_tok / config.num_experts
    )
    assert abs(active - 1.4e9) / 1.4e9 < 0.02
    assert count_parameters(config)["total"] == total
    assert count_parameters(config)["active"] == int(active)


def test_every_preset_builds_and_small_has_the_real_routing():
    for name in PRESETS:
        assert preset(name).num_experts_per_tok <= preset(name).num_experts
    small = preset("small")
    assert (small.num_experts, small.num_experts_per_tok) == (64, 8)
    assert 1e8 < count_parameters(small)["total"] < 1e9
    assert 1e6 < count_parameters(preset("tiny"))["total"] < 1e7


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_experts_per_tok": 65}, "num_experts_per_tok"),
        ({"hidden_size": 2050}, "hidden_size"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"mask_token_id": 10**6}, "mask_token_id"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"num_experts": 0}, "num_experts"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        preset("llada-moe-7b-a1b", **overrides)


def test_unknown_fields_and_presets_are_rejected():
    with pytest.raises(ValueError, match="no_such_field"):
        preset("tiny", no_such_field=1)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError, match="vocab_size"):
        LLaDAMoEConfig.model_validate({k: v for k, v in PRESETS["tiny"].items() if k != "vocab_size"})


def test_replace_revalidates():
    config = preset("tiny").replace(rope_theta=50_000.0)
    assert config.rope_theta == 50_000.0
    with pytest.raises(ValueError, match="rope_theta"):
        config.replace(rope_theta=-1.0)
