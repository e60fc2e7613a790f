"""lm-evaluation-harness tasks in the eval suite (``kind: lm_eval``, jobs/evaluation/tasks.py).

A task is prepared before the model is loaded: its include path and data files are copied
locally (from s3:// when there), lm-eval's TaskManager finds it, and its dataset is read, so a
missing file or dataset fails before any model work, naming the task and what it looked for.
It is then scored by lm-eval's own evaluator (``lm_eval.simple_evaluate``) over our adapter
(jobs/evaluation/lm_eval_model.py) wrapped around the model already loaded for the suite.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jobs.evaluation.tasks import EvalError, LmEvalTask, holds_task_yaml, lm_eval_score, resolve_demo_path
from pipelines import storage
from pipelines.tokenizer import SpecialTokenIds

# Data file suffix -> the `datasets` builder that reads it.
DATA_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class PreparedLmEval:
    """An lm-eval task ready to score: the loaded ``lm_eval.api.task.Task`` (or Group)."""

    task: LmEvalTask
    lm_eval_task: Any  # an lm_eval Task, or a Group for a group of tasks (mmlu, bbh: one aggregate score)
    manager: Any  # the TaskManager that found it (lm-eval would otherwise index its whole task tree again)


def _local_file(uri: str, s3: storage.S3Settings | None, stack: contextlib.ExitStack) -> str:
    """A local path of the file ``uri`` (downloaded next to nothing else when it is remote)."""
    folder_uri, name = uri.rstrip("/").rsplit("/", 1)
    folder = stack.enter_context(storage.local_copy(folder_uri, s3, only=(name,), prefix="llada-lm-eval-data-"))
    return str(Path(folder) / name)


def _data_file_overrides(task: LmEvalTask, corpus_uri: str | None, s3: storage.S3Settings | None,
                         stack: contextlib.ExitStack) -> dict[str, Any]:
    """The task config fields that make it read ``task.data_files`` instead of its dataset."""
    files, formats = {}, set()
    for split, uri in sorted((task.data_files or {}).items()):
        resolved = resolve_demo_path(uri, corpus_uri)
        suffix = Path(storage.parse_uri(resolved).path).suffix.lower()
        if suffix not in DATA_FORMATS:
            raise EvalError(f"task {task.name!r}: data file {resolved} (split {split!r}) is not one of "
                            f"{sorted(DATA_FORMATS)}")
        if not storage.exists(resolved, s3):
            raise EvalError(f"task {task.name!r}: data file {resolved} (split {split!r}) does not exist")
        files[split] = _local_file(resolved, s3, stack)
        formats.add(DATA_FORMATS[suffix])
    if len(formats) > 1:
        raise EvalError(f"task {task.name!r}: data_files mix formats {sorted(formats)}; give one format")
    return {"dataset_path": formats.pop(), "dataset_name": None, "dataset_kwargs": {"data_files": files}}


def prepare_lm_eval(task: LmEvalTask, corpus_uri: str | None, s3: storage.S3Settings | None,
                    stack: contextlib.ExitStack) -> PreparedLmEval:
    """Find the task, point it at its data, and load its dataset (module docstring); temporary
    copies live until ``stack`` closes."""
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines would flood the console
    include = resolve_demo_path(task.include_path, corpus_uri) if task.include_path else None
    local_include = None
    if include is not None:
        if not holds_task_yaml(include, s3):
            raise EvalError(f"task {task.name!r}: include_path {include} holds no task YAML")
        local_include = stack.enter_context(storage.local_copy(include, s3, prefix="llada-lm-eval-tasks-"))
    overrides = _data_file_overrides(task, corpus_uri, s3, stack) if task.data_files else None
    # lm-eval indexes its own ~14k task YAMLs in 4-8 s; a task in the include path is
    # found without them (the demo's suite scores a dozen checkpoints).
    manager = TaskManager(include_path=local_include, include_defaults=False) if local_include else None
    if manager is None or task.task not in manager.all_tasks:
        manager = TaskManager(include_path=local_include)
    is_group = task.task in manager.all_groups
    if task.task not in manager.all_subtasks and not is_group:
        where = f"lm-eval's tasks and {include}" if include else "lm-eval's tasks"
        if task.task in manager.all_tags:
            raise EvalError(f"task {task.name!r}: {task.task!r} is an lm-eval tag (a loose set of tasks with no "
                            "aggregate score); name a task or a group")
        near = difflib.get_close_matches(task.task, manager.all_subtasks + manager.all_groups, n=3)
        raise EvalError(f"task {task.name!r}: no lm-eval task or group {task.task!r} in {where}"
                        + (f"; did you mean {near}?" if near else ""))
    spec: Any = task.task
    if task.data_files:
        if is_group:
            raise EvalError(f"task {task.name!r}: data_files replace one task's dataset, but {task.task!r} is a group "
                            "of tasks with datasets of their own; put their datasets in the Hugging Face cache")
        # The registered YAML with the data fields replaced (an inline config is not merged with the
        # registered one by lm-eval 0.4.13, so the merge is done here with its YAML loader).
        from lm_eval.tasks._yaml_loader import load_yaml

        config = load_yaml(manager.task_index[task.task].yaml_path, resolve_func=True)
        spec = {**config, "task": task.task, **overrides}
    try:
        loaded = manager.load([spec])
    except Exception as error:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFoundError)
        hint = ("" if task.data_files else "; on an offline cluster put the dataset in the Hugging Face cache "
                "(HF_DATASETS_CACHE) or give the task data_files")
        raise EvalError(f"task {task.name!r}: lm-eval {'group' if is_group else 'task'} {task.task!r} could not load "
                        f"its data ({type(error).__name__}: {error}){hint}") from error
    built = loaded["groups"][task.task] if is_group else loaded["tasks"][task.task]
    return PreparedLmEval(task=task, lm_eval_task=built, manager=manager)


def score_lm_eval(model: nn.Module, tokenizer: Any, special: SpecialTokenIds, task: LmEvalTask,
                  prepared: PreparedLmEval, generator: torch.Generator) -> dict[str, Any]:
    """Run the prepared task through ``lm_eval.simple_evaluate`` on ``model`` and normalise the
    named metric to [0, 1]; the record keeps lm-eval's sample counts and every metric it reported."""
    import lm_eval

    from jobs.evaluation.lm_eval_model import LLaDAEvalLM

    seed = generator.initial_seed() % (2 ** 31)
    device = next(model.parameters()).device
    lm = LLaDAEvalLM(model=model, tokenizer=tokenizer, device=str(device), batch_size=task.batch_size,
                     mc_num=task.num_mc_samples, mc_batch_size=task.mc_batch_size or task.num_mc_samples, seed=seed,
                     block_length=task.block_length, gen_length=task.gen_length, fast=task.fast)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[prepared.lm_eval_task], task_manager=prepared.manager, num_fewshot=task.num_fewshot,
        limit=task.max_items,
        apply_chat_template=task.chat, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, bootstrap_iters=0, log_samples=False,
        confirm_run_unsafe_code=task.allow_code_execution)
    metrics = results["results"][task.task]
    reported = [k for k, v in metrics.items() if "_stderr" not in k and "," in k and isinstance(v, (int, float))]
    if not reported:
        raise EvalError(f"task {task.name!r}: lm-eval task {task.task!r} reported no metric")
    name, _, metric_filter = (task.metric or reported[0]).partition(",")
    key = f"{name},{metric_filter or 'none'}"
    if key not in metrics:
        raise EvalError(f"task {task.name!r}: lm-eval task {task.task!r} reports no metric {task.metric!r}; it "
                        f"reports {reported} (metric,filter)")
    value = float(metrics[key])
    higher_is_better = results.get("higher_is_better", {}).get(task.task, {}).get(name)
    # A group's items are those of its tasks (each run once, as this call runs only this entry).
    per_task = results.get("n-samples", {}).values()
    counts = {field: sum(int(c.get(field, 0)) for c in per_task) for field in ("effective", "original")}
    return {"metric": key.removesuffix(",none"), "value": value, "score": lm_eval_score(name, value, higher_is_better),
            "num_items": int(counts.get("effective", 0)), "num_items_original": int(counts.get("original", 0)),
            "lm_eval_task": task.task, "lm_eval_version": lm_eval.__version__,
            "metrics": {k: float(metrics[k]) for k in reported}}
