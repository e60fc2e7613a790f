"""The stage order as a function (pipelines/mixture.py) and the reader of units (pipelines/reader.py)
on small shards written here, without Ray: planning, proportions per window, passes without
repeats, units read from a position, workers that split the order, SFT turn sampling, the
cursor, packing arithmetic and worker resources."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llada.cli import build_parser
from pipelines.mixture import (DomainShards, MixtureSpec, StagePlan, domain_rows, largest_remainder, plan_stage,
                               unit_rows, unit_slots)
from pipelines.pack import dialog_pieces, pack_pretrain
from pipelines.reader import (DataCursor, DataError, clear_row_group_cache, read_unit, train_worker_resources,
                              read_tasks, worker_pieces)


def fake_index(rows: dict[str, list[int]]) -> dict[str, DomainShards]:
    return {d: DomainShards([f"shards/{d}/{i:05d}.parquet" for i in range(len(sizes))], np.asarray(sizes))
            for d, sizes in rows.items()}


def fake_manifest(rows: dict[str, list[int]], seq_len: int = 64, kind: str = "pretrain") -> dict:
    return {"seq_len": seq_len, "row_group_rows": 8, "domains": {d: {"kind": kind} for d in rows},
            "tokenizer": {"eos": 0}}


def plan_of(rows: dict[str, list[int]], weights: dict[str, float], budget_rows: int = 1000, seed: int = 3,
            unit: int = 64, kind: str = "pretrain", seq_len: int = 64) -> tuple[StagePlan, dict[str, DomainShards]]:
    index = fake_index(rows)
    spec = MixtureSpec(weights=weights, token_budget=budget_rows * seq_len, seed=seed)
    return plan_stage("/packed", fake_manifest(rows, seq_len, kind), index, spec, unit_rows=unit), index


def test_largest_remainder_sums_exactly_and_stays_within_one() -> None:
    weights = {"text": 0.6, "math": 0.2, "code": 0.2}
    for total in (1, 7, 100, 999):
        counts = largest_remainder(weights, total)
        assert sum(counts.values()) == total
        for domain, weight in weights.items():
            assert abs(counts[domain] - weight * total) < 1


def test_a_plan_is_small_and_says_the_budget_the_composition_and_the_passes() -> None:
    plan, _ = plan_of({"text": [50, 50], "math": [30], "code": [10]}, {"text": 3, "math": 1, "code": 1},
                      budget_rows=500)
    assert plan.num_sequences == 500 and plan.composition == {"code": 13, "math": 13, "text": 38}
    assert plan.passes["code"] == pytest.approx(500 / 64 * 13 / 10)  # a small domain repeats, and says so
    assert StagePlan.from_json(plan.to_json()) == plan and len(str(plan.to_json())) < 1000


def test_plan_errors_name_the_problem() -> None:
    rows = {"text": [10], "math": [10]}
    with pytest.raises(ValueError, match=r"weights.code: no such domain .* \['math', 'text'\]"):
        plan_stage("/p", fake_manifest(rows), fake_index(rows), MixtureSpec(weights={"code": 1.0}, token_budget=6400))
    with pytest.raises(ValueError, match="token_budget: 10 is less than one sequence of 64"):
        plan_stage("/p", fake_manifest(rows), fake_index(rows), MixtureSpec(weights={"text": 1.0}, token_budget=10))
    with pytest.raises(ValueError, match="weights.text: must be > 0"):
        MixtureSpec(weights={"text": 0.0}, token_budget=10)
    mixed = fake_manifest(rows)
    mixed["domains"]["math"] = {"kind": "sft"}
    with pytest.raises(ValueError, match="mixes pretraining and SFT"):
        plan_stage("/p", mixed, fake_index(rows), MixtureSpec(weights={"text": 1.0, "math": 1.0}, token_budget=6400))


def test_every_window_of_100k_rows_keeps_each_domains_share_within_2_points() -> None:
    plan, _ = plan_of({"text": [4096] * 4, "math": [4096], "code": [4096]}, {"text": 0.7, "math": 0.2, "code": 0.1},
                      unit=4096)
    domain_of = np.concatenate([unit_slots(plan, u)[1] for u in range(80)])  # 327,680 rows
    names = unit_slots(plan, 0)[0]
    for start in range(0, len(domain_of) - 100_000, 7_777):
        window = domain_of[start:start + 100_000]
        for index, name in enumerate(names):
            share = float((window == index).mean())
            assert abs(share - plan.weights[name]) < 0.02, (start, name, share)


def test_a_pass_visits_every_row_of_a_domain_once_and_the_next_pass_in_another_order() -> None:
    plan, index = plan_of({"text": [20, 13, 7]}, {"text": 1.0})
    shard, row = domain_rows(plan, index["text"], "text", 0, 80)
    first = list(zip(shard[:40], row[:40]))
    second = list(zip(shard[40:], row[40:]))
    assert len(set(first)) == 40 == len(set(second)) and set(first) == set(second)
    assert first != second
    again = domain_rows(plan, index["text"], "text", 0, 80)
    assert np.array_equal(again[0], shard) and np.array_equal(again[1], row)  # a function of the position
    tail = domain_rows(plan, index["text"], "text", 33, 20)  # any start: the same rows
    assert np.array_equal(tail[0], shard[33:53]) and np.array_equal(tail[1], row[33:53])
    other, _ = plan_of({"text": [20, 13, 7]}, {"text": 1.0}, seed=4)
    assert not np.array_equal(domain_rows(other, index["text"], "text", 0, 40)[1], row[:40])


def write_shards(folder, rows: dict[str, list[int]], seq_len: int = 8, sft: bool = False) -> dict[str, DomainShards]:
    """Shards whose rows say who they are: input_ids[r] = [shard_code, row, row, ...]."""
    index = fake_index(rows)
    for d, shards in index.items():
        for code, (path, count) in enumerate(zip(shards.paths, shards.rows)):
            ident = [1000 * (sorted(index).index(d) + 1) + code]
            if sft:
                dialogs = [ident + [r] * 10 for r in range(count)]  # 11 tokens: answers at [3, 6) and [8, 11)
                table = pa.table({"input_ids": pa.array(dialogs, pa.list_(pa.int32())),
                                  "num_tokens": pa.array([12] * count, pa.int32()),
                                  "turn_starts": pa.array([[3, 8]] * count, pa.list_(pa.int32())),
                                  "turn_ends": pa.array([[6, 11]] * count, pa.list_(pa.int32())),
                                  "domain": pa.array([d] * count)})
            else:
                ids = [ident + [r] * (seq_len - 1) for r in range(count)]
                table = pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())),
                                  "num_tokens": pa.array([seq_len] * count, pa.int32()), "domain": pa.array([d] * count)})
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            pq.write_table(table, buffer, row_group_size=8)
            target.write_bytes(buffer.getvalue())
    return index


def test_a_unit_read_from_a_position_is_the_tail_of_the_whole_unit_and_reads_only_what_it_needs(tmp_path) -> None:
    rows = {"text": [40, 40, 40], "math": [24]}
    index = write_shards(tmp_path, rows)
    plan = plan_stage(str(tmp_path), fake_manifest(rows, seq_len=8), index,
                      MixtureSpec(weights={"text": 3, "math": 1}, token_budget=8 * 400, seed=1), unit_rows=32)
    whole = read_unit(plan, index, unit=5)
    clear_row_group_cache()  # as a freshly resumed worker's reader
    stats: dict[str, int] = {}
    tail = read_unit(plan, index, unit=5, start=29, stats=stats)
    for name in whole:
        assert np.array_equal(tail[name], whole[name][29:]), name
    assert stats["row_groups_read"] <= 3 and stats["rows_read"] <= 3 * 8  # 3 rows: at most 3 row groups
    assert list(whole["position"]) == list(range(5 * 32, 6 * 32))
    # Each row is the (shard, row) the order names.
    for domain, mine, shard_ids, row_ids in unit_rows(plan, index, 5):
        code = 1000 * (sorted(index).index(domain) + 1) + shard_ids
        assert np.array_equal(whole["input_ids"][mine, 0], code) and np.array_equal(whole["input_ids"][mine, 1], row_ids)


def test_a_resumed_worker_reads_one_micro_batch_first_then_the_rest_of_its_order(tmp_path) -> None:
    rows = {"text": [40, 40, 40], "math": [24]}
    index = write_shards(tmp_path, rows)
    plan = plan_stage(str(tmp_path), fake_manifest(rows, seq_len=8), index,
                      MixtureSpec(weights={"text": 3, "math": 1}, token_budget=8 * 400, seed=2), unit_rows=32)
    cursor = DataCursor(world_size=2, batch_size=4, rows_consumed=32 + 12)  # its unit 1 done, 12 rows into unit 3
    pieces = worker_pieces(plan, rank=1, world=2, cursor=cursor, num_rows=60)
    assert pieces == [(3, 12, 16), (3, 16, 32), (5, 0, 32), (7, 0, 32)]  # worker 1 of 2 reads units 1, 3, 5, ...
    clear_row_group_cache()
    stats: dict[str, int] = {}
    head = read_unit(plan, index, *pieces[0], stats=stats)
    assert len(head["position"]) == 4 and stats["rows_read"] <= 4 * 8  # 4 rows: at most 4 row groups
    resumed = np.concatenate([read_unit(plan, index, *piece)["position"] for piece in pieces])
    uninterrupted = np.concatenate([read_unit(plan, index, unit)["position"] for unit in (1, 3, 5, 7)])
    assert np.array_equal(resumed, uninterrupted[44:])
    with pytest.raises(ValueError, match=r"outside \[0, 32\)"):
        read_unit(plan, index, 3, 30, 40)
    # Read tasks: the micro-batch alone (the first batch waits for it only), then the rest of its
    # unit, then whole units grouped by bytes.
    assert read_tasks(plan, pieces)[:2] == [[(3, 12, 16)], [(3, 16, 32)]]
    fresh = worker_pieces(plan, 0, 1, DataCursor(world_size=1, batch_size=4), 32 * 5)
    assert read_tasks(plan, fresh) == [[(0, 0, 32)], [(1, 0, 32), (2, 0, 32), (3, 0, 32), (4, 0, 32)]]


def test_workers_split_the_stage_order_and_together_read_it_once(tmp_path) -> None:
    rows = {"text": [40, 40], "math": [24]}
    index = write_shards(tmp_path, rows)
    plan = plan_stage(str(tmp_path), fake_manifest(rows, seq_len=8), index,
                      MixtureSpec(weights={"text": 0.7, "math": 0.3}, token_budget=8 * 400), unit_rows=16)
    one = [read_unit(plan, index, unit)["position"] for unit in range(6)]
    for world in (2, 3):
        per_worker = [[read_unit(plan, index, rank + world * i)["position"] for i in range(6 // world)]
                      for rank in range(world)]
        together = sorted(np.concatenate([p for rank in per_worker for p in rank]).tolist())
        assert together == np.concatenate(one).tolist()  # the same rows, each once, whatever the split


def test_sft_rows_take_one_sampled_turn_with_the_earlier_turns_as_prompt(tmp_path) -> None:
    rows = {"chat": [30]}
    index = write_shards(tmp_path, rows, sft=True)
    plan = plan_stage(str(tmp_path), fake_manifest(rows, seq_len=16, kind="sft"), index,
                      MixtureSpec(weights={"chat": 1.0}, token_budget=16 * 200), unit_rows=30)
    batch = read_unit(plan, index, unit=0)
    assert batch["input_ids"].shape == (30, 16)
    lengths = sorted(set(batch["prompt_length"].tolist()))
    assert lengths == [3, 8]  # both turns are drawn; the second keeps the first answer in its prompt
    for ids, prompt, count in zip(batch["input_ids"], batch["prompt_length"], batch["num_tokens"]):
        end = 6 if prompt == 3 else 11
        assert count == end + 1 and (ids[end:] == 0).all()  # the answer, then EOS to seq_len
    again = read_unit(plan, index, unit=0)
    assert np.array_equal(again["prompt_length"], batch["prompt_length"])  # seeded by position
    next_pass = read_unit(plan, index, unit=1)  # the same dialogs again, their turns drawn afresh
    assert not np.array_equal(next_pass["prompt_length"], batch["prompt_length"])


def test_a_dialog_is_tokenised_in_pieces_that_join_to_its_chat_text() -> None:
    from llada_core.tokens import format_chat

    chat = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    pieces = dialog_pieces(chat)
    assert "".join(text for text, _ in pieces) == format_chat(chat, add_generation_prompt=False)
    assert [text for text, answer in pieces if answer] == ["a1<|role_end|>", "a2<|role_end|>"]


def test_pack_pretrain_separates_documents_with_eos_and_pads_the_tail() -> None:
    rows, counts = pack_pretrain([[5, 6, 7], [8, 9], [10]], seq_len=4, eos_id=0)
    assert rows.tolist() == [[5, 6, 7, 0], [8, 9, 0, 10], [0, 0, 0, 0]]
    assert counts.tolist() == [4, 4, 1]
    empty_rows, empty_counts = pack_pretrain([], seq_len=4, eos_id=0)
    assert empty_rows.shape == (0, 4) and empty_counts.shape == (0,)


def test_cursor_counts_rows_and_refuses_a_different_split() -> None:
    cursor = DataCursor(world_size=2, batch_size=8, rows_consumed=24)
    assert cursor.advanced(8).rows_consumed == 32
    with pytest.raises(DataError, match="world_size=2, batch_size=8; resuming with world_size=4"):
        cursor.check_compatible(world_size=4, batch_size=8)


def test_worker_resources_leave_cpu_for_ray_data_and_fail_fast() -> None:
    assert train_worker_resources(num_workers=2, cluster_cpus=2) == {"CPU": 0.5}
    assert train_worker_resources(num_workers=2, cluster_cpus=16) == {"CPU": 1.0}
    assert train_worker_resources(num_workers=3, cluster_cpus=2) == {"CPU": 0.33}
    with pytest.raises(DataError, match="8 training workers cannot run on 1 CPUs while keeping 1 CPU"):
        train_worker_resources(num_workers=8, cluster_cpus=1)
    with pytest.raises(DataError, match="num_workers: must be >= 1"):
        train_worker_resources(num_workers=0, cluster_cpus=2)


def test_cli_help_and_flag_errors(capsys) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["data", "prepare", "--help"])
    assert exit_info.value.code == 0
    assert "--output" in capsys.readouterr().out
    from llada.cli import main

    with pytest.raises(SystemExit, match="--output is required"):
        main(["data", "prepare"])
    with pytest.raises(SystemExit, match="--source: expected NAME=VALUE"):
        main(["data", "prepare", "--output", "/tmp/x", "--source", "nodomain"])
    with pytest.raises(SystemExit, match="tokenizer_uri: required with your own sources"):
        main(["data", "prepare", "--output", "/tmp/x", "--source", "web=/tmp/x/*.jsonl"])
