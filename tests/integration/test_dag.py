"""The stage DAG on a local Ray cluster with tiny budgets: hand-off, selection, an interrupted
stage that resumes, and a rerun that skips finished stages."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from jobs.dag import run_recipe, run_status
from jobs.edits import StageChanged
from llada.recipe import Recipe
from jobs.training.stage import read_history
from pipelines import storage

TINY_RECIPE = Path(__file__).resolve().parents[2] / "jobs" / "recipes" / "tiny-cpu.yaml"


def small_recipe(storage_uri: str) -> Recipe:
    raw = yaml.safe_load(TINY_RECIPE.read_text())
    raw.update(run_id="dag-test", storage_uri=storage_uri)
    raw["model"] = {"preset": "tiny", "overrides": {"hidden_size": 64, "num_hidden_layers": 2, "num_experts": 8,
                                                     "num_experts_per_tok": 2, "expert_intermediate_size": 64}}
    raw["data"].update(seq_len=64, sft_seq_len=64, vocab_size=1024,
                       corpus={"num_text_docs": 200, "num_math_docs": 150, "num_code_docs": 100,
                               "num_anneal_docs": 80, "num_sft_chats": 150, "num_eval_items": 16,
                               "files_per_split": 1})
    keep = {"pretrain1", "anneal1", "sft"}
    raw["stages"] = [s for s in raw["stages"] if s["name"] in keep]
    for stage in raw["stages"]:
        stage.update(num_steps=4, checkpoint_every=2, keep_last=3, micro_batch_size=4)
        stage["mixture"]["token_budget"] = 64 * 64
        stage["schedule"] = {"kind": "constant"}
    raw["stages"][0]["select"] = "last"
    raw["stages"][1].update(init_from="pretrain1", select="best_eval_average")
    raw["stages"][2].update(init_from="anneal1", select="average_top_k", average_k=2)
    raw["stages"][2]["fault_injection"] = {"step": 3, "rank": 0}
    raw["stages"][2]["scaling"] = {"num_workers": 1, "max_failures": 0}  # the crash ends the run
    raw["eval"] = {"seed": 0, "tasks": [
        {"name": "arith", "kind": "generation", "source": "demo:gen_arithmetic", "max_items": 4,
         "sampling": {"gen_length": 8, "steps": 4, "threshold": None}, "chat": True},
        {"name": "text", "kind": "elbo", "source": "demo:heldout_text", "max_items": 2, "num_mc_samples": 2,
         "mc_batch_size": 2},
        {"name": "counting", "kind": "lm_eval", "task": "llada_demo_counting", "metric": "acc",
         "include_path": "demo:lm_eval", "data_files": {"test": "demo:lm_eval/llada_demo_counting.jsonl"},
         "max_items": 4, "num_mc_samples": 2},
    ]}
    return Recipe.model_validate(raw)


def test_dag_hands_off_selects_resumes_and_skips(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the serverless default store
    recipe = small_recipe(str(tmp_path))
    with pytest.raises(Exception, match="fault injection"):
        run_recipe(recipe, progress=lambda line: None)  # sft crashes at step 3, no retries
    states = {row["stage"]: row["state"] for row in run_status(recipe)}
    assert states == {"pretrain1": "done", "anneal1": "done", "sft": "in progress"}

    outcomes = run_recipe(recipe, progress=lambda line: None)  # the interrupted stage resumes
    assert [(o.name, o.status) for o in outcomes] == [("pretrain1", "skipped"), ("anneal1", "skipped"), ("sft", "trained")]
    sft_history = read_history(recipe.stage_uri("sft"))
    assert [row["resumed_from"] for row in sft_history if "resumed_from" in row] == [2]
    assert sorted(row["step"] for row in sft_history if "loss" in row) == [1, 2, 3, 4]

    rows = {row["stage"]: row for row in run_status(recipe)}
    # Hand-off: anneal1 started from pretrain1's LAST checkpoint; sft from anneal1's BEST average.
    pretrain_selected = rows["pretrain1"]["selected"]
    assert pretrain_selected["step"] == 4 and pretrain_selected["uri"].endswith("checkpoint_000004")
    anneal_config = storage.read_json(storage.join(rows["anneal1"]["checkpoints"][-1]["uri"], "stage_config.json"))
    assert anneal_config["init_from"] == pretrain_selected["hf_uri"]  # the reference, carried as written
    anneal_scores = {c["uri"]: c["eval_average"] for c in rows["anneal1"]["checkpoints"]}
    assert len(anneal_scores) == 2 and all(v is not None for v in anneal_scores.values())
    best = max(anneal_scores, key=lambda uri: (anneal_scores[uri], uri))
    assert rows["anneal1"]["selected"]["uri"] == best
    sft_config = storage.read_json(storage.join(rows["sft"]["checkpoints"][-1]["uri"], "stage_config.json"))
    assert sft_config["init_from"] == rows["anneal1"]["selected"]["hf_uri"]
    selection = storage.read_json(storage.join(recipe.stage_uri("sft"), "selection.json"))
    assert selection["rule"] == "average_top_k" and len(selection["scores"]) == 2
    # Averaging: both sft checkpoints averaged, scored by the same suite (lm-eval task included,
    # run in the Ray eval task like the others), and chosen only when at least as good.
    averaging = selection["averaging"]
    assert sorted(m["step"] for m in averaging["members"]) == [2, 4]
    average_uri = averaging["average_checkpoint"]["uri"]
    assert average_uri.endswith("averages/top-000002-000004")
    assert storage.exists(storage.join(average_uri, "complete.json"))
    average_scores = storage.read_json(storage.join(average_uri, "scores.json"))
    assert average_scores["average"] == averaging["average_score"]
    assert 0.0 <= average_scores["tasks"]["counting"]["score"] <= 1.0
    assert average_scores["tasks"]["counting"]["num_items"] == 4
    best_single = max(c["eval_average"] for c in rows["sft"]["checkpoints"])
    assert averaging["best_single_score"] == best_single
    assert averaging["margin"] == pytest.approx(averaging["average_score"] - best_single)
    wins = averaging["average_score"] >= best_single
    assert averaging["winner"] == ("average" if wins else "single")
    assert (selection["checkpoint"]["uri"] == average_uri) == wins

    # Tracking, with nothing configured: MLflow's serverless store in the run folder. The crashed
    # and resumed runs are one MLflow run, and the resumed stage has every step once.
    from mlflow import MlflowClient

    from jobs.tracking import read_record

    tracked = read_record(recipe)
    assert tracked["uri"] == f"sqlite:///{tmp_path}/dag-test/mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=tracked["uri"])
    runs = client.search_runs([tracked["experiment_id"]])
    assert sorted(run.info.run_name for run in runs) == ["anneal1", "dag-test", "pretrain1", "sft"]
    assert [m.step for m in client.get_metric_history(tracked["stages"]["sft"], "loss")] == [1, 2, 3, 4]
    assert client.get_run(tracked["run_id"]).info.status == "FINISHED"

    started = time.perf_counter()
    outcomes = run_recipe(recipe, progress=lambda line: None)  # everything finished: all skipped
    assert [o.status for o in outcomes] == ["skipped"] * 3
    assert time.perf_counter() - started < 60

    # A recipe edit after the fact is named and refused, before any work ...
    raw = recipe.model_dump(mode="json")
    raw["stages"][2]["optimizer"]["lr"] = 1e-4
    raw["stages"][2]["fault_injection"] = None  # the restarted stage trains through
    edited = Recipe.model_validate(raw)
    with pytest.raises(StageChanged, match=r"stage 'sft' .*optimizer.lr: 0.003 -> 0.0001.*--restart-stage sft"):
        run_recipe(edited, progress=lambda line: None, accept_changes=True)  # an lr is not safe to accept
    raw["stages"][2]["optimizer"]["lr"], raw["stages"][2]["keep_last"] = recipe.stages[2].optimizer.lr, 5
    raw["stages"][2]["fault_injection"] = recipe.model_dump(mode="json")["stages"][2]["fault_injection"]
    cadence = Recipe.model_validate(raw)
    with pytest.raises(StageChanged, match="keep_last.*--accept-changes"):
        run_recipe(cadence, progress=lambda line: None)
    outcomes = run_recipe(cadence, progress=lambda line: None, accept_changes=True)
    assert [o.status for o in outcomes] == ["skipped"] * 3
    # ... and a restart archives the stage's folder and trains it again from its start.
    lines: list[str] = []
    outcomes = run_recipe(edited, progress=lines.append, restart_stages=["sft"])
    assert [(o.name, o.status) for o in outcomes] == [("pretrain1", "skipped"), ("anneal1", "skipped"), ("sft", "trained")]
    [archived] = [line for line in lines if "earlier attempt is archived" in line]
    archive = archived.rsplit(" at ", 1)[1]
    assert storage.exists(storage.join(archive, "done.json"))  # the old attempt, kept
    sft_config = storage.read_json(storage.join(run_status(edited)[2]["selected"]["uri"], "stage_config.json"))
    assert sft_config["optimizer"]["lr"] == 1e-4
