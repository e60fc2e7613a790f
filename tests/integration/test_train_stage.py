"""Stage training on a local Ray cluster: 2 workers, the tiny model, DeepSpeed on CPU (gloo)."""

from __future__ import annotations

import json

import pytest

from conftest import stage_config  # tests/integration/conftest.py
from jobs.checkpoints import list_checkpoints
from jobs.training.stage import read_history, run_stage
from llada_core.checkpoint import load_config, load_model
from pipelines import storage


@pytest.fixture(scope="module")
def baseline(stage_data, tmp_path_factory):
    """An uninterrupted 12-step pretrain stage (ep=1, 2 data-parallel workers)."""
    output = str(tmp_path_factory.mktemp("baseline"))
    result = run_stage(stage_config(stage_data, output))
    return {"output": output, "result": result, "history": read_history(output)}


def losses(history):
    return {row["step"]: row["loss"] for row in history if "loss" in row}


def test_pretrain_stage_learns_checkpoints_and_rotates(baseline):
    history = baseline["history"]
    loss = losses(history)
    assert sorted(loss) == list(range(1, 13))
    first, last = sum(loss[s] for s in (1, 2)) / 2, sum(loss[s] for s in (9, 10, 11, 12)) / 4
    assert last < first - 0.8, f"loss did not fall: {first:.3f} -> {last:.3f}"
    row = history[-1]
    assert row["tokens"] == 2 * 4 * 64 and row["tokens_seen"] == 12 * 512
    assert 0 < row["mfu"] < 1 and row["tokens_per_s"] > 0
    assert len(row["expert_load_ratio_per_layer"]) == 2 and row["expert_load_ratio"] >= 1
    # keep_last=2 of the checkpoints at steps 4, 8, 12; each complete and loadable.
    checkpoints = baseline["result"].checkpoints
    assert [c.step for c in checkpoints] == [8, 12]
    final = checkpoints[-1]
    assert final.record["step"] == 12 and final.record["metrics"]["tokens_seen"] == 12 * 512
    model = load_model(final.hf_uri)
    assert model.config.num_experts == 8
    assert storage.exists(storage.join(final.hf_uri, "tokenizer.json"))
    saved = json.loads(storage.read_text(storage.join(final.uri, "stage_config.json")))
    assert saved["name"] == "pretrain1" and saved["num_steps"] == 12
    assert storage.read_bytes(storage.join(baseline["output"], "training.png"))[:4] == b"\x89PNG"


def test_expert_parallel_ep2_follows_the_ep1_loss_curve(baseline, stage_data, tmp_path):
    run_stage(stage_config(stage_data, str(tmp_path), scaling={"num_workers": 2, "expert_parallel_size": 2}))
    ep1, ep2 = losses(baseline["history"]), losses(read_history(str(tmp_path)))
    for step in ep1:  # same data, same seed, same weights: only float summation order differs
        assert ep2[step] == pytest.approx(ep1[step], rel=2e-3, abs=2e-3), f"step {step}"
    # Every rank's expert shard was gathered into one complete HF export.
    final = list_checkpoints(str(tmp_path))[-1]
    assert load_model(final.hf_uri).model.layers[0].mlp.experts.gate_proj.shape[0] == 8


def test_a_crash_on_one_rank_resumes_exactly_on_s3_storage(baseline, stage_data, s3_server):
    output = s3_server.bucket("train") + "/run/pretrain1"
    s3 = s3_server.settings
    run_stage(stage_config(stage_data, output, fault_injection={"step": 6, "rank": 1}), s3=s3)
    assert storage.exists(storage.join(output, "_fault_injected_before_step_6"), s3)  # the crash happened
    history = read_history(output, s3)
    assert [row["resumed_from"] for row in history if "resumed_from" in row] == [4]
    resumed, uninterrupted = losses(history), losses(baseline["history"])
    assert sorted(resumed) == list(range(1, 13))  # ended at the planned step
    for step in range(5, 13):  # after the restart from checkpoint 4: optimizer, LR, data, masks restored
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-4), f"step {step}"
    assert [c.step for c in list_checkpoints(output, s3)] == [8, 12]


def test_anneal_raises_rope_and_context_then_sft_trains(baseline, stage_data, tmp_path):
    start = baseline["result"].checkpoints[-1].hf_uri
    anneal = stage_config(stage_data, str(tmp_path / "anneal2"), name="anneal2", kind="anneal", init_from=start,
                          data_uri=stage_data["long_uri"], rope_theta=50_000.0, max_position_embeddings=2048,
                          num_steps=2, checkpoint_every=2, schedule={"kind": "constant"}, scaling={"num_workers": 1})
    exported = run_stage(anneal).checkpoints[-1].hf_uri
    config = load_config(exported)
    assert (config.rope_theta, config.max_position_embeddings) == (50_000.0, 2048)
    rows = [row for row in read_history(str(tmp_path / "anneal2")) if "loss" in row]  # twice pretraining's length
    assert [row["tokens"] for row in rows] == [4 * 128, 4 * 128] and baseline["history"][-1]["tokens"] == 2 * 4 * 64
    sft = stage_config(stage_data, str(tmp_path / "sft"), name="sft", kind="sft", data_uri=stage_data["sft_uri"],
                       init_from=exported, num_steps=3, checkpoint_every=3, max_seq_len=48, schedule={"kind": "constant"},
                       scaling={"num_workers": 1})
    result = run_stage(sft)
    assert load_config(result.checkpoints[-1].hf_uri).rope_theta == 50_000.0  # carried on
    # Each batch is as long as its longest row (LLADA_SPEC section 4), capped at max_seq_len.
    tokens = [row["tokens"] for row in read_history(str(tmp_path / "sft")) if "loss" in row]
    assert len(tokens) == 3 and all(t % 4 == 0 and 4 * 8 <= t <= 4 * 48 for t in tokens)
