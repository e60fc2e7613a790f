"""Checkpoint selection: score records in, a decision out. Pure functions: no I/O, no Ray.

Rules (a stage's ``init_from.rule`` in the recipe):

- ``best_eval_average``: the highest ``average`` of the eval suite (jobs/evaluation/runner.py score
  records). Ties (exactly equal averages) go to the LATER step: at the same score, the
  checkpoint that has seen more data. Every record must carry an average, and all must come
  from the same suite (equal ``suite_hash`` where recorded): averages of different suites do not
  compare.
- ``last``: the highest step; averages are shown when present but not needed.

The DAG reads the score records, calls :func:`select_checkpoint`, and writes
:func:`selection_record` as the stage's ``selection.json`` (jobs.checkpoints.SELECTION_RECORD),
whose ``checkpoint_uri`` (the checkpoint folder) rotation never deletes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

Rule = Literal["best_eval_average", "last"]
RULES: tuple[str, ...] = ("best_eval_average", "last")
SELECTION_FORMAT = "llada-selection/1"


@dataclass(frozen=True)
class SelectionDecision:
    """The chosen checkpoint and why; ``scores`` is one row per candidate, oldest first:
    ``{"checkpoint_uri", "step", "average", "selected", "tasks": {name: {"metric", "value", "score"}}}``."""

    checkpoint_uri: str
    step: int
    rule: str
    reason: str
    average: float | None
    suite_hash: str | None
    scores: tuple[dict[str, Any], ...]


def _checked_rows(records: Sequence[dict[str, Any]], need_average: bool) -> list[dict[str, Any]]:
    """Validate the records and reduce each to a score-table row (sorted by step)."""
    rows, seen_uris, seen_steps = [], {}, {}
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"records[{index}]: expected a score record (dict), got {type(record).__name__}")
        uri = record.get("checkpoint_uri")
        if not isinstance(uri, str) or not uri:
            raise ValueError(f"records[{index}].checkpoint_uri: missing; a score record names its checkpoint folder")
        uri = uri.rstrip("/")
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"records[{index}].step: expected a non-negative int for {uri}, got {step!r}")
        average = record.get("average")
        has_average = isinstance(average, (int, float)) and not isinstance(average, bool) and math.isfinite(average)
        if need_average and not has_average:
            raise ValueError(f"records[{index}].average: {uri} has no eval average ({average!r}); score it with "
                             "the eval suite (jobs.evaluation.runner) before selecting by best_eval_average")
        for key, value, seen in (("checkpoint_uri", uri, seen_uris), ("step", step, seen_steps)):
            if value in seen:
                raise ValueError(f"records[{index}].{key}: {value!r} also appears in records[{seen[value]}]")
            seen[value] = index
        tasks = {name: {field: task.get(field) for field in ("metric", "value", "score")}
                 for name, task in (record.get("tasks") or {}).items()}
        rows.append({"checkpoint_uri": uri, "step": step, "average": float(average) if has_average else None,
                     "suite_hash": record.get("suite_hash"), "tasks": tasks})
    return sorted(rows, key=lambda row: row["step"])


def select_checkpoint(records: Sequence[dict[str, Any]], rule: Rule) -> SelectionDecision:
    """Pick one checkpoint from its score records by ``rule`` (module docstring).

    ``records``: dicts with at least ``checkpoint_uri`` (the checkpoint folder) and ``step``, and
    ``average`` (+ ``suite_hash``, ``tasks``) for ``best_eval_average``. Raises ValueError for
    an unknown rule, no records, or a record that the rule cannot use.
    """
    if rule not in RULES:
        raise ValueError(f"rule: {rule!r} is not one of {list(RULES)}")
    if isinstance(records, (str, bytes, dict)) or not isinstance(records, Sequence):
        raise ValueError(f"records: expected a list of score records, got {type(records).__name__}")
    if not records:
        raise ValueError(f"records: no score records to select from (rule {rule}); the stage has no complete "
                         "checkpoint, or none was evaluated")
    rows = _checked_rows(records, need_average=rule == "best_eval_average")
    hashes = sorted({row["suite_hash"] for row in rows if row["suite_hash"] is not None})
    if rule == "best_eval_average":
        if len(hashes) > 1:
            raise ValueError(f"records: scored by {len(hashes)} different eval suites (suite_hash "
                             f"{', '.join(h[:12] for h in hashes)}); re-evaluate them with one suite")
        chosen = max(rows, key=lambda row: (row["average"], row["step"]))
        reason = _best_reason(chosen, rows)
    else:
        chosen = rows[-1]
        reason = f"last: the latest of {len(rows)} checkpoint(s), step {chosen['step']}"
        if chosen["average"] is not None:
            reason += f" (eval average {chosen['average']:.4f})"
    table = tuple({**row, "selected": row is chosen} for row in rows)
    return SelectionDecision(checkpoint_uri=chosen["checkpoint_uri"], step=chosen["step"], rule=rule,
                             reason=reason, average=chosen["average"],
                             suite_hash=hashes[0] if len(hashes) == 1 else None, scores=table)


def _best_reason(chosen: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    reason = (f"best_eval_average: step {chosen['step']} has the highest eval average "
              f"{chosen['average']:.4f} of {len(rows)} checkpoint(s)")
    others = [row for row in rows if row is not chosen]
    if not others:
        return reason
    runner_up = max(others, key=lambda row: (row["average"], row["step"]))
    if runner_up["average"] == chosen["average"]:
        return reason + f"; tied with step {runner_up['step']}, the later step wins"
    return reason + f"; runner-up step {runner_up['step']} at {runner_up['average']:.4f}"


def selection_record(decision: SelectionDecision) -> dict[str, Any]:
    """The JSON the DAG writes as the stage's ``selection.json``: the chosen checkpoint folder
    (``checkpoint_uri``, protected from rotation) and its ``hf_uri``, the rule and reason, and
    every candidate's scores."""
    return {
        "format": SELECTION_FORMAT,
        "rule": decision.rule,
        "checkpoint_uri": decision.checkpoint_uri,
        "hf_uri": f"{decision.checkpoint_uri}/hf",
        "step": decision.step,
        "average": decision.average,
        "reason": decision.reason,
        "suite_hash": decision.suite_hash,
        "scores": [dict(row) for row in decision.scores],
    }
