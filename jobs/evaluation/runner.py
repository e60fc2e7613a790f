"""The eval suite on checkpoints: score records, their reuse, and evaluation as Ray tasks.

One checkpoint folder (jobs/checkpoints.py layout) gets one score record, ``scores.json``,
beside its ``hf/`` export:

    {"format": "llada-eval-scores/2",
     "checkpoint": {"uri": ".../checkpoint_000040", "hf_uri": ".../checkpoint_000040/hf", "step": 40},
     "suite_hash": "<sha256>", "suite": {...}, "sources": {task: uri},
     "tasks": {task: {"kind", "metric", "value", "score", "num_items", ..., "seconds"}},
     "average": 0.41, "normalisation": "...", "device": "cpu",
     "timings": {"load_s", "eval_s", "total_s"}, "evaluated_at": <unix time>}

``value`` is the task's raw metric (exact match, accuracy, or bits per token); ``score`` its
normalised form in [0, 1], higher = better (jobs/evaluation/tasks.py); ``average`` the unweighted mean
of the scores, which ``jobs.evaluation.selection`` compares. ``suite_hash`` covers the suite config, the
resolved data sources and the scoring version: a record with the same hash is reused, not
recomputed, so a rerun of a run evaluates only checkpoints it has not scored yet.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from typing import Any, Callable, Sequence

import torch

from jobs.checkpoints import CheckpointInfo, CheckpointRef
from jobs.evaluation.tasks import (
    SCORERS,
    EvalError,
    EvalSuiteConfig,
    LmEvalTask,
    average_score,
    load_items,
    resolve_demo_path,
    resolve_source,
    task_seed,
    task_sources,
)
from llada_core import load_model
from pipelines import storage
from pipelines.tokenizer import check_matches_config, load_tokenizer

SCORES_RECORD = "scores.json"
RECORD_FORMAT = "llada-eval-scores/2"
# Bump when the scoring of a task kind changes: old records then stop matching and are recomputed.
SCORING_VERSION = 2
NORMALISATION = ("generation: exact match; choice: accuracy; elbo: 2 ** -bits_per_token "
                 "(geometric-mean per-token probability bound); lm_eval: the named metric when a fraction, "
                 "1 / perplexity, 2 ** -bits_per_byte; average: unweighted mean of task scores")

Progress = Callable[[str], None]

__all__ = [
    "EvalError", "EvalSuiteConfig", "SCORES_RECORD", "demo_eval_suite", "evaluate_checkpoint",
    "evaluate_checkpoints_ray", "read_score_record", "score_checkpoint", "suite_hash", "write_score_record",
]


def demo_eval_suite(corpus_uri: str | None = None) -> EvalSuiteConfig:
    """A small suite over the demo corpus's held-out sets: about 10 s per checkpoint of the tiny
    preset (4.5 M parameters) on one CPU core, so a demo's dozen checkpoints take a few minutes.

    ``reading`` is the held-out generation task the demo's SFT checkpoint is judged on: a chat
    question about a passage whose scene fact never occurs in training (exact match; guessing
    the place scores 1/8); pretraining checkpoints score 0 there, SFT teaches it. Multiple choice
    on arithmetic (learnt late) and on word order (learnt early), and held-out text (the
    smoothest signal) follow every stage. ``lm_eval_counting`` is the same kind of question run
    through lm-evaluation-harness (the demo corpus's local task YAML, ``eval/lm_eval/``): a
    counting story's four possible endings, the right one by likelihood. Exact-match generation of arithmetic, counting and
    raw-prompt reading is in the corpus (``gen_arithmetic``, ``gen_counting``, ``gen_reading``
    prompts) but not in this suite: the tiny model scores 0 on them within the demo's budget (seen
    in the demo of 2026-11-22), so they would only add time. Sources are ``demo:<task>`` (resolved against the
    corpus URI given at evaluation time); pass ``corpus_uri`` to pin them to that corpus instead.
    """
    def source(task: str) -> str:
        return resolve_source(f"demo:{task}", corpus_uri) if corpus_uri else f"demo:{task}"

    def demo_path(path: str) -> str:
        return resolve_demo_path(f"demo:{path}", corpus_uri) if corpus_uri else f"demo:{path}"

    return EvalSuiteConfig.model_validate({"seed": 0, "tasks": [
        {"name": "reading", "kind": "generation", "source": source("gen_reading"), "max_items": 64,
         "chat": True, "sampling": {"gen_length": 16, "block_length": 8}, "batch_size": 64},
        {"name": "choice_arithmetic", "kind": "choice", "source": source("choice_arithmetic"), "max_items": 32,
         "num_mc_samples": 16},
        {"name": "choice_grammar", "kind": "choice", "source": source("choice_grammar"), "max_items": 16,
         "num_mc_samples": 16},
        {"name": "heldout_text", "kind": "elbo", "source": source("heldout_text"), "max_items": 16,
         "num_mc_samples": 16},
        {"name": "lm_eval_counting", "kind": "lm_eval", "task": "llada_demo_counting", "metric": "acc",
         "include_path": demo_path("lm_eval"), "data_files": {"test": demo_path("lm_eval/llada_demo_counting.jsonl")},
         "max_items": 16, "num_mc_samples": 16},
    ]})


def suite_hash(suite: EvalSuiteConfig, corpus_uri: str | None = None) -> str:
    """sha256 of the suite config, its resolved sources and the scoring version."""
    payload: dict[str, Any] = {"scoring_version": SCORING_VERSION, "suite": suite.model_dump(mode="json"),
                               "sources": {task.name: task_sources(task, corpus_uri) for task in suite.tasks}}
    if any(isinstance(task, LmEvalTask) for task in suite.tasks):
        from importlib.metadata import version

        payload["lm_eval_version"] = version("lm_eval")  # its task definitions and metrics change by version
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _prepare(task: Any, corpus_uri: str | None, s3: storage.S3Settings | None, stack: contextlib.ExitStack) -> Any:
    """A task's items (our kinds) or its loaded lm-eval task, read and checked before the model."""
    if isinstance(task, LmEvalTask):
        from jobs.evaluation.lm_eval_tasks import prepare_lm_eval

        return prepare_lm_eval(task, corpus_uri, s3, stack)
    return load_items(task, resolve_source(task.source, corpus_uri), s3)


