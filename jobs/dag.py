"""The stage DAG: data -> pretrain1 -> pretrain2 -> anneal1 -> anneal2 -> SFT, without a
workflow engine (Ray Workflows is gone). Each stage trains (Ray Train), every checkpoint is
scored (eval suite, Ray tasks), the selection rule picks one, and the next stage starts from its
weights with a fresh optimizer and schedule.

Records per stage, in ``stages/{name}/``: ``selection.json`` (the decision and every score),
``averages/`` (the weight averages ``select: average_top_k`` made, jobs/evaluation/averaging.py)
and ``done.json`` (written last, with the stage's fingerprint). A rerun of the same recipe skips
stages whose done record matches; a stage without one resumes from its latest checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from jobs import checkpoints as ckpt
from jobs.evaluation.tasks import EvalSuiteConfig
from jobs.edits import archive_stage, check_changes, restart_closure, stored_stage_config
from jobs.recipe import DEFAULT_AVERAGE_K, RunRecipe
from jobs.stage_config import StageConfig
from jobs.tracking import Tracker
from pipelines import storage

DONE_RECORD = "done.json"


@dataclass(frozen=True)
class StageOutcome:
    name: str
    status: str  # "trained" | "skipped"
    selection: dict[str, Any]
    seconds: float


def prepare_data(recipe: RunRecipe, s3: storage.S3Settings | None, progress: Callable[[str], None]) -> dict[str, Any]:
    """Corpus, tokenizer, packed shards per (kind, seq_len) and one plan per stage (reused when already there)."""
    from pipelines.prepare import PrepareConfig, prepare

    config = PrepareConfig(**dict(recipe.data), output_uri=recipe.data_uri(),
                           stages={stage.name: stage.mixture for stage in recipe.stages},
                           stage_seq_lens={stage.name: stage.seq_len for stage in recipe.stages if stage.seq_len})
    return prepare(config, s3, progress=progress)


def eval_suite(recipe: RunRecipe) -> EvalSuiteConfig:
    from jobs.evaluation.runner import demo_eval_suite

    return demo_eval_suite() if recipe.eval == "demo" else recipe.eval


def corpus_uri(recipe: RunRecipe) -> str:
    return storage.join(recipe.data_uri(), "corpus")


def check_eval_sources(recipe: RunRecipe, s3: storage.S3Settings | None) -> None:
    """Before any work: every eval file the suite reads exists (``demo:`` sets are written by
    the data step, so only your own files are checked). ValueError names each missing one."""
    from jobs.evaluation.tasks import missing_paths

    missing = [f"{task.name}: {path}" for task in eval_suite(recipe).tasks for path in missing_paths(task, s3)]
    if missing:
        raise ValueError(f"eval.tasks: {len(missing)} source(s) do not exist: {'; '.join(missing)}")


def check_cluster_fits(recipe: RunRecipe) -> None:
    """Before any work: every stage's workers fit the cluster as it is (skipped on an autoscaling
    cluster, which grows to a stage when it starts: jobs/training/scale_up.py)."""
    import ray

    from jobs.training import scale_up
    from jobs.training.stage import worker_resources

    if scale_up.timeout_from_env() is not None or not ray.is_initialized():
        return
    cluster = ray.cluster_resources()
    for stage in recipe.stages:
        worker_resources(recipe.stage_config(stage.name, data_uri="-", output_uri="-"), cluster)


def check_stage_sizes(recipe: RunRecipe, prepared: dict[str, Any]) -> None:
    """Right after data preparation: each stage has at least one batch for every worker."""
    from pipelines.reader import DataError

    for stage in recipe.stages:
        written = prepared.get("stages", {}).get(stage.name)
        workers = (stage.scaling or recipe.scaling).num_workers
        if written is not None and written["num_sequences"] < stage.micro_batch_size * workers:
            raise DataError(f"stages.{stage.name}: its data has {written['num_sequences']} sequences, fewer than one "
                            f"batch of micro_batch_size {stage.micro_batch_size} x {workers} worker(s); raise "
                            "mixture.token_budget or lower micro_batch_size")


def selected_checkpoint(recipe: RunRecipe, name: str, s3: storage.S3Settings | None) -> ckpt.CheckpointRef:
    """The checkpoint stage ``name`` selected; ValueError when it has not selected one yet."""
    uri = storage.join(recipe.stage_uri(name), ckpt.SELECTION_RECORD)
    if not storage.exists(uri, s3):
        raise ValueError(f"stage {name!r} has no selection record at {uri}: run that stage first")
    return ckpt.read_selection_ref(uri, s3)


def score_and_select(recipe: RunRecipe, name: str, s3: storage.S3Settings | None,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score every complete checkpoint of the stage, apply its rule, write selection.json."""
    from jobs.evaluation.runner import evaluate_checkpoints_ray
    from jobs.evaluation.selection import AVERAGE_RULE, select_checkpoint, selection_record

    checkpoints = ckpt.list_checkpoints(recipe.stage_uri(name), s3)
    if not checkpoints:
        raise RuntimeError(f"stage {name!r} finished without a complete checkpoint under {recipe.stage_uri(name)}")
    if recipe.stage(name).select == "last":
        # Only the latest can be chosen, so only it is scored: at the 7B recipe's size an eval
        # of every checkpoint of a 10T-token stage would cost GPU-days for nothing. `llada eval
        # --stage NAME` scores the others on demand.
        checkpoints = checkpoints[-1:]
    relay = None if progress is None else (lambda line: progress(f"[{name}] {line}"))
    suite = eval_suite(recipe)
    records = evaluate_checkpoints_ray(checkpoints, suite, corpus_uri(recipe), s3, progress=relay)
    stage = recipe.stage(name)
    if stage.select == AVERAGE_RULE:
        record = _select_by_averaging(recipe, name, records, suite, s3, relay)
    else:
        record = selection_record(select_checkpoint(records, stage.select))
    storage.write_json(storage.join(recipe.stage_uri(name), ckpt.SELECTION_RECORD), record, s3)
    return record


