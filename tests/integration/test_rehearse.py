"""`llada rehearse` of the shipped 7B recipe as a user runs it, in its own process: a local Ray
cluster of two nodes (``--nodes 2``), storage on the S3 server, the recipe's data, tokenizer and
lm-eval tasks unreachable (its bucket does not exist there), so they stand in. All five stages
train with expert parallel 2 and ZeRO 1 on workers spanning both nodes, select, and the final
selection answers one chat request through the OpenAI API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import storage

pytestmark = pytest.mark.integration
LLADA = str(Path(sys.executable).with_name("llada"))
RECIPE = Path(__file__).resolve().parents[2] / "jobs" / "recipes" / "llada-moe-7b-a1b.yaml"
STAGES = ["pretrain1", "pretrain2", "anneal1", "anneal2", "sft"]


def test_plan_checks_the_layout_against_the_connected_cluster(ray_cluster, capsys):
    from llada.cli import main

    assert main(["plan", str(RECIPE), "--ray-address", "auto", "--json"]) == 1
    plan = json.loads(capsys.readouterr().out)
    assert plan["gpus"] == 0 and plan["gpus_from"] == "the connected cluster"
    assert "stages.pretrain1: needs 64 GPUs (one per worker), the connected cluster has 0" in " ".join(plan["problems"])


def test_rehearsal_of_the_7b_recipe_on_two_nodes_with_s3_storage(s3_server):
    bucket = s3_server.bucket("rehearse")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    started = time.perf_counter()
    result = subprocess.run([LLADA, "rehearse", str(RECIPE), "--storage", f"{bucket}/rehearsals", "--run-id", "r1",
                             "--nodes", "2", "--json"], env=env, capture_output=True, text=True, timeout=900)
    minutes = (time.perf_counter() - started) / 60
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    print(f"rehearsal took {minutes:.1f} min")

    # It said what it shrank and what stood in, before training.
    assert "stage anneal2" in output and "x 8192  ->" in output and "x 256," in output
    for what in ("data.sources.0 (text)", "data.sources.4 (chat)", "data.tokenizer_uri", "eval.tasks.mmlu",
                 "eval.tasks.humaneval"):
        assert f"  {what}: " in output, what
    assert output.index("stood in") < output.index("[dag] pretrain1: training")

    s3 = s3_server.settings
    run_uri = f"{bucket}/rehearsals/r1"
    record = json.loads(output.strip().splitlines()[-1])
    assert record == storage.read_json(f"{run_uri}/rehearsal.json", s3) | {"seconds": record["seconds"]}
    stages = {stage["stage"]: stage for stage in record["stages"]}
    assert list(stages) == STAGES
    for name, stage in stages.items():
        assert stage["state"] == "done" and stage["selected_step"] is not None, stage
        assert stage["workers"] == 2 and stage["nodes"] == 2, stage  # the workers spanned both nodes
        assert storage.exists(f"{run_uri}/stages/{name}/selection.json", s3)
    assert [stages[name]["select"] for name in STAGES] == ["last", "best_eval_average", "last", "last",
                                                           "best_eval_average"]
    # Anneal 2: rows twice anneal 1's, exported at RoPE 50k with the 8k context; before it, 10k / 4k.
    assert stages["anneal2"]["seq_len"] == 2 * stages["anneal1"]["seq_len"] == 256
    assert (stages["anneal2"]["rope_theta"], stages["anneal2"]["max_position_embeddings"]) == (50000.0, 8192)
    assert (stages["anneal1"]["rope_theta"], stages["anneal1"]["max_position_embeddings"]) == (10000.0, 4096)
    # The recipe's layout, scaled down: expert parallel 2, ZeRO 1, over the 13 eval tasks.
    selected = storage.read_json(f"{run_uri}/stages/pretrain2/selection.json", s3)
    config = storage.read_json(storage.join(selected["checkpoint"]["uri"], "stage_config.json"), s3)
    assert (config["scaling"]["expert_parallel_size"], config["scaling"]["zero_stage"]) == (2, 1)
    scores = storage.read_json(storage.join(selected["checkpoint"]["uri"], "scores.json"), s3)
    assert len(scores["tasks"]) == 13 and all(task["kind"] == "lm_eval" for task in scores["tasks"].values())

    served = record["served"]
    assert served["model"] == "llada-moe" and served["completion_tokens"] >= 1, served
    assert isinstance(served["answer"], str)
    assert served["api_key"].startswith("LLADA_API_KEY is not set here")  # the serve block's key, rehearsed

    # Nothing outside the rehearsal's own run folder was written (pyarrow marks the folders above
    # it with empty keys ending in "/": those hold nothing).
    keys = [key for key in storage.list_files(f"{bucket}/", s3) if not f"{run_uri}/".startswith(key)]
    assert keys and all(key.startswith(f"{run_uri}/") for key in keys), [k for k in keys if run_uri not in k][:5]