def _scorer(kind: str) -> Callable[..., dict[str, Any]]:
    if kind == "lm_eval":
        from jobs.evaluation.lm_eval_tasks import score_lm_eval

        return score_lm_eval
    return SCORERS[kind]


def evaluate_checkpoint(hf_uri: str, suite: EvalSuiteConfig, corpus_uri: str | None = None,
                        s3: storage.S3Settings | None = None, *, ref: CheckpointRef | None = None,
                        device: str | torch.device | None = None,
                        progress: Progress | None = None) -> dict[str, Any]:
    """Run every task of ``suite`` on the model + tokenizer in ``hf_uri`` (local or s3; any
    HF-layout folder, the released checkpoint's too) and return its score record (module
    docstring); ``ref`` names the checkpoint when it is one of a run's. Writes nothing; see
    :func:`score_checkpoint`.

    ``device`` defaults to CUDA when present, else CPU. Data sources are read (and checked)
    before the model is loaded.
    """
    started = time.perf_counter()
    sources = {task.name: task_sources(task, corpus_uri) for task in suite.tasks}
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with contextlib.ExitStack() as stack:
        items = {task.name: _prepare(task, corpus_uri, s3, stack) for task in suite.tasks}
        with storage.local_copy(hf_uri, s3, prefix="llada-eval-") as local:
            model = load_model(local, device=device).eval()
            tokenizer = load_tokenizer(local)
        special = check_matches_config(tokenizer, model.config)
        loaded = time.perf_counter()
        tasks: dict[str, dict[str, Any]] = {}
        for task in suite.tasks:
            task_started = time.perf_counter()
            generator = torch.Generator(device=device).manual_seed(task_seed(suite.seed, task.name))
            result = _scorer(task.kind)(model, tokenizer, special, task, items[task.name], generator)
            tasks[task.name] = {"kind": task.kind, **result, "seconds": round(time.perf_counter() - task_started, 3)}
            if progress:
                progress(f"{hf_uri}: {task.name} {result['metric']}={result['value']:.4f} "
                         f"score={result['score']:.4f}")
    finished = time.perf_counter()
    return {
        "format": RECORD_FORMAT, "checkpoint": ref.to_json() if ref else None, "hf_uri": hf_uri,
        "suite_hash": suite_hash(suite, corpus_uri), "suite": suite.model_dump(mode="json"), "sources": sources,
        "tasks": tasks, "average": average_score([task["score"] for task in tasks.values()]),
        "normalisation": NORMALISATION, "device": str(device),
        "timings": {"load_s": round(loaded - started, 3), "eval_s": round(finished - loaded, 3),
                    "total_s": round(finished - started, 3)},
        "evaluated_at": time.time(),
    }