def _select_by_averaging(recipe: RunRecipe, name: str, records: list[dict[str, Any]], suite: EvalSuiteConfig,
                         s3: storage.S3Settings | None, progress: Callable[[str], None] | None) -> dict[str, Any]:
    """``average_top_k``: average the best k checkpoints' weights, score the average with the
    same suite, and keep it only when it scores at least the best single checkpoint."""
    from jobs.evaluation.averaging import write_average
    from jobs.evaluation.runner import evaluate_checkpoints_ray
    from jobs.evaluation.selection import averaging_selection_record, select_checkpoint, top_k

    k = recipe.stage(name).average_k or DEFAULT_AVERAGE_K
    single = select_checkpoint(records, "best_eval_average")
    members = top_k(records, k)
    if len(members) < 2:
        return averaging_selection_record(single, None, members, k)
    if progress:
        progress(f"averaging the weights of steps {[ref.step for ref in members]}")
    average = write_average(recipe.stage_uri(name), members, s3)
    [average_record] = evaluate_checkpoints_ray([average], suite, corpus_uri(recipe), s3, progress=progress)
    return averaging_selection_record(single, average_record, members, k)


def stage_config_for(recipe: RunRecipe, name: str, tokenizer_uri: str, s3: storage.S3Settings | None) -> StageConfig:
    """The stage's resolved config; it starts from the checkpoint its ``init_from`` stage selected."""
    stage = recipe.stage(name)
    init_uri = selected_checkpoint(recipe, stage.init_from, s3).hf_uri if stage.init_from is not None else None
    return recipe.stage_config(name, data_uri=storage.join(recipe.data_uri(), "stages", name),
                               output_uri=recipe.stage_uri(name), tokenizer_uri=tokenizer_uri, init_from=init_uri)


