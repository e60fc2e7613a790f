"""Experiment tracking and the model registry in MLflow: one MLflow run per platform run, one
nested run per stage, the selected final checkpoint registered with an alias.

What is logged, from the driver (the Train workers never talk to MLflow):
- the platform run: the resolved recipe (``recipe.json``) and the demo's report and plots;
- each stage: its resolved StageConfig as params (and ``stage.json``); every training row the
  workers relay at ``log_every`` (loss, diffusion / LB / z loss, lr, tokens/s, MFU, expert load,
  tokens seen) at its step; every scored checkpoint's task scores and eval average at the
  checkpoint's step; the selection (rule, step, reason as tags, ``selection.json``) and
  ``training.png``;
- the registry: the last stage's selection as a version of ``tracking.model_name`` (default the
  run id) tagged with its scores, and the alias (``champion``) moved to it only when its eval
  average beats the current holder's on the same suite (the decision is a tag of the version).

Where: the recipe's ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite store inside a
local run folder (``{run}/mlflow/mlflow.db``, artifacts beside it; ``mlflow ui --backend-store-uri
sqlite:///...`` shows it, no server needed). A run in object storage without a URI is not
tracked (said once). Credentials come from MLflow's environment variables
(MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN), never from the recipe.

Resumes continue the same MLflow runs: their ids are kept in ``{run}/tracking.json``, and a stage
logs only steps after the last one MLflow already has, so a resumed stage neither duplicates the
steps it trains again nor leaves a gap.

Failures never stop or slow training: MLflow's HTTP client is given a short timeout and one
retry (unless the environment sets them), and the first failed call turns tracking off for the
rest of the command with one warning that names the URI; what is lost is only the MLflow copy
(the run folder keeps metrics.jsonl, scores.json and selection.json).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from pipelines import storage

RECORD = "tracking.json"
LOCAL_STORE = "mlflow"
STEP_METRICS = ("loss", "diffusion_loss", "load_balance_loss", "z_loss", "lr", "tokens_per_s", "mfu",
                "expert_load_ratio", "tokens_seen")
# MLflow's HTTP client retries 7 times with exponential backoff by default (minutes against a
# server that is down); these bound one call to seconds. The environment wins when it sets them.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
_PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value


def resolve_uri(recipe: Any) -> tuple[str | None, str]:
    """(tracking URI or None, where it came from / why there is none)."""
    spec = recipe.tracking
    if not spec.enabled:
        return None, "tracking.enabled is false"
    if spec.uri:
        return spec.uri, "the recipe's tracking.uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    if storage.is_remote(recipe.run_uri):
        return None, ("the run is in object storage and no tracking server is named: set MLFLOW_TRACKING_URI "
                      "or the recipe's tracking.uri")
    return f"sqlite:///{local_store(recipe) / 'mlflow.db'}", "the local store in the run folder"


def local_store(recipe: Any) -> Path:
    """The serverless default store of a local run: ``{run}/mlflow/``."""
    return Path(storage.parse_uri(storage.join(recipe.run_uri, LOCAL_STORE)).path)


def mlflow_client(uri: str) -> Any:
    """An MlflowClient for tracking and registry at ``uri``, its HTTP calls bounded (HTTP_DEFAULTS)."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def read_record(recipe: Any, s3: storage.S3Settings | None = None) -> dict[str, Any] | None:
    """The run's ``tracking.json`` (URI, experiment and run ids), if it was tracked."""
    uri = storage.join(recipe.run_uri, RECORD)
    return storage.read_json(uri, s3) if storage.exists(uri, s3) else None


