"""Resume under what production does, on a local Ray cluster with the tiny model (one worker,
12 steps, a checkpoint every 2, the newest 2 kept): an interruption after rotation has deleted
checkpoints, a crash between a checkpoint's upload and its completion record, a newest
checkpoint whose DeepSpeed state does not load, and a checkpoint write that fails as on a full
disk. Each case failed before the platform chose the resume point itself."""

from __future__ import annotations

import glob
import os
import tempfile

import pytest

from conftest import stage_config  # tests/integration/conftest.py
from jobs import checkpoints as ckpt
from jobs.training.stage import prepare_resume, read_history, run_stage

pytestmark = pytest.mark.integration


def resumable(stage_data, output: str, **overrides):
    return stage_config(stage_data, output, checkpoint_every=2, keep_last=2,
                        scaling={"num_workers": 1, "max_failures": 0}, **overrides)


def steps_run(output: str) -> list[int]:
    return [row["step"] for row in read_history(output) if "loss" in row]


def test_a_stage_interrupted_after_rotation_and_again_before_its_last_record_resumes_and_finishes(
        stage_data, tmp_path):
    output = str(tmp_path / "pretrain1")
    with pytest.raises(Exception, match="fault injection"):  # killed before step 9: rotation deleted 2, 4
        run_stage(resumable(stage_data, output, fault_injection={"step": 9}))
    assert [info.step for info in ckpt.list_checkpoints(output)] == [6, 8]

    with pytest.raises(Exception, match="fault injection"):  # resumes from 8, then dies before 12's record
        run_stage(resumable(stage_data, output, fault_injection={"step": 12, "point": "before_completion_record"}))
    assert [info.step for info in ckpt.list_checkpoints(output)] == [8, 10]
    assert [ref.step for ref in ckpt.incomplete_checkpoints(output)] == [12]

    notes: list[str] = []
    result = run_stage(resumable(stage_data, output), on_step=lambda row: notes.append(row.get("note", "")))
    assert "[pretrain1] discarding checkpoint step 12: it has no completion record (its save was interrupted)" in notes
    assert "[pretrain1] resuming from step 10" in notes
    assert [info.step for info in result.checkpoints] == [10, 12]
    assert all(ckpt.verify(info) is None for info in result.checkpoints)
    assert result.checkpoints[-1].record["fingerprint"]  # every record carries the config's fingerprint
    history = read_history(output)
    assert [row["resumed_from"] for row in history if "resumed_from" in row] == [8, 10]
    assert steps_run(output) == list(range(1, 13))  # every step once, in the order of an uninterrupted run


def test_a_newest_checkpoint_that_does_not_load_falls_back_to_the_previous_one(stage_data, tmp_path):
    output = str(tmp_path / "pretrain1")
    run_stage(resumable(stage_data, output, num_steps=6))
    newest = ckpt.list_checkpoints(output)[-1]
    assert newest.step == 6
    [state_file] = glob.glob(os.path.join(newest.uri, "deepspeed", "deepspeed", "mp_rank_00_model_states.pt"))
    size = os.path.getsize(state_file)
    with open(state_file, "wb") as handle:  # same size, so its record still verifies: only loading tells
        handle.write(b"\0" * size)
    notes: list[str] = []
    result = run_stage(resumable(stage_data, output, num_steps=6), on_step=lambda row: notes.append(row.get("note", "")))
    fallback = [note for note in notes if note.startswith("[pretrain1] resuming from step 4; not from newer")]
    assert fallback and "step 6: its DeepSpeed state does not load" in fallback[0], notes
    assert [row["resumed_from"] for row in read_history(output) if "resumed_from" in row] == [4]
    assert result.checkpoints[-1].step == 6 and ckpt.verify(result.checkpoints[-1]) is None  # written again


def test_a_checkpoint_write_that_fails_names_the_error_leaks_nothing_and_is_discarded_later(stage_data, tmp_path):
    output = str(tmp_path / "pretrain1")
    staging = set(glob.glob(os.path.join(tempfile.gettempdir(), "llada-ckpt-*")))
    with pytest.raises(Exception, match=r"checkpoint step 4 of stage pretrain1 could not be saved .*No space left "
                                        r"on device.*staging folder was removed"):
        run_stage(resumable(stage_data, output, fault_injection={"step": 4, "point": "checkpoint_upload"}))
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "llada-ckpt-*"))) <= staging, "a staging folder leaked"
    assert [ref.step for ref in ckpt.incomplete_checkpoints(output)] == [4]
    notes: list[dict] = []
    prepare_resume(resumable(stage_data, output), None, notes.append)
    assert notes[0]["note"].startswith("[pretrain1] discarding checkpoint step 4")
    assert notes[-1]["note"] == "[pretrain1] resuming from step 2"
    assert ckpt.incomplete_checkpoints(output) == []
