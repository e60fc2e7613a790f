"""`llada plan` (llada/plan.py): both shipped recipes plan with exit 0 (the 7B one with its data and
tokenizer in the S3 server), the 7B plan says what the paper's recipe is (10T tokens in pretrain
1, anneal 2 at 8192 with RoPE 50k, GPU-hours), and a broken recipe gets every problem at once."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from llada.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "jobs" / "recipes"
SOURCES = {0: "corpus/web/a.parquet", 1: "corpus/math/a.parquet", 2: "corpus/code/a.parquet",
           3: "corpus/high-quality/a.parquet", 4: "sft/a.jsonl"}


def plan_json(capsys, *argv: str) -> tuple[int, dict]:
    code = main(["plan", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_the_tiny_recipe_plans_without_problems(capsys):
    code, plan = plan_json(capsys, str(RECIPES / "tiny-cpu.yaml"))
    assert code == 0 and plan["problems"] == []
    assert [stage["name"] for stage in plan["stages"]] == ["pretrain1", "pretrain2", "anneal1", "anneal2", "sft"]
    anneal1, anneal2 = plan["stages"][2], plan["stages"][3]
    assert anneal2["seq_len"] == 2 * anneal1["seq_len"]
    assert all(stage["gpu_hours"] == {} for stage in plan["stages"])  # a CPU recipe
    assert all(stage["steps"] >= 1 and stage["flops"] > 0 for stage in plan["stages"])


def test_the_papers_recipe_plans_with_its_data_in_s3(s3_server, capsys):
    bucket = s3_server.bucket("plan")
    client = s3_server.client()
    table = io.BytesIO()
    pq.write_table(pa.table({"text": ["a b c"] * 10}), table)
    for index, key in SOURCES.items():
        body = b'{"messages": []}\n' if key.endswith(".jsonl") else table.getvalue()
        client.put_object(Bucket=bucket[5:], Key=key, Body=body)
    client.put_object(Bucket=bucket[5:], Key="tokenizer/tokenizer.json", Body=b"{}")
    overrides = [f"data.sources.{i}.uri={bucket}/{key.rsplit('/', 1)[0]}/*.{key.rsplit('.', 1)[1]}"
                 for i, key in SOURCES.items()]
    overrides += [f"data.tokenizer_uri={bucket}/tokenizer", f"storage_uri={bucket}/runs"]
    argv = [str(RECIPES / "llada-moe-7b-a1b.yaml"), "--gpus", "64"]
    for override in overrides:
        argv += ["--set", override]
    code, plan = plan_json(capsys, *argv)
    assert code == 0, plan["problems"]
    stages = {stage["name"]: stage for stage in plan["stages"]}
    pretrain1 = stages["pretrain1"]
    assert abs(pretrain1["tokens"] - 10**13) <= pretrain1["global_batch_rows"] * pretrain1["seq_len"]
    assert stages["anneal2"]["seq_len"] == 8192 and stages["anneal2"]["rope_theta"] == 50000.0
    assert stages["anneal1"]["seq_len"] == 4096 and stages["anneal1"]["rope_theta"] == 10000.0
    assert set(pretrain1["gpu_hours"]) == {"H100", "H200", "A100"} and pretrain1["gpu_hours"]["H100"] > 10_000
    assert [source["files"] for source in plan["sources"]] == [1] * 5
    assert main(["plan", *argv]) == 0  # the table
    text = capsys.readouterr().out
    assert "stage anneal2" in text and "RoPE base          50000" in text and "H100 989 TFLOP/s" in text


def test_a_broken_recipe_gets_every_problem_at_once(tmp_path, capsys):
    argv = [str(RECIPES / "llada-moe-7b-a1b.yaml"), "--gpus", "8", "--set", f"storage_uri={tmp_path}/runs",
            "--set", f"data.tokenizer_uri={tmp_path}/no-tokenizer"]
    for index in SOURCES:
        argv += ["--set", f"data.sources.{index}.uri={tmp_path}/missing-{index}/*.parquet"]
    code, plan = plan_json(capsys, *argv)
    assert code == 1
    problems = plan["problems"]
    assert sum(problem.startswith("data.sources.") for problem in problems) == 5
    assert any(problem.startswith("data.tokenizer_uri") for problem in problems)
    assert sum("needs 64 GPUs" in problem for problem in problems) == 5  # every stage, not the first
    assert len(plan["stages"]) == 5  # the plan is still made


def test_mfu_is_measured_against_the_device_the_worker_trains_on():
    """On a CPU (and on a GPU not in the datasheet table, or not in bf16) the denominator is a
    timed matmul on that device in that dtype; tests/gpu checks the datasheet path."""
    import torch

    from jobs.training.metrics import device_peak_flops

    peak, source = device_peak_flops("cpu", torch.float32)
    assert peak > 1e8 and source == "timed torch.float32 matmul on cpu"
    bf16_peak, bf16_source = device_peak_flops("cpu", torch.bfloat16)
    assert bf16_peak > 0 and "bfloat16" in bf16_source
