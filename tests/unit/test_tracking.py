"""MLflow tracking and registry (jobs/tracking.py) against MLflow's serverless SQLite store:
where tracking goes, a resumed stage continuing its run without duplicate steps, scores and
selections, the champion alias moving only on a better average of the same suite, and a
tracking server that is down costing seconds, one warning and nothing else."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from jobs.tracking import Tracker, checkpoint_of, read_record, resolve_uri
from llada.recipe import Recipe

TINY_RECIPE = Path(__file__).resolve().parents[2] / "jobs" / "recipes" / "tiny-cpu.yaml"


def recipe_at(storage_uri: str, **tracking: object) -> Recipe:
    raw = yaml.safe_load(TINY_RECIPE.read_text())
    raw.update(storage_uri=storage_uri, tracking=tracking)
    return Recipe.model_validate(raw)


def stage_config(recipe: Recipe, name: str):  # type: ignore[no-untyped-def]
    return recipe.stage_config(name, data_uri="-", output_uri=recipe.stage_uri(name))


def client_of(tracker: Tracker):  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracker.uri, registry_uri=tracker.uri)


def selection(step: int, average: float, suite: str = "suite-a") -> dict:
    checkpoint = {"uri": f"/ckpt/checkpoint_{step:06d}", "hf_uri": f"/ckpt/checkpoint_{step:06d}/hf", "step": step}
    return {"rule": "best_eval_average", "checkpoint": checkpoint, "average": average, "reason": "the best",
            "suite_hash": suite, "scores": [
                {"checkpoint": {**checkpoint, "step": step // 2}, "average": average / 2, "selected": False,
                 "tasks": {"reading": {"score": average / 2}}},
                {"checkpoint": checkpoint, "average": average, "selected": True, "tasks": {"reading": {"score": average}}},
            ]}


def test_where_tracking_goes(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = recipe_at(str(tmp_path))
    assert resolve_uri(local) == (f"sqlite:///{tmp_path}/tiny-cpu/mlflow/mlflow.db", "the local store in the run folder")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_uri(local)[0] == "http://mlflow.example:5000"
    assert resolve_uri(recipe_at(str(tmp_path), uri="http://other:5000"))[0] == "http://other:5000"
    assert resolve_uri(recipe_at(str(tmp_path), enabled=False))[0] is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri, why = resolve_uri(recipe_at("s3://bucket/runs"))
    assert uri is None and "MLFLOW_TRACKING_URI" in why
    with pytest.raises(ValidationError, match="tracking.uri") as error:
        recipe_at(str(tmp_path), uri="https://alice:secret@mlflow.example")
    assert "MLFLOW_TRACKING_PASSWORD" in str(error.value)


def test_a_resumed_stage_continues_its_runs_without_duplicate_steps(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = recipe_at(str(tmp_path))
    lines: list[str] = []
    first = Tracker(recipe, None, lines.append)
    first.start()
    first.start_stage("pretrain1", stage_config(recipe, "pretrain1"))
    for step in (1, 2, 3):  # the stage checkpointed at 2, logged 3, then crashed
        first.log_step("pretrain1", {"step": step, "loss": 10.0 - step, "mfu": 0.1, "note_list": [1]})
    first.finish(failed=True)

    again = Tracker(recipe, None, lines.append)
    again.start()
    again.start_stage("pretrain1", stage_config(recipe, "pretrain1"))
    for step in (3, 4, 5):  # resumed from 2: step 3 is trained again
        again.log_step("pretrain1", {"step": step, "loss": 10.0 - step})
    again.log_step("pretrain1", {"note": "a console line, not a step"})
    again.finish_stage("pretrain1")
    again.finish()

    assert again.record["run_id"] == first.record["run_id"]
    assert again.stage_runs["pretrain1"] == first.stage_runs["pretrain1"]
    client = client_of(again)
    history = client.get_metric_history(again.stage_runs["pretrain1"], "loss")
    assert sorted(metric.step for metric in history) == [1, 2, 3, 4, 5]
    stage_run = client.get_run(again.stage_runs["pretrain1"])
    assert stage_run.data.tags["mlflow.parentRunId"] == again.record["run_id"]
    assert stage_run.data.params["optimizer.lr"] == str(stage_config(recipe, "pretrain1").optimizer.lr)
    assert client.get_run(again.record["run_id"]).info.status == "FINISHED"
    assert read_record(recipe)["stages"] == {"pretrain1": again.stage_runs["pretrain1"]}
    assert not any("failed" in line for line in lines), lines


def test_scores_selection_and_the_champion_alias(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = recipe_at(str(tmp_path), model_name="tiny-model")
    lines: list[str] = []
    tracker = Tracker(recipe, None, lines.append)
    tracker.start()
    tracker.start_stage("sft", stage_config(recipe, "sft"))
    tracker.log_selection("sft", selection(800, 0.30))
    client = client_of(tracker)
    run = client.get_run(tracker.stage_runs["sft"])
    assert run.data.tags["llada.selection.step"] == "800" and run.data.tags["llada.selection.reason"] == "the best"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/average")] == [(400, 0.15), (800, 0.3)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/reading")] == [400, 800]

    def champion() -> str:
        return checkpoint_of(client.get_model_version_by_alias("tiny-model", "champion"))

    tracker.register("sft", selection(800, 0.30))
    assert champion() == "/ckpt/checkpoint_000800/hf"
    tracker.register("sft", selection(900, 0.25))  # worse: registered, the alias stays
    assert champion() == "/ckpt/checkpoint_000800/hf"
    tracker.register("sft", selection(950, 0.99, suite="suite-b"))  # another suite: does not compare
    assert champion() == "/ckpt/checkpoint_000800/hf"
    tracker.register("sft", selection(1000, 0.35))  # better on the same suite: the alias moves
    assert champion() == "/ckpt/checkpoint_001000/hf"
    versions = {checkpoint_of(v): v for v in client.search_model_versions("name = 'tiny-model'")}
    assert len(versions) == 4
    assert "does not beat" in versions["/ckpt/checkpoint_000900/hf"].tags["llada.alias_decision"]
    assert "another eval suite" in versions["/ckpt/checkpoint_000950/hf"].tags["llada.alias_decision"]
    assert versions["/ckpt/checkpoint_001000/hf"].tags["llada.score.reading"] == "0.35"
    assert sum("moved from version 1" in line for line in lines) == 1


def test_a_tracking_server_that_is_down_costs_one_warning_and_nothing_else(tmp_path, monkeypatch):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(name, raising=False)
    recipe = recipe_at(str(tmp_path))
    lines: list[str] = []
    tracker = Tracker(recipe, None, lines.append)
    started = time.monotonic()
    tracker.start()
    tracker.start_stage("pretrain1", stage_config(recipe, "pretrain1"))
    tracker.log_step("pretrain1", {"step": 1, "loss": 1.0})
    tracker.log_selection("pretrain1", selection(4, 0.2))
    tracker.finish()
    assert time.monotonic() - started < 60  # MLflow's own retries would take minutes
    warnings = [line for line in lines if "failed" in line]
    assert len(warnings) == 1 and dead in warnings[0] and "tracking is off" in warnings[0]
    assert not tracker.on and read_record(recipe) is None
