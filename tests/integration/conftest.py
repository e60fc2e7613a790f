"""Fixtures for the training integration tests: small prepared stage data, shared per session."""

from __future__ import annotations

import pytest

from jobs.stage_config import StageConfig

TINY_MODEL = {"preset": "tiny", "overrides": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                               "num_key_value_heads": 4, "expert_intermediate_size": 64,
                                               "num_experts": 8, "num_experts_per_tok": 2}}


@pytest.fixture(scope="session")
def stage_data(tmp_path_factory, ray_cluster) -> dict:
    """A small demo corpus -> tokenizer -> packed shards -> a pretrain and an SFT stage (local)."""
    from pipelines.demo.corpus import CorpusSpec
    from pipelines.mixture import MixtureSpec
    from pipelines.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("stage-data")
    corpus = CorpusSpec(num_text_docs=300, num_math_docs=200, num_code_docs=150, num_anneal_docs=100,
                        num_sft_chats=200, num_eval_items=20, files_per_split=2)
    summary = prepare(PrepareConfig(
        output_uri=str(root), corpus=corpus, vocab_size=1024, seq_len=64, sft_seq_len=64,
        stages={"pretrain": MixtureSpec(weights={"text": 0.6, "math": 0.2, "code": 0.2}, token_budget=64 * 256),
                "long": MixtureSpec(weights={"anneal": 1.0}, token_budget=128 * 64),
                "sft": MixtureSpec(weights={"chat": 1.0}, token_budget=64 * 128)},
        stage_seq_lens={"long": 128},  # an anneal-2-like stage at twice the length
    ), progress=lambda line: None)
    return {"root": str(root), "tokenizer_uri": summary["tokenizer_uri"],
            "pretrain_uri": f"{root}/stages/pretrain", "long_uri": f"{root}/stages/long", "sft_uri": f"{root}/stages/sft"}


def stage_config(data: dict, output_uri: str, **overrides) -> StageConfig:
    """A tiny 2-worker pretrain stage over the fixture's data; override any field."""
    base = dict(
        name="pretrain1", kind="pretrain", model=TINY_MODEL, data_uri=data["pretrain_uri"], output_uri=output_uri,
        tokenizer_uri=data["tokenizer_uri"], num_steps=12, micro_batch_size=4, checkpoint_every=4, keep_last=2,
        optimizer={"lr": 3e-3, "weight_decay": 0.0}, schedule={"kind": "warmup_cosine", "warmup_steps": 2},
        scaling={"num_workers": 2}, variable_length_prob=0.0, seed=3,
    )
    return StageConfig.model_validate({**base, **overrides})