class Tracker:
    """The MLflow side of one platform run, safe to call whatever happens to the server: every
    method returns None and does nothing once tracking is off."""

    def __init__(self, recipe: Any, s3: storage.S3Settings | None, say: Callable[[str], None]) -> None:
        self.recipe, self.s3, self.say = recipe, s3, say
        self.uri, self.source = resolve_uri(recipe)
        self.client: Any = None
        self.record: dict[str, Any] = {}
        self.stage_runs: dict[str, str] = {}
        self._last_step: dict[str, int] = {}

    @property
    def on(self) -> bool:
        return self.client is not None

    # ------------------------------------------------------------ the platform run

    def start(self) -> None:
        """Open (or reopen, on a resumed run) the platform run."""
        if self.uri is None:
            self.say(f"[tracking] off: {self.source}")
            return
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = mlflow_client(self.uri)
        self._call("open the run", self._open_run)
        if self.on:
            self.say(f"[tracking] MLflow at {self.uri} ({self.source}): experiment {self.record['experiment']!r}, "
                     f"run {self.record['run_id']}")

    def _open_run(self) -> None:
        client, recipe = self.client, self.recipe
        name = recipe.tracking.experiment or recipe.run_id
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            location = None
            if self.uri.startswith("sqlite:///") and self.source.startswith("the local store"):
                location = (local_store(recipe) / "artifacts").as_uri()
            experiment_id = client.create_experiment(name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        previous = read_record(recipe, self.s3) or {}
        run_id = previous.get("run_id") if previous.get("uri") == self.uri else None
        if run_id is None or not self._exists(run_id):
            found = client.search_runs([experiment_id], f"tags.`llada.run_uri` = '{recipe.run_uri}' "
                                                        "and tags.`llada.kind` = 'run'", max_results=1)
            run_id = found[0].info.run_id if found else None
        if run_id is None:
            run = client.create_run(experiment_id, run_name=recipe.run_id,
                                    tags={"llada.run_uri": recipe.run_uri, "llada.kind": "run"})
            run_id = run.info.run_id
            client.log_dict(run_id, recipe.model_dump(mode="json"), "recipe.json")
        else:
            client.update_run(run_id, status="RUNNING")
            self.stage_runs.update(previous.get("stages", {}) if previous.get("run_id") == run_id else {})
        self.record = {"uri": self.uri, "experiment": name, "experiment_id": experiment_id, "run_id": run_id,
                       "stages": self.stage_runs}
        self._write_record()

    def attach(self) -> bool:
        """Reach the runs a finished command tracked (from ``tracking.json``) to add to them,
        without reopening them -> whether there are any."""
        record = read_record(self.recipe, self.s3) if self.uri is not None else None
        if not record or record.get("uri") != self.uri:
            return False
        self.client = mlflow_client(self.uri)
        self.record, self.stage_runs = record, dict(record.get("stages", {}))
        return True

    def ui_hint(self) -> str | None:
        """The command that shows a serverless store's runs."""
        if self.uri is None or not self.uri.startswith("sqlite:///"):
            return None
        return f"mlflow ui --backend-store-uri {self.uri}"

    def finish(self, failed: bool = False) -> None:
        if self.on:
            self._call("close the run", lambda: self.client.set_terminated(
                self.record["run_id"], status="FAILED" if failed else "FINISHED"))

    def log_artifacts(self, uri: str, path: str) -> None:
        """Every file under ``uri`` (a run folder, local or S3) as artifacts of the platform run."""
        if self.on:
            self._call(f"log {uri}", lambda: self._log_tree(self.record["run_id"], uri, path))

    # ------------------------------------------------------------ stages

    def start_stage(self, name: str, config: Any) -> None:
        """Open (or reopen) the stage's nested run and log its config."""
        if self.on:
            self._call(f"open stage {name}", lambda: self._open_stage(name, config))

    def _open_stage(self, name: str, config: Any) -> None:
        client, parent = self.client, self.record["run_id"]
        run_id = self.stage_runs.get(name)
        if run_id is None or not self._exists(run_id):
            found = client.search_runs([self.record["experiment_id"]],
                                       f"tags.`mlflow.parentRunId` = '{parent}' and tags.`llada.stage` = '{name}'",
                                       max_results=1)
            run_id = found[0].info.run_id if found else None
        if run_id is None:
            run_id = client.create_run(self.record["experiment_id"], run_name=name, tags={
                "mlflow.parentRunId": parent, "llada.stage": name, "llada.kind": "stage"}).info.run_id
        else:
            client.update_run(run_id, status="RUNNING")
        self.stage_runs[name] = run_id
        self._write_record()
        history = client.get_metric_history(run_id, "loss")
        self._last_step[name] = max((metric.step for metric in history), default=0)
        values = config.model_dump(mode="json")
        logged = client.get_run(run_id).data.params
        params = {key: value for key, value in _flatten(values).items() if key not in logged}
        from mlflow.entities import Param

        entries = [Param(key, str(value)[:_PARAM_VALUE_LIMIT]) for key, value in params.items()]
        for start in range(0, len(entries), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=entries[start:start + 100])
        client.log_dict(run_id, values, "stage.json")

    def log_step(self, name: str, row: dict[str, Any]) -> None:
        """One training row (the workers' relay, every log_every steps); steps MLflow already has
        (trained again after a resume) are skipped."""
        step = row.get("step")
        if not self.on or name not in self.stage_runs or not isinstance(step, int) or step <= self._last_step[name]:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key, float(row[key]), stamp, step) for key in STEP_METRICS
                   if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
        if self._call(f"log step {step} of {name}", lambda: self.client.log_batch(self.stage_runs[name],
                                                                                  metrics=metrics)):
            self._last_step[name] = step

    def log_selection(self, name: str, record: dict[str, Any]) -> None:
        """Every scored checkpoint's scores at its step, the selection and the training plot."""
        if self.on and name in self.stage_runs:
            self._call(f"log the selection of {name}", lambda: self._log_selection(name, record))

    def _log_selection(self, name: str, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        client, run_id = self.client, self.stage_runs[name]
        stamp = int(time.time() * 1000)
        metrics = []
        for row in record.get("scores", []):
            step = int(row["checkpoint"]["step"])
            if isinstance(row.get("average"), (int, float)):
                metrics.append(Metric("eval/average", float(row["average"]), stamp, step))
            for task, result in (row.get("tasks") or {}).items():
                if isinstance(result.get("score"), (int, float)):
                    metrics.append(Metric(f"eval/{task}", float(result["score"]), stamp, step))
        averaging = record.get("averaging") or {}
        if isinstance(averaging.get("average_score"), (int, float)):
            step = int(averaging["average_checkpoint"]["step"])
            metrics.append(Metric("eval/weight_average", float(averaging["average_score"]), stamp, step))
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start:start + 1000])
        for key, value in (("llada.selection.rule", record.get("rule")),
                           ("llada.selection.step", record["checkpoint"]["step"]),
                           ("llada.selection.checkpoint", record["checkpoint"]["hf_uri"]),
                           ("llada.selection.average", record.get("average")),
                           ("llada.selection.reason", str(record.get("reason", ""))[:4900]),
                           ("llada.suite_hash", record.get("suite_hash"))):
            if value is not None:
                client.set_tag(run_id, key, str(value))
        client.log_dict(run_id, record, "selection.json")
        plot = storage.join(self.recipe.stage_uri(name), "training.png")
        if storage.exists(plot, self.s3):
            self._log_file(run_id, plot, "")

    def finish_stage(self, name: str) -> None:
        if self.on and name in self.stage_runs:
            self._call(f"close stage {name}", lambda: self.client.set_terminated(self.stage_runs[name]))

    # ------------------------------------------------------------ the registry

    def register(self, name: str, record: dict[str, Any]) -> None:
        """Register stage ``name``'s selected checkpoint; move the alias to it if it is better."""
        if self.on and name in self.stage_runs:
            self._call("register the selected model", lambda: self._register(name, record))

    def _register(self, name: str, record: dict[str, Any]) -> None:
        client, spec = self.client, self.recipe.tracking
        model = spec.model_name or self.recipe.run_id
        source = storage.absolute(record["checkpoint"]["hf_uri"])
        if not client.search_registered_models(f"name = '{model}'"):
            client.create_registered_model(model, description="LLaDA-MoE checkpoints selected by llada runs")
        mine = [version for version in client.search_model_versions(f"name = '{model}'")
                if checkpoint_of(version) == source]
        tags = {"llada.checkpoint": source, "llada.run_uri": self.recipe.run_uri, "llada.stage": name,
                "llada.step": str(record["checkpoint"]["step"]), "llada.average": str(record.get("average")),
                "llada.suite_hash": str(record.get("suite_hash"))}
        chosen = next((row for row in record.get("scores", []) if row.get("selected")), None)
        for task, result in ((chosen or {}).get("tasks") or {}).items():
            tags[f"llada.score.{task}"] = str(result.get("score"))
        version = mine[0] if mine else self._create_version(model, source, self.stage_runs[name], tags)
        decision = self._champion_decision(model, version, record)
        client.set_model_version_tag(model, version.version, "llada.alias_decision", decision)
        client.set_tag(self.record["run_id"], "llada.registered", f"{model} version {version.version}: {decision}")
        self.say(f"[tracking] registered {model} version {version.version} ({source}): {decision}")

    def _create_version(self, model: str, source: str, run_id: str, tags: dict[str, str]) -> Any:
        """A model version whose source is the checkpoint's URI. A tracking server refuses local
        paths as sources (only its own artifact store's); the version then points to the stage's
        run and the ``llada.checkpoint`` tag keeps the path (what serving resolves)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_model_version(model, source, run_id=run_id, tags=tags)
        except MlflowException as error:
            if storage.is_remote(source) or error.error_code != "INVALID_PARAMETER_VALUE":
                raise
            return self.client.create_model_version(model, f"runs:/{run_id}/selection.json", run_id=run_id, tags=tags)

    def _champion_decision(self, model: str, version: Any, record: dict[str, Any]) -> str:
        client, alias = self.client, self.recipe.tracking.alias
        average = record.get("average")
        try:
            current = client.get_model_version_by_alias(model, alias)
        except Exception:  # no holder yet (MLflow raises for a missing alias)
            current = None
        if current is None:
            client.set_registered_model_alias(model, alias, version.version)
            return f"@{alias} set (no holder before), eval average {average}"
        if current.version == version.version:
            return f"@{alias} kept: this version holds it"
        theirs = current.tags.get("llada.average")
        if current.tags.get("llada.suite_hash") != str(record.get("suite_hash")):
            return (f"@{alias} stays on version {current.version}: it was scored by another eval suite, so the "
                    "averages do not compare")
        if theirs is None or average is None or not float(average) > float(theirs):
            return f"@{alias} stays on version {current.version}: eval average {average} does not beat its {theirs}"
        client.set_registered_model_alias(model, alias, version.version)
        return f"@{alias} moved from version {current.version} ({theirs}) to this one ({average})"

    # ------------------------------------------------------------ plumbing

    def _call(self, what: str, action: Callable[[], Any]) -> bool:
        """Run one MLflow action -> whether it ran; on failure turn tracking off, saying so once."""
        if not self.on:
            return False
        try:
            action()
            return True
        except Exception as error:  # any failure of the tracker, never of the run
            self.client = None
            message = " ".join(str(error).split())[:300]
            self.say(f"[tracking] MLflow at {self.uri} failed to {what} ({type(error).__name__}: {message}); "
                     "tracking is off for the rest of this command: the run folder keeps everything "
                     "(metrics.jsonl, scores.json, selection.json), MLflow will miss what follows")
            return False

    def _exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # deleted, or from another store
            return False

    def _write_record(self) -> None:
        storage.write_json(storage.join(self.recipe.run_uri, RECORD), self.record, self.s3)

    def _log_file(self, run_id: str, uri: str, path: str) -> None:
        with tempfile.TemporaryDirectory(prefix="llada-artifact-") as folder:
            local = Path(folder) / uri.rstrip("/").rsplit("/", 1)[-1]
            local.write_bytes(storage.read_bytes(uri, self.s3))
            self.client.log_artifact(run_id, str(local), path or None)

    def _log_tree(self, run_id: str, uri: str, path: str) -> None:
        root = uri.rstrip("/")
        for file_uri in storage.list_files(uri, self.s3):
            relative = file_uri[len(root) + 1:]
            folder = "/".join(part for part in (path, relative.rpartition("/")[0]) if part)
            self._log_file(run_id, file_uri, folder)


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"optimizer.lr": 0.0004, ...} (lists as JSON)."""
    if isinstance(values, dict):
        flat: dict[str, Any] = {}
        for key, value in values.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: json.dumps(values) if isinstance(values, list) else values}


