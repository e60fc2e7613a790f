"""The eval suite as Ray tasks over a stage's checkpoints, then selection on the records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.checkpoints import CheckpointRef, checkpoint_name, checkpoints_uri, list_checkpoints, write_completion_record
from jobs.evaluation.tasks import EvalSuiteConfig
from jobs.evaluation.runner import SCORES_RECORD, evaluate_checkpoints_ray, suite_hash
from jobs.evaluation.selection import select_checkpoint, selection_record
from llada_core import LLaDAMoEModelLM, preset, save_model
from pipelines.tokenizer import save_tokenizer, train_bpe

pytestmark = pytest.mark.integration

LINES = ["alice has 3 pens. now alice has 5 pens.", "12+7=19\n8-3=5", "the green duck eats in the forest."]


def write_stage(stage: Path, steps: list[int]) -> None:
    """A stage folder with a complete checkpoint per step (different random weights each)."""
    tokenizer = train_bpe(LINES * 4, vocab_size=256, min_frequency=1)
    config = preset("tiny", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    for step in steps:
        folder = Path(checkpoints_uri(str(stage))) / checkpoint_name(step)
        torch.manual_seed(step)
        save_model(LLaDAMoEModelLM(config), folder / "hf")
        save_tokenizer(tokenizer, str(folder / "hf"))
        write_completion_record(CheckpointRef.at(str(stage), step), {"loss": 1.0})


def test_evaluate_checkpoints_as_ray_tasks_then_select(ray_cluster, tmp_path):
    stage = tmp_path / "pretrain1"
    write_stage(stage, [4, 8])
    source = tmp_path / "eval.jsonl"
    source.write_text("".join(json.dumps(item) + "\n" for item in [
        {"prompt": "12+7=", "choices": ["19", "20"], "answer_index": 0},
        {"prompt": "alice has ", "choices": ["3 pens.", "pens 3."], "answer_index": 0},
    ]))
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": LINES[0]}) + "\n")
    suite = EvalSuiteConfig.model_validate({"tasks": [
        {"name": "mc", "kind": "choice", "source": str(source), "num_mc_samples": 2},
        {"name": "text", "kind": "elbo", "source": str(text), "num_mc_samples": 2},
    ]})
    infos = list_checkpoints(str(stage))
    messages: list[str] = []
    records = evaluate_checkpoints_ray(infos, suite, progress=messages.append)

    assert [r["checkpoint"]["step"] for r in records] == [4, 8] and [r["reused"] for r in records] == [False, False]
    assert [r["checkpoint"] for r in records] == [info.ref.to_json() for info in infos]
    assert all(r["suite_hash"] == suite_hash(suite) for r in records)
    assert records[0]["tasks"]["text"]["value"] != records[1]["tasks"]["text"]["value"]  # two different models
    for info, record in zip(infos, records):
        stored = json.loads((Path(info.uri) / SCORES_RECORD).read_text())  # written beside hf/
        assert stored == {k: v for k, v in record.items() if k != "reused"}
    assert any("2 checkpoint(s) to score" in m for m in messages)

    # a rerun starts no task: both records are reused
    again = evaluate_checkpoints_ray(infos, suite, progress=messages.append)
    assert [r["reused"] for r in again] == [True, True]
    assert [r["average"] for r in again] == [r["average"] for r in records]
    assert "0 checkpoint(s) to score, 2 already scored" in messages[-1]

    decision = select_checkpoint(records, "best_eval_average")
    best = max(records, key=lambda r: (r["average"], r["checkpoint"]["step"]))
    saved = selection_record(decision)
    assert saved["checkpoint"] == best["checkpoint"]
    assert len(saved["scores"]) == 2
