"""Checkpoint selection: score records in, a decision out. Pure functions: no I/O, no Ray.

Rules (each stage's ``select`` in the recipe):

- ``best_eval_average``: the highest ``average`` of the eval suite (jobs/evaluation/runner.py score
  records). Ties (exactly equal averages) go to the LATER step: at the same score, the
  checkpoint that has seen more data. Every record must carry an average, and all must come
  from the same suite (equal ``suite_hash`` where recorded): averages of different suites do not
  compare.
- ``last``: the highest step; averages are shown when present but not needed.
- ``average_top_k``: the weights of the ``k`` checkpoints with the best eval averages are
  averaged into a checkpoint of their own (jobs/evaluation/averaging.py), scored by the same
  suite, and selected only when its average is at least the best single checkpoint's
  (:func:`averaging_selection_record`); otherwise that single checkpoint is.

The DAG reads the score records, calls :func:`select_checkpoint`, and writes
:func:`selection_record` as the stage's ``selection.json`` (jobs.checkpoints.SELECTION_RECORD),
whose ``checkpoint`` (a :class:`~jobs.checkpoints.CheckpointRef`) rotation never deletes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from jobs.checkpoints import CheckpointRef

Rule = Literal["best_eval_average", "last"]
RULES: tuple[str, ...] = ("best_eval_average", "last")  # the rules select_checkpoint applies by itself
AVERAGE_RULE = "average_top_k"
SELECTION_FORMAT = "llada-selection/2"


@dataclass(frozen=True)
class SelectionDecision:
    """The chosen checkpoint and why; ``scores`` is one row per candidate, oldest first:
    ``{"checkpoint": {uri, hf_uri, step}, "average", "suite_hash", "selected",
    "tasks": {name: {"metric", "value", "score"}}}``."""

    checkpoint: CheckpointRef
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
        if record.get("checkpoint") is None:
            raise ValueError(f"records[{index}].checkpoint: missing; a score record names its checkpoint "
                             "({uri, hf_uri, step})")
        ref = CheckpointRef.from_json(record["checkpoint"], where=f"records[{index}].checkpoint")
        average = record.get("average")
        has_average = isinstance(average, (int, float)) and not isinstance(average, bool) and math.isfinite(average)
        if need_average and not has_average:
            raise ValueError(f"records[{index}].average: {ref.uri} has no eval average ({average!r}); score it with "
                             "the eval suite (jobs.evaluation.runner) before selecting by best_eval_average")
        for key, value, seen in (("checkpoint.uri", ref.uri, seen_uris), ("checkpoint.step", ref.step, seen_steps)):
            if value in seen:
                raise ValueError(f"records[{index}].{key}: {value!r} also appears in records[{seen[value]}]")
            seen[value] = index
        tasks = {name: {field: task.get(field) for field in ("metric", "value", "score")}
                 for name, task in (record.get("tasks") or {}).items()}
        rows.append({"checkpoint": ref, "average": float(average) if has_average else None,
                     "suite_hash": record.get("suite_hash"), "tasks": tasks})
    return sorted(rows, key=lambda row: row["checkpoint"].step)


def select_checkpoint(records: Sequence[dict[str, Any]], rule: Rule) -> SelectionDecision:
    """Pick one checkpoint from its score records by ``rule`` (module docstring).

    ``records``: dicts with at least ``checkpoint`` (a CheckpointRef's JSON), and ``average``
    (+ ``suite_hash``, ``tasks``) for ``best_eval_average``. Raises ValueError for an unknown
    rule, no records, or a record that the rule cannot use.
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
        chosen = max(rows, key=lambda row: (row["average"], row["checkpoint"].step))
        reason = _best_reason(chosen, rows)
    else:
        chosen = rows[-1]
        reason = f"last: the latest of {len(rows)} checkpoint(s), step {chosen['checkpoint'].step}"
        if chosen["average"] is not None:
            reason += f" (eval average {chosen['average']:.4f})"
    table = tuple({**row, "checkpoint": row["checkpoint"].to_json(), "selected": row is chosen} for row in rows)
    return SelectionDecision(checkpoint=chosen["checkpoint"], rule=rule, reason=reason, average=chosen["average"],
                             suite_hash=hashes[0] if len(hashes) == 1 else None, scores=table)


def _best_reason(chosen: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    reason = (f"best_eval_average: step {chosen['checkpoint'].step} has the highest eval average "
              f"{chosen['average']:.4f} of {len(rows)} checkpoint(s)")
    others = [row for row in rows if row is not chosen]
    if not others:
        return reason
    runner_up = max(others, key=lambda row: (row["average"], row["checkpoint"].step))
    if runner_up["average"] == chosen["average"]:
        return reason + f"; tied with step {runner_up['checkpoint'].step}, the later step wins"
    return reason + f"; runner-up step {runner_up['checkpoint'].step} at {runner_up['average']:.4f}"


def selection_record(decision: SelectionDecision) -> dict[str, Any]:
    """The JSON the DAG writes as the stage's ``selection.json``: the chosen ``checkpoint``
    (protected from rotation), the rule and reason, and every candidate's scores."""
    return {
        "format": SELECTION_FORMAT,
        "rule": decision.rule,
        "checkpoint": decision.checkpoint.to_json(),
        "average": decision.average,
        "reason": decision.reason,
        "suite_hash": decision.suite_hash,
        "scores": [{**row, "checkpoint": dict(row["checkpoint"]), "tasks": dict(row["tasks"])}
                   for row in decision.scores],
    }


def top_k(records: Sequence[dict[str, Any]], k: int) -> list[CheckpointRef]:
    """The ``k`` checkpoints with the best eval averages (ties to the later step), best first."""
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    rows = _checked_rows(records, need_average=True)
    ranked = sorted(rows, key=lambda row: (row["average"], row["checkpoint"].step), reverse=True)
    return [row["checkpoint"] for row in ranked[:k]]


def averaging_selection_record(single: SelectionDecision, average_record: dict[str, Any] | None,
                               members: Sequence[CheckpointRef], k: int) -> dict[str, Any]:
    """The selection record of ``average_top_k``: ``single`` is the best_eval_average decision over
    the stage's checkpoints, ``average_record`` the score record of the weight average of
    ``members`` (None when there were fewer than two checkpoints to average). The average wins
    when its eval average is at least the single checkpoint's; ``averaging`` says which won and
    by how much."""
    record = selection_record(single)
    record["rule"] = AVERAGE_RULE
    if average_record is None:
        record["reason"] = (f"{AVERAGE_RULE}: only {len(members)} checkpoint(s), nothing to average; "
                            + single.reason)
        record["averaging"] = {"k": k, "members": [ref.to_json() for ref in members], "winner": "single"}
        return record
    average_ref = CheckpointRef.from_json(average_record.get("checkpoint"), where="average_record.checkpoint")
    average = average_record.get("average")
    if isinstance(average, bool) or not isinstance(average, (int, float)) or not math.isfinite(average):
        raise ValueError(f"average_record.average: {average!r} is not an eval average")
    if single.suite_hash is not None and average_record.get("suite_hash") != single.suite_hash:
        raise ValueError("average_record.suite_hash: the average was scored by another eval suite than the "
                         "checkpoints it averages; averages of different suites do not compare")
    best = float(single.average)  # best_eval_average always has one
    margin = float(average) - best
    wins = margin >= 0
    steps = ", ".join(str(ref.step) for ref in members)
    record["checkpoint"] = (average_ref if wins else single.checkpoint).to_json()
    record["average"] = float(average) if wins else best
    record["reason"] = (f"{AVERAGE_RULE}: the weight average of steps [{steps}] scores {average:.4f} against "
                        f"{best:.4f} for the best single checkpoint (step {single.checkpoint.step}), margin "
                        f"{margin:+.4f}: the {'average' if wins else 'single checkpoint'} is selected")
    record["averaging"] = {
        "k": k, "members": [ref.to_json() for ref in members], "average_checkpoint": average_ref.to_json(),
        "average_score": float(average), "best_single": single.checkpoint.to_json(), "best_single_score": best,
        "margin": margin, "winner": "average" if wins else "single",
        "tasks": {name: {field: task.get(field) for field in ("metric", "value", "score")}
                  for name, task in (average_record.get("tasks") or {}).items()},
    }
    return record