def run_one_stage(recipe: RunRecipe, config: StageConfig, s3: storage.S3Settings | None,
                  on_step: Callable[[dict[str, Any]], None] | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    from jobs.training.stage import run_stage

    storage.remove_tree(storage.join(config.output_uri, ckpt.SELECTION_RECORD), s3)  # stale if retraining
    run_stage(config, s3, on_step=on_step)
    return score_and_select(recipe, config.name, s3, progress)


def run_recipe(recipe: RunRecipe, s3: storage.S3Settings | None = None, only_stage: str | None = None,
               progress: Callable[[str], None] = print,
               on_step: Callable[[dict[str, Any]], None] | None = None,
               restart_stages: list[str] | None = None, accept_changes: bool = False) -> list[StageOutcome]:
    """Run the recipe's stages in order (or just ``only_stage``, whose inputs must be done).
    ``progress`` gets the DAG's lines, ``on_step`` each training step's row. A stage whose
    recipe changed since it trained is refused unless it is in ``restart_stages`` (archived and
    trained again, with every stage that starts from it) or ``accept_changes`` covers the
    change (jobs/edits.py)."""
    restart = restart_closure(recipe, restart_stages or [])
    if only_stage is not None:
        init_from = recipe.stage(only_stage).init_from  # a clear error for an unknown name
        if init_from is not None:
            selected_checkpoint(recipe, init_from, s3)  # its input must be done: fail before any work
    check_eval_sources(recipe, s3)
    check_cluster_fits(recipe)
    storage.write_json(storage.join(recipe.run_uri, "recipe.json"), recipe.model_dump(mode="json"), s3)
    tracker = Tracker(recipe, s3, progress)
    tracker.start()
    try:
        outcomes = _run_stages(recipe, s3, only_stage, progress, on_step, restart, accept_changes, tracker)
    except BaseException:
        tracker.finish(failed=True)
        raise
    tracker.finish()
    return outcomes


def _run_stages(recipe: RunRecipe, s3: storage.S3Settings | None, only_stage: str | None,
                progress: Callable[[str], None], on_step: Callable[[dict[str, Any]], None] | None,
                restart: list[str], accept_changes: bool, tracker: Tracker) -> list[StageOutcome]:
    prepared = prepare_data(recipe, s3, progress)
    check_stage_sizes(recipe, prepared)
    outcomes = []
    for stage in recipe.stages:
        if only_stage is not None and stage.name != only_stage:
            continue
        started = time.perf_counter()
        if stage.name in restart and (archived := archive_stage(recipe, stage.name, s3)):
            progress(f"[dag] {stage.name}: restarting; the earlier attempt is archived at {archived}")
        done = _read_record(recipe, stage.name, s3)
        if done is not None and done.get("fingerprint") == recipe.fingerprint(stage.name):
            progress(f"[dag] {stage.name}: done earlier, skipped (selected step {_step(done['selection'])})")
            outcomes.append(StageOutcome(stage.name, "skipped", done["selection"], 0.0))
            continue
        config = stage_config_for(recipe, stage.name, prepared["tokenizer_uri"], s3)
        check_changes(config, stored_stage_config(config.output_uri, s3), accept_changes, progress)
        if done is not None:  # only accepted, safe fields changed: nothing to train again
            _write_done(recipe, stage.name, done["selection"], s3)
            progress(f"[dag] {stage.name}: done earlier, skipped (selected step {_step(done['selection'])})")
            outcomes.append(StageOutcome(stage.name, "skipped", done["selection"], 0.0))
            continue
        progress(f"[dag] {stage.name}: training ({stage.kind})")
        tracker.start_stage(stage.name, config)
        selection = run_one_stage(recipe, config, s3, _tracked(on_step, tracker, stage.name), progress)
        progress(f"[dag] {stage.name}: selected {selection['checkpoint']['uri']} ({selection['reason']}; "
                 f"stage took {time.perf_counter() - started:.0f} s)")
        tracker.log_selection(stage.name, selection)
        if stage.name == recipe.stages[-1].name:
            tracker.register(stage.name, selection)
        tracker.finish_stage(stage.name)
        _write_done(recipe, stage.name, selection, s3)
        outcomes.append(StageOutcome(stage.name, "trained", selection, time.perf_counter() - started))
    return outcomes


def _tracked(on_step: Callable[[dict[str, Any]], None] | None, tracker: Tracker,
             name: str) -> Callable[[dict[str, Any]], None] | None:
    """``on_step`` that also logs each training row to the stage's MLflow run."""
    if not tracker.on:
        return on_step

    def both(row: dict[str, Any]) -> None:
        tracker.log_step(name, row)
        if on_step is not None:
            on_step(row)

    return both


def _write_done(recipe: RunRecipe, name: str, selection: dict[str, Any], s3: storage.S3Settings | None) -> None:
    storage.write_json(storage.join(recipe.stage_uri(name), DONE_RECORD), {
        "stage": name, "fingerprint": recipe.fingerprint(name), "selection": selection, "finished_at": time.time(),
    }, s3)


def _read_record(recipe: RunRecipe, name: str, s3: storage.S3Settings | None) -> dict[str, Any] | None:
    uri = storage.join(recipe.stage_uri(name), DONE_RECORD)
    return storage.read_json(uri, s3) if storage.exists(uri, s3) else None


def run_status(recipe: RunRecipe, s3: storage.S3Settings | None = None) -> list[dict[str, Any]]:
    """Per stage: state, checkpoints with their eval averages, and the selection (for `llada status`)."""
    rows = []
    for stage in recipe.stages:
        stage_uri = recipe.stage_uri(stage.name)
        checkpoints = []
        for info in ckpt.list_checkpoints(stage_uri, s3, include_incomplete=True):
            scores_uri = storage.join(info.uri, "scores.json")
            scores = storage.read_json(scores_uri, s3) if storage.exists(scores_uri, s3) else None
            checkpoints.append({**info.ref.to_json(), "complete": bool(info.record),
                                "eval_average": scores.get("average") if scores else None})
        selection_uri = storage.join(stage_uri, ckpt.SELECTION_RECORD)
        selected = ckpt.read_selection_ref(selection_uri, s3) if storage.exists(selection_uri, s3) else None
        record = _read_record(recipe, stage.name, s3)
        if record is not None:
            state = "done" if record.get("fingerprint") == recipe.fingerprint(stage.name) else "done, recipe changed"
        else:
            state = "in progress" if checkpoints else "not started"
        rows.append({"stage": stage.name, "kind": stage.kind, "state": state, "checkpoints": checkpoints,
                     "selected": selected.to_json() if selected else None, "selection_rule": stage.select})
    return rows


def _step(selection: dict[str, Any]) -> Any:
    """The selected step of a selection record (this format or llada-selection/1)."""
    return selection["checkpoint"]["step"] if "checkpoint" in selection else selection.get("step")
