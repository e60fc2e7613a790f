"""LLaDA-MoE model configuration, validated, with named presets (LLADA_SPEC sections 1-2).

Field names follow the released checkpoint's config.json (``expert_intermediate_size``,
``num_experts``, ``num_experts_per_tok``, ``qk_layernorm``, ``norm_topk_prob`` ...), so a config
round-trips through config.json without renaming.

Legend: V vocab, D hidden, H heads, F expert FFN, E experts, K top-k, N layers.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class LLaDAMoEConfig(BaseModel):
    """Shapes and constants of a LLaDA-MoE model. Structural fields have no default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    expert_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int

    max_position_embeddings: int = 4096
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-5
    qk_layernorm: bool = True
    # LLaDA-MoE keeps the softmax scores of the chosen experts as they are (paper Eq. 3).
    norm_topk_prob: bool = False
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001

    @model_validator(mode="after")
    def _check(self) -> "LLaDAMoEConfig":
        positive = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "expert_intermediate_size", "num_experts",
            "num_experts_per_tok", "max_position_embeddings",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size: {self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"hidden_size: head_dim {self.head_dim} must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads: {self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok: top-k {self.num_experts_per_tok} exceeds "
                f"num_experts={self.num_experts}"
            )
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}: {value} is outside the vocabulary [0, {self.vocab_size})")
        if self.mask_token_id == self.eos_token_id:
            raise ValueError("mask_token_id: must differ from eos_token_id")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta: must be > 0, got {self.rope_theta}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act: only 'silu' (SwiGLU experts) is supported, got {self.hidden_act!r}")
        if self.attention_bias:
            raise ValueError("attention_bias: LLaDA-MoE has no attention biases")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings: LLaDA-MoE does not tie lm_head to the embedding")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **overrides: Any) -> "LLaDAMoEConfig":
        """A validated copy with some fields changed (e.g. ``rope_theta`` for anneal 2)."""
        return type(self).model_validate({**self.model_dump(), **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # The released LLaDA-MoE-7B-A1B shapes (paper Table 2). As released (after anneal 2 and SFT)
    # the RoPE base is 50k and the context 8k; the pretraining recipe sets 10k / 4k per stage.
    # vocab_size is unverified (LLADA_SPEC section 1): correct it here only.
    "llada-moe-7b-a1b": dict(
        vocab_size=157_184, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, expert_intermediate_size=1024, num_experts=64,
        num_experts_per_tok=8, max_position_embeddings=8192, rope_theta=50_000.0,
        mask_token_id=156_895, eos_token_id=156_892, pad_token_id=156_892,
    ),
    # Benchmark scale: the routing of the real model (64 experts, top-8) at ~250 M parameters.
    "small": dict(
        vocab_size=32_768, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, expert_intermediate_size=256, num_experts=64,
        num_experts_per_tok=8, max_position_embeddings=4096,
        mask_token_id=1, eos_token_id=0, pad_token_id=0,
    ),
    # CPU tests and the demo: a few M parameters. Special ids match the demo tokenizer, which
    # puts <|endoftext|> at 0 and <|mask|> at 1; a real run takes them from its tokenizer.
    "tiny": dict(
        vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, expert_intermediate_size=128, num_experts=16,
        num_experts_per_tok=4, max_position_embeddings=1024,
        mask_token_id=1, eos_token_id=0, pad_token_id=0,
    ),
}


def preset(name: str, **overrides: Any) -> LLaDAMoEConfig:
    """The named preset, with optional field overrides, validated."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return LLaDAMoEConfig.model_validate({**PRESETS[name], **overrides})


def count_parameters(config: LLaDAMoEConfig) -> dict[str, int]:
    """Parameter counts from the shapes alone: total, active per token, active non-embedding.

    Active counts K of E experts; the embedding is a lookup and is not counted as active.
    """
    d, f, e, k = config.hidden_size, config.expert_intermediate_size, config.num_experts, config.num_experts_per_tok
    kv_dim = config.num_key_value_heads * config.head_dim
    attention = 2 * d * d + 2 * d * kv_dim + (2 * config.head_dim if config.qk_layernorm else 0)
    norms = 2 * d
    router = e * d
    per_expert = 3 * d * f
    per_layer_total = attention + norms + router + e * per_expert
    per_layer_active = attention + norms + router + k * per_expert
    embedding = config.vocab_size * d
    lm_head = config.vocab_size * d
    layers = config.num_hidden_layers
    return {
        "total": layers * per_layer_total + embedding + lm_head + d,
        "active": layers * per_layer_active + lm_head + d,
        "active_non_embedding": layers * per_layer_active + d,
    }
