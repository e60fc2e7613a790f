"""Experiment tracking against a real MLflow tracking server (`mlflow server`, SQLite backend,
proxied local artifacts) started on 127.0.0.1: a tiny two-stage run logs its recipe, each stage's
params, per-step metrics, checkpoint scores and selection, registers the final selection under
the champion alias, `llada status --json` names the runs, a rerun adds no runs, and `llada serve
--model models:/NAME@champion` (and the RayService rendering) resolve to the selected checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from serve_fixtures import free_port, wait_for_200
from test_dag import small_recipe

from jobs.dag import run_recipe, run_status
from jobs.tracking import checkpoint_of, read_record
from llada.cli import main
from llada.recipe import Recipe

pytestmark = pytest.mark.integration
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    process = subprocess.Popen(
        [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination",
         (folder / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=(folder / "server.log").open("w"))
    uri = f"http://127.0.0.1:{port}"

    def alive() -> None:
        assert process.poll() is None, (folder / "server.log").read_text()[-2000:]

    try:
        wait_for_200(f"{uri}/health", 120, alive)
        yield uri
    finally:
        process.terminate()
        process.wait(timeout=30)


def two_stage_recipe(storage_uri: str, tracking_uri: str) -> Recipe:
    raw = small_recipe(storage_uri).model_dump(mode="json", exclude_none=True)
    raw["run_id"] = "tracked-run"
    raw["stages"] = [stage for stage in raw["stages"] if stage["name"] in ("pretrain1", "sft")]
    raw["stages"][1].update(init_from="pretrain1", select="best_eval_average")
    raw["stages"][1].pop("fault_injection", None)
    raw["stages"][1].pop("average_k", None)
    raw["stages"][1]["scaling"] = {"num_workers": 1}
    raw["tracking"] = {"uri": tracking_uri, "model_name": "tracked-llada"}
    return Recipe.model_validate(raw)


def test_a_run_is_tracked_registered_and_served_by_alias(ray_cluster, mlflow_server, tmp_path, capsys):
    from mlflow import MlflowClient

    recipe = two_stage_recipe(str(tmp_path), mlflow_server)
    lines: list[str] = []
    run_recipe(recipe, progress=lines.append)
    assert not [line for line in lines if "[tracking]" in line and "failed" in line], lines
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    record = read_record(recipe)
    assert record["uri"] == mlflow_server and set(record["stages"]) == {"pretrain1", "sft"}

    parent = client.get_run(record["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["llada.run_uri"] == recipe.run_uri
    assert "recipe.json" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    rows = {row["stage"]: row for row in run_status(recipe)}
    for name, run_id in record["stages"].items():
        run = client.get_run(run_id)
        stage = recipe.stage(name)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        assert run.data.params["micro_batch_size"] == str(stage.micro_batch_size)
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, stage.num_steps + 1))
        assert len(client.get_metric_history(run_id, "mfu")) == stage.num_steps
        scored = {m.step for m in client.get_metric_history(run_id, "eval/average")}
        assert scored == {c["step"] for c in rows[name]["checkpoints"] if c["eval_average"] is not None}
        assert run.data.tags["llada.selection.step"] == str(rows[name]["selected"]["step"])
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"stage.json", "selection.json", "training.png"} <= artifacts
    champion = client.get_model_version_by_alias("tracked-llada", "champion")
    # A tracking server takes no local path as a version's source: the version points to the stage's run
    # and names the checkpoint in a tag, which serving resolves.
    assert checkpoint_of(champion) == rows["sft"]["selected"]["hf_uri"] and champion.run_id == record["stages"]["sft"]
    assert any("registered tracked-llada version 1" in line for line in lines)

    run_recipe(recipe, progress=lines.append)  # every stage done: skipped, nothing new is logged
    runs = client.search_runs([client.get_experiment_by_name(recipe.run_id).experiment_id])
    assert len(runs) == 3 and read_record(recipe)["run_id"] == parent.info.run_id

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True)))
    capsys.readouterr()
    assert main(["status", str(recipe_file), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["tracking"]["run_id"] == parent.info.run_id and status["tracking"]["stages"] == record["stages"]

    assert main(["serve", "--model", "models:/tracked-llada@champion", "--tracking-uri", mlflow_server,
                 "--print-config"]) == 0
    printed = capsys.readouterr().out
    document = yaml.safe_load(printed[printed.index("# Ray Serve config"):])
    assert document["applications"][0]["args"]["checkpoint"] == checkpoint_of(champion)
    assert main(["infra", "render", str(recipe_file), "--kind", "rayservice", "--model",
                 "models:/tracked-llada@champion", "--tracking-uri", mlflow_server]) == 0
    rendered = capsys.readouterr().out
    assert checkpoint_of(champion) in rendered
    assert main(["serve", "--model", "models:/tracked-llada@nobody", "--tracking-uri", mlflow_server,
                 "--print-config"]) == 2
    assert "models:/tracked-llada@nobody is not in the registry" in capsys.readouterr().err


def test_a_tracking_server_that_is_down_never_stops_training(ray_cluster, tmp_path):
    """Tracking at a port nothing listens on: one warning that names the URI, and the stage
    trains, scores and selects as without tracking."""
    dead = f"http://127.0.0.1:{free_port()}"
    recipe = two_stage_recipe(str(tmp_path), dead)
    raw = recipe.model_dump(mode="json", exclude_none=True)
    raw["stages"] = raw["stages"][:1]
    recipe = Recipe.model_validate(raw)
    lines: list[str] = []
    outcomes = run_recipe(recipe, progress=lines.append)
    assert [(o.name, o.status) for o in outcomes] == [("pretrain1", "trained")]
    warnings = [line for line in lines if line.startswith("[tracking]") and "failed" in line]
    assert len(warnings) == 1 and dead in warnings[0] and "tracking is off" in warnings[0]
    assert run_status(recipe)[0]["selected"]["step"] == recipe.stages[0].num_steps