def write_score_record(checkpoint_uri: str, record: dict[str, Any], s3: storage.S3Settings | None = None) -> str:
    """Write ``record`` as ``<checkpoint_uri>/scores.json`` (beside hf/); returns that URI."""
    uri = storage.join(checkpoint_uri, SCORES_RECORD)
    storage.write_json(uri, record, s3)
    return uri


def read_score_record(checkpoint_uri: str, s3: storage.S3Settings | None = None) -> dict[str, Any] | None:
    """The checkpoint's score record, or None when it has none."""
    uri = storage.join(checkpoint_uri, SCORES_RECORD)
    return storage.read_json(uri, s3) if storage.exists(uri, s3) else None


def score_checkpoint(ref: CheckpointRef, suite: EvalSuiteConfig, corpus_uri: str | None = None,
                     s3: storage.S3Settings | None = None, *, device: str | torch.device | None = None,
                     progress: Progress | None = None) -> dict[str, Any]:
    """The checkpoint's score record: the stored one when its suite hash matches, else evaluate
    ``ref.hf_uri`` and write scores.json into ``ref.uri``. The returned dict has an extra
    ``reused`` flag (not stored)."""
    existing = read_score_record(ref.uri, s3)
    if existing is not None and existing.get("suite_hash") == suite_hash(suite, corpus_uri):
        return {**existing, "reused": True}
    record = evaluate_checkpoint(ref.hf_uri, suite, corpus_uri, s3, ref=ref, device=device, progress=progress)
    write_score_record(ref.uri, record, s3)
    return {**record, "reused": False}


def _score_in_task(ref_json: dict[str, Any], suite_json: dict[str, Any], corpus_uri: str | None,
                   s3: storage.S3Settings | None, record: bool = True) -> dict[str, Any]:
    """The body of one Ray task (model loaded inside it, on its GPU when it was given one)."""
    ref, suite = CheckpointRef.from_json(ref_json), EvalSuiteConfig.model_validate(suite_json)
    if not record:
        return {**evaluate_checkpoint(ref.hf_uri, suite, corpus_uri, s3, ref=ref), "reused": False}
    return score_checkpoint(ref, suite, corpus_uri, s3)


def evaluate_checkpoints_ray(checkpoint_infos: Sequence[CheckpointInfo], suite: EvalSuiteConfig,
                             corpus_uri: str | None = None, s3: storage.S3Settings | None = None,
                             num_gpus_per_task: float | None = None, num_cpus_per_task: float = 1.0,
                             progress: Progress | None = None, record: bool = True) -> list[dict[str, Any]]:
    """Score each checkpoint as one Ray task; returns the records in ``checkpoint_infos`` order.

    Checkpoints whose scores.json matches the suite are not re-evaluated (no task is started).
    Each task loads the model itself (local or downloaded from S3), evaluates, and writes the
    checkpoint's scores.json. ``num_gpus_per_task`` None means 1 when the cluster has GPUs, else
    0 (CPU tasks of ``num_cpus_per_task``). ``record`` False scores every checkpoint and writes
    nothing (ad hoc suites: the recorded scores select checkpoints). Ray must be initialised by
    the caller.
    """
    import ray

    if num_gpus_per_task is None:
        num_gpus_per_task = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    expected = suite_hash(suite, corpus_uri)
    records: list[dict[str, Any] | None] = [None] * len(checkpoint_infos)
    pending: dict[Any, int] = {}
    remote = ray.remote(_score_in_task).options(num_cpus=num_cpus_per_task, num_gpus=num_gpus_per_task,
                                                name="llada-eval-checkpoint")
    suite_json = suite.model_dump(mode="json")
    for index, info in enumerate(checkpoint_infos):
        existing = read_score_record(info.uri, s3) if record else None
        if existing is not None and existing.get("suite_hash") == expected:
            records[index] = {**existing, "reused": True}
            continue
        pending[remote.remote(info.ref.to_json(), suite_json, corpus_uri, s3, record)] = index
    if progress:
        progress(f"eval: {len(pending)} checkpoint(s) to score, {len(checkpoint_infos) - len(pending)} already scored")
    while pending:
        [ready], _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(ready)
        try:
            records[index] = ray.get(ready)
        except Exception as error:
            for ref in pending:
                ray.cancel(ref)
            cause = getattr(error, "cause", None) or error
            raise EvalError(f"evaluating {checkpoint_infos[index].uri} failed: {type(cause).__name__}: {cause}") from error
        if progress:
            record = records[index]
            name = record["checkpoint"]["uri"].rstrip("/").rsplit("/", 1)[-1]  # checkpoint_000040, top-000020-000040
            progress(f"eval: {name} average {record['average']:.4f} ({record['timings']['total_s']:.1f} s)")
    return [record for record in records if record is not None]