def checkpoint_of(version: Any) -> str:
    """The checkpoint URI a registered model version stands for."""
    return version.tags.get("llada.checkpoint") or version.source


def resolve_model(model_uri: str, tracking_uri: str | None) -> tuple[str, str]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (the registered checkpoint's storage
    URI, "NAME version N"); ValueError naming what is missing."""
    name, _, rest = model_uri.removeprefix("models:/").partition("@")
    alias = rest or None
    version = None
    if not model_uri.startswith("models:/") or not name:
        raise ValueError(f"--model: {model_uri!r} is not a registry URI (models:/NAME@ALIAS or models:/NAME/VERSION)")
    if alias is None:
        name, _, version = name.partition("/")
        if not version.isdigit():
            raise ValueError(f"--model: {model_uri!r} names no alias or version (models:/NAME@ALIAS or models:/NAME/VERSION)")
    if not tracking_uri:
        raise ValueError("--model: no registry to ask: pass --tracking-uri, set MLFLOW_TRACKING_URI, or give the RECIPE "
                         "whose run registered it")
    client = mlflow_client(tracking_uri)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except Exception as error:  # MlflowException: no such model / alias / version; or the server is down
        raise ValueError(f"--model: {model_uri} is not in the registry at {tracking_uri} "
                         f"({' '.join(str(error).split())[:200]})") from None
    return checkpoint_of(found), f"{name} version {found.version}"
