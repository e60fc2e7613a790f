"""Mixture planning, packing arithmetic, the data cursor and worker resources: pure functions,
no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from llada.cli import build_parser
from pipelines.mixture import MixtureSpec, largest_remainder, plan_mixture
from pipelines.pack import pack_pretrain, sft_examples
from pipelines.reader import DataCursor, DataError, train_worker_resources


def fake_manifest(rows: dict[str, list[int]], seq_len: int = 64, kind: str = "pretrain") -> dict:
    shards = [{"path": f"shards/{d}/{i}.parquet", "domain": d, "kind": kind, "rows": n, "tokens": n * seq_len}
              for d, sizes in rows.items() for i, n in enumerate(sizes)]
    return {"seq_len": seq_len, "shards": shards, "domains": {d: {"kind": kind} for d in rows}, "job_key": "k"}


def test_largest_remainder_sums_exactly_and_stays_within_one() -> None:
    weights = {"text": 0.6, "math": 0.2, "code": 0.2}
    for total in (1, 7, 100, 999):
        counts = largest_remainder(weights, total)
        assert sum(counts.values()) == total
        for domain, weight in weights.items():
            assert abs(counts[domain] - weight * total) < 1


def test_plan_honours_weights_budget_and_seed() -> None:
    manifest = fake_manifest({"text": [50, 50], "math": [30], "code": [10]})
    spec = MixtureSpec(weights={"text": 3, "math": 1, "code": 1}, token_budget=64 * 500 + 63, seed=4)
    plan = plan_mixture(manifest, spec)
    assert plan["num_sequences"] == 500  # floor(budget / seq_len): never over the budget
    domains = np.asarray(plan["domain"])
    assert {d: int((domains == d).sum()) for d in ("text", "math", "code")} == {"text": 300, "math": 100, "code": 100}
    assert plan["epochs"]["code"] == 10.0  # a small domain repeats, and says so
    # Every pass over a small domain uses each of its rows once before repeating any.
    code_rows = [(s, r) for s, r, d in zip(plan["shard"], plan["row"], plan["domain"]) if d == "code"]
    assert len(set(code_rows)) == 10
    # The first 100 samples already follow the weights within a few rows (shuffled together).
    assert abs(int((domains[:100] == "text").sum()) - 60) < 15
    again = plan_mixture(manifest, spec)
    assert np.array_equal(again["shard"], plan["shard"]) and np.array_equal(again["row"], plan["row"])
    other = plan_mixture(manifest, spec.model_copy(update={"seed": 5}))
    assert not np.array_equal(other["row"], plan["row"])


def test_plan_errors_name_the_problem() -> None:
    manifest = fake_manifest({"text": [10], "math": [10]})
    with pytest.raises(ValueError, match=r"weights.code: no such domain .* \['math', 'text'\]"):
        plan_mixture(manifest, MixtureSpec(weights={"code": 1.0}, token_budget=6400))
    with pytest.raises(ValueError, match="token_budget: 10 is less than one sequence of 64"):
        plan_mixture(manifest, MixtureSpec(weights={"text": 1.0}, token_budget=10))
    with pytest.raises(ValueError, match="weights.text: must be > 0"):
        MixtureSpec(weights={"text": 0.0}, token_budget=10)
    mixed = fake_manifest({"text": [10]})
    mixed["domains"]["chat"] = {"kind": "sft"}
    with pytest.raises(ValueError, match="mixes pretraining and SFT"):
        plan_mixture(mixed, MixtureSpec(weights={"text": 1.0, "chat": 1.0}, token_budget=6400))


def test_pack_pretrain_separates_documents_with_eos_and_pads_the_tail() -> None:
    rows, counts = pack_pretrain([[5, 6, 7], [8, 9], [10]], seq_len=4, eos_id=0)
    assert rows.tolist() == [[5, 6, 7, 0], [8, 9, 0, 10], [0, 0, 0, 0]]
    assert counts.tolist() == [4, 4, 1]
    empty_rows, empty_counts = pack_pretrain([], seq_len=4, eos_id=0)
    assert empty_rows.shape == (0, 4) and empty_counts.shape == (0,)


def test_sft_examples_one_per_assistant_turn() -> None:
    chat = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    examples = sft_examples([chat])
    assert examples == [
        ("<role>HUMAN</role>q1<|role_end|><role>ASSISTANT</role>", "a1<|role_end|>"),
        ("<role>HUMAN</role>q1<|role_end|><role>ASSISTANT</role>a1<|role_end|>"
         "<role>HUMAN</role>q2<|role_end|><role>ASSISTANT</role>", "a2<|role_end|>"),
    ]


def test_cursor_refuses_a_different_split() -> None:
    cursor = DataCursor(world_size=2, batch_size=8, batches_consumed=3)
    assert cursor.advanced().batches_consumed == 4
    assert cursor.next_epoch().model_dump() == {"world_size": 2, "batch_size": 8, "seed": 0, "epoch": 1,
                                                "batches_consumed": 0}
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
