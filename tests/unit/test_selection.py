"""Checkpoint selection on plain score records (no I/O, no Ray)."""

from __future__ import annotations

import json

import pytest

from jobs.checkpoints import CheckpointRef
from jobs.evaluation.selection import SelectionDecision, select_checkpoint, selection_record

STAGE = "s3://bucket/run/pretrain2/checkpoints"


def ref(step: int, slash: str = "") -> dict:
    return {"uri": f"{STAGE}/checkpoint_{step:06d}{slash}", "hf_uri": f"{STAGE}/checkpoint_{step:06d}/hf", "step": step}


def record(step: int, average: float | None, suite_hash: str | None = "h1", **tasks: float) -> dict:
    entry = {"checkpoint": ref(step), "suite_hash": suite_hash,
             "tasks": {name: {"kind": "choice", "metric": "accuracy", "value": score, "score": score,
                              "num_items": 8} for name, score in tasks.items()}}
    if average is not None:
        entry["average"] = average
    return entry


def test_best_average_wins_whatever_the_order():
    records = [record(30, 0.40, mc=0.4), record(10, 0.20, mc=0.2), record(20, 0.55, mc=0.55), record(40, 0.50, mc=0.5)]
    decision = select_checkpoint(records, "best_eval_average")
    assert isinstance(decision, SelectionDecision)
    assert decision.checkpoint == CheckpointRef(f"{STAGE}/checkpoint_000020", f"{STAGE}/checkpoint_000020/hf", 20)
    assert decision.average == 0.55
    assert decision.rule == "best_eval_average" and decision.suite_hash == "h1"
    assert "step 20" in decision.reason and "0.5500" in decision.reason and "runner-up step 40" in decision.reason
    assert [row["checkpoint"]["step"] for row in decision.scores] == [10, 20, 30, 40]  # the table is oldest first
    assert [row["selected"] for row in decision.scores] == [False, True, False, False]
    assert decision.scores[0]["tasks"] == {"mc": {"metric": "accuracy", "value": 0.2, "score": 0.2}}


def test_last_rule_takes_the_highest_step_even_without_scores():
    decision = select_checkpoint([record(20, 0.9), record(40, 0.1), record(30, 0.5)], "last")
    assert (decision.checkpoint.step, decision.average) == (40, 0.1)
    assert decision.reason.startswith("last:") and "step 40" in decision.reason
    unscored = [{"checkpoint": ref(5)}, {"checkpoint": ref(9, slash="/")}]
    decision = select_checkpoint(unscored, "last")
    assert decision.checkpoint.uri == f"{STAGE}/checkpoint_000009"  # trailing slash dropped
    assert decision.average is None and decision.suite_hash is None


def test_tie_goes_to_the_later_step():
    records = [record(10, 0.5), record(30, 0.5), record(20, 0.5), record(5, 0.1)]
    decision = select_checkpoint(records, "best_eval_average")
    assert decision.checkpoint.step == 30
    assert "tied with step 20" in decision.reason and "later step wins" in decision.reason
    assert select_checkpoint(list(reversed(records)), "best_eval_average").checkpoint.step == 30


def test_single_record():
    decision = select_checkpoint([record(7, 0.3)], "best_eval_average")
    assert decision.checkpoint.step == 7 and "of 1 checkpoint" in decision.reason


@pytest.mark.parametrize("records, rule, message", [
    ([], "best_eval_average", "records: no score records"),
    ([], "last", "records: no score records"),
    ([record(10, 0.5)], "best", "rule: 'best' is not one of"),
    ([record(10, 0.5), record(20, None)], "best_eval_average", r"records\[1\].average: .*checkpoint_000020 has no eval average"),
    ([record(10, float("nan"))], "best_eval_average", r"records\[0\].average"),
    ([record(10, 0.5), {**record(20, 0.6), "checkpoint": {**ref(20), "step": None}}], "last",
     r"records\[1\].checkpoint.step"),
    ([record(10, 0.5), {**record(20, 0.6), "checkpoint": {**ref(20), "step": True}}], "last",
     r"records\[1\].checkpoint.step"),
    ([{"average": 0.1}], "last", r"records\[0\].checkpoint: missing"),
    ([{"checkpoint": {"uri": "x", "step": 3}}], "last", r"records\[0\].checkpoint: .*needs the folder `uri` and its `hf_uri`"),
    ([record(10, 0.5), record(10, 0.6)], "best_eval_average", r"records\[1\].checkpoint.uri: .* also appears in records\[0\]"),
    ([record(10, 0.5), {**record(11, 0.6), "checkpoint": {**ref(11), "step": 10}}], "last",
     r"records\[1\].checkpoint.step: 10 also appears"),
    ([record(10, 0.5, "h1"), record(20, 0.6, "h2")], "best_eval_average", "2 different eval suites"),
    (["not a record"], "last", r"records\[0\]: expected a score record"),
    ({"checkpoint": ref(1)}, "last", "records: expected a list"),
])
def test_bad_input_gives_clear_errors(records, rule, message):
    with pytest.raises(ValueError, match=message):
        select_checkpoint(records, rule)


def test_last_rule_does_not_care_about_suites():
    assert select_checkpoint([record(10, 0.5, "h1"), record(20, 0.6, "h2")], "last").checkpoint.step == 20


def test_selection_record_is_json_with_the_checkpoint_reference_and_every_score():
    records = [record(10, 0.2, a=0.1, b=0.3), record(20, 0.6, a=0.5, b=0.7)]
    decision = select_checkpoint(records, "best_eval_average")
    saved = selection_record(decision)
    assert json.loads(json.dumps(saved)) == saved
    assert saved["checkpoint"] == ref(20)  # the writer's reference, carried as is
    assert (saved["rule"], saved["average"], saved["suite_hash"]) == ("best_eval_average", 0.6, "h1")
    assert saved["reason"] == decision.reason
    assert [(row["checkpoint"]["step"], row["average"], row["selected"]) for row in saved["scores"]] == \
        [(10, 0.2, False), (20, 0.6, True)]
    assert saved["scores"][0]["tasks"]["b"]["score"] == 0.3
    # the decision is not changed by editing the record
    saved["scores"][0]["average"] = 99
    saved["scores"][0]["checkpoint"]["step"] = 99
    assert decision.scores[0]["average"] == 0.2 and decision.scores[0]["checkpoint"]["step"] == 10


def test_selection_does_not_mutate_its_input():
    records = [record(10, 0.2), record(20, 0.6)]
    snapshot = json.dumps(records, sort_keys=True)
    select_checkpoint(records, "best_eval_average")
    assert json.dumps(records, sort_keys=True) == snapshot
