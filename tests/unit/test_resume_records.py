"""What resume relies on, without Ray: completion records that list every file with its size,
verification and the resume order, incomplete checkpoints found, recipe edits named and refused
unless accepted or restarted, and the one-driver lease on a local disk and on S3 (moto)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from jobs import checkpoints as ckpt
from jobs import lease as leases
from jobs.edits import StageChanged, archive_stage, check_changes, restart_closure
from jobs.stage_config import SAFE_TO_CHANGE, StageConfig, changed_fields, is_safe_to_change
from pipelines import storage


def write_checkpoint(stage: Path, step: int, complete: bool = True) -> ckpt.CheckpointRef:
    ref = ckpt.CheckpointRef.at(str(stage), step)
    folder = Path(ref.uri)
    (folder / "deepspeed" / "deepspeed").mkdir(parents=True)
    (folder / "deepspeed" / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"m" * (100 + step))
    (folder / "hf").mkdir()
    (folder / "hf" / "model.safetensors").write_bytes(b"w" * 50)
    (folder / "stage_config.json").write_text("{}")
    if complete:
        ckpt.write_completion_record(ref, {"step": step}, fingerprint="f00")
    return ref


def test_a_completion_record_lists_every_file_with_its_size(tmp_path):
    ref = write_checkpoint(tmp_path, 4)
    record = json.loads((Path(ref.uri) / ckpt.COMPLETE_RECORD).read_text())
    assert record["checkpoint"] == ref.to_json() and record["fingerprint"] == "f00"
    assert record["files"] == {"deepspeed/deepspeed/mp_rank_00_model_states.pt": 104, "hf/model.safetensors": 50,
                               "stage_config.json": 2}


def test_resume_takes_the_newest_checkpoint_whose_files_verify_and_names_the_others(tmp_path):
    for step in (2, 4, 6):
        write_checkpoint(tmp_path, step)
    write_checkpoint(tmp_path, 8, complete=False)  # a save that crashed before its record
    newest = Path(ckpt.CheckpointRef.at(str(tmp_path), 6).uri)
    (newest / "deepspeed" / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"m" * 10)  # truncated
    (Path(ckpt.CheckpointRef.at(str(tmp_path), 4).uri) / "hf" / "model.safetensors").unlink()  # a lost file
    usable, skipped = ckpt.resume_candidates(str(tmp_path))
    assert [info.step for info in usable] == [2]
    assert [(info.step, why) for info, why in skipped] == [
        (6, "deepspeed/deepspeed/mp_rank_00_model_states.pt is 10 bytes, its completion record says 106 "
            "(truncated or rewritten)"),
        (4, "1 of its 3 files are missing (e.g. hf/model.safetensors)")]
    assert [ref.step for ref in ckpt.incomplete_checkpoints(str(tmp_path))] == [8]


def test_records_written_before_file_lists_are_taken_as_they_are(tmp_path):
    ref = write_checkpoint(tmp_path, 2, complete=False)
    storage.write_json(storage.join(ref.uri, ckpt.COMPLETE_RECORD), {"step": 2, "metrics": {}})
    [info] = ckpt.list_checkpoints(str(tmp_path))
    assert ckpt.verify(info) is None


# ------------------------------------------------------------------ recipe edits


def stage_config(tmp_path: Path, **overrides) -> StageConfig:
    base = dict(name="pretrain1", kind="pretrain", model={"preset": "tiny"}, data_uri=str(tmp_path / "d"),
                output_uri=str(tmp_path / "o"), num_steps=10, micro_batch_size=4, checkpoint_every=2,
                optimizer={"lr": 3e-3})
    return StageConfig.model_validate({**base, **overrides})


def test_changed_fields_are_named_and_only_the_safe_ones_can_be_accepted(tmp_path):
    old = stage_config(tmp_path).model_dump(mode="json")
    lr = stage_config(tmp_path, optimizer={"lr": 1e-3})
    with pytest.raises(StageChanged, match=r"optimizer.lr: 0.003 -> 0.001.*cannot change in the middle of a stage: "
                                           r"rerun with --restart-stage pretrain1"):
        check_changes(lr, old, accept_changes=True, progress=print)
    cadence = stage_config(tmp_path, checkpoint_every=5, keep_last=1, scaling={"torch_threads": 2})
    with pytest.raises(StageChanged, match="safe to change mid-stage: rerun with --accept-changes"):
        check_changes(cadence, old, accept_changes=False, progress=print)
    said: list[str] = []
    assert check_changes(cadence, old, accept_changes=True, progress=said.append) == [
        "checkpoint_every", "keep_last", "scaling.torch_threads"]
    assert "--accept-changes" in said[0]
    assert check_changes(stage_config(tmp_path), old, accept_changes=False, progress=print) == []
    assert check_changes(lr, None, accept_changes=False, progress=print) == []  # no checkpoint yet
    assert changed_fields({"a": {"b": 1}}, {"a": {"b": 2}, "c": 3}) == ["a.b", "c"]
    assert is_safe_to_change("fault_injection.step") and not is_safe_to_change("scaling.num_workers")
    assert "num_steps" not in SAFE_TO_CHANGE  # the LR schedule depends on it


def test_a_restart_takes_every_stage_that_starts_from_it_and_archives_folders(tmp_path):
    from llada.recipe import load_recipe

    recipe = load_recipe(str(Path(__file__).resolve().parents[2] / "jobs" / "recipes" / "tiny-cpu.yaml"),
                         [f"storage_uri={tmp_path}"])
    assert restart_closure(recipe, ["anneal1"]) == ["anneal1", "anneal2", "sft"]
    assert restart_closure(recipe, ["sft", "pretrain2"]) == ["pretrain2", "anneal1", "anneal2", "sft"]
    with pytest.raises(ValueError, match="no stage named 'nope'"):
        restart_closure(recipe, ["nope"])
    assert archive_stage(recipe, "sft", None) is None  # nothing trained yet
    write_checkpoint(Path(recipe.stage_uri("sft")), 4)
    archived = archive_stage(recipe, "sft", None)
    assert archived.startswith(recipe.stage_uri("sft") + ".archived-")
    assert not os.path.exists(recipe.stage_uri("sft")) and ckpt.list_checkpoints(archived)[0].step == 4


# ------------------------------------------------------------------ one driver per run


def test_local_lease_refuses_a_second_driver_and_takes_over_a_stale_one(tmp_path):
    run = str(tmp_path / "run")
    lease = leases.acquire(run, "llada run")
    with pytest.raises(leases.LeaseHeld, match=rf"pid {os.getpid()} on .*llada run.*--break-lease"):
        leases.acquire(run, "llada run")
    assert leases.heartbeat(lease)
    said: list[str] = []
    second = leases.acquire(run, "llada demo", break_lease=True, say=said.append)
    assert "broken on request" in said[0] and not leases.heartbeat(lease)  # the first driver lost it
    leases.release(lease)  # not ours any more: the second driver's lease stays
    assert json.loads(Path(run, leases.LEASE_FILE).read_text())["id"] == second.holder["id"]
    leases.release(second)
    assert not Path(run, leases.LEASE_FILE).exists()


def test_a_lease_whose_holder_is_gone_is_taken_over_with_a_line_naming_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = {"id": "x", "host": "elsewhere", "pid": 1, "command": "llada run", "started_at": 0,
            "heartbeat_at": time.time() - leases.EXPIRY_S - 5}
    (run / leases.LEASE_FILE).write_text(json.dumps(dead))
    said: list[str] = []
    lease = leases.acquire(str(run), "llada run", say=said.append)
    assert "pid 1 on elsewhere" in said[0] and "last heartbeat" in said[0]
    gone = {**dead, "host": lease.holder["host"], "pid": 2**22 + 7, "heartbeat_at": time.time()}  # no such pid
    assert "no longer runs on this host" in leases.is_stale(gone)
    assert leases.is_stale({**gone, "pid": os.getpid()}) is None


def test_s3_lease_is_a_conditional_put_so_exactly_one_driver_holds_it(s3_server):
    run = f"{s3_server.bucket('lease')}/runs/r"
    first = leases.acquire(run, "llada run", s3_server.settings)
    with pytest.raises(leases.LeaseHeld, match="being run by another driver"):
        leases.acquire(run, "llada run", s3_server.settings)
    assert leases.heartbeat(first, s3_server.settings)
    stale = {**first.holder, "heartbeat_at": time.time() - leases.EXPIRY_S - 1}
    storage.write_bytes(first.uri, json.dumps(stale).encode(), s3_server.settings)
    said: list[str] = []
    second = leases.acquire(run, "llada run", s3_server.settings, say=said.append)
    assert "taking over" in said[0]
    assert not leases.heartbeat(first, s3_server.settings)  # the old holder's conditional write fails
    with leases.run_lease(f"{run}-other", "llada run", s3_server.settings, heartbeat_s=0.05) as held:
        time.sleep(0.3)
        body, _ = storage.read_with_etag(held.uri, s3_server.settings)
        assert json.loads(body)["heartbeat_at"] > held.holder["started_at"]
    assert not storage.exists(held.uri, s3_server.settings)  # released
    leases.release(second, s3_server.settings)
    assert not storage.exists(second.uri, s3_server.settings)
