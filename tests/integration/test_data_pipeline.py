"""Corpus -> tokenizer -> Ray Data pack -> manifest and shard index -> stage plan -> workers'
Ray Data streams, on the session's local Ray cluster, locally and on the S3 server; bad input is
reported, corrupt files are named, a resume equals an uninterrupted run batch for batch, large
inputs are split, S3 down gives the clear error."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.demo.corpus import CorpusSpec
from pipelines.mixture import DEMO_STAGE_WEIGHTS, MixtureSpec
from pipelines.pack import PackConfig, PackError, load_shard_index, run_pack_job
from pipelines.prepare import PrepareConfig, demo_sources, prepare
from pipelines.reader import DataCursor, DataError, iterate_batches, load_plan, worker_dataset
from pipelines.sources import SourceSpec
from pipelines.tokenizer import load_tokenizer, tokenizer_hash

pytestmark = pytest.mark.integration
SPEC = CorpusSpec(num_text_docs=240, num_math_docs=200, num_code_docs=120, num_anneal_docs=60,
                  num_sft_chats=150, num_eval_items=10, files_per_split=2)


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("data"))
    config = PrepareConfig(output_uri=root, corpus=SPEC, seq_len=64, sft_seq_len=128,
                           stages={"pretrain1": MixtureSpec(weights=DEMO_STAGE_WEIGHTS["pretrain1"],
                                                            token_budget=64 * 600, seed=1),
                                   "sft": MixtureSpec(weights=DEMO_STAGE_WEIGHTS["sft"], token_budget=128 * 100)})
    return {"root": root, "summary": prepare(config, progress=lambda message: None), "config": config}


def read_shard(root: str, path: str) -> pa.Table:
    return pq.read_table(f"{root}/{path}")


def test_manifest_matches_shards_and_rerun_reuses(prepared) -> None:
    root, manifest = prepared["root"], prepared["summary"]["packed"]["pretrain-64"]
    assert set(manifest["domains"]) == {"text", "math", "code"}  # only what a stage reads at 64 tokens
    assert manifest["domains"]["text"]["documents"] == SPEC.num_text_docs
    tokenizer = load_tokenizer(f"{root}/tokenizer")
    assert manifest["tokenizer"]["hash"] == tokenizer_hash(tokenizer) and manifest["tokenizer"]["eos"] == 0
    index = load_shard_index(f"{root}/packed/pretrain-64")
    for domain, totals in manifest["domains"].items():
        tables = [read_shard(f"{root}/packed/pretrain-64", path) for path in index[domain].paths]
        assert [t.num_rows for t in tables] == index[domain].rows.tolist()
        for path, rows in zip(index[domain].paths, index[domain].rows):  # row groups a reader can fetch alone
            metadata = pq.ParquetFile(f"{root}/packed/pretrain-64/{path}").metadata
            assert metadata.num_row_groups == -(-int(rows) // 256) and metadata.row_group(0).num_rows <= 256
        rows = sum(t.num_rows for t in tables)
        assert rows == totals["sequences"] and totals["files"] == 2
        assert sum(t.column("num_tokens").to_numpy().sum() for t in tables) == totals["tokens"]
        ids = np.concatenate([np.stack(t.column("input_ids").to_numpy(zero_copy_only=False)) for t in tables])
        assert ids.shape == (rows, 64)
        # One EOS after every document, plus the EOS padding of each file's last row.
        assert int((ids == 0).sum()) == totals["documents"] + totals["pad_tokens"]
    first_doc = json.loads(open(f"{root}/corpus/pretrain/text/part-00000.jsonl").readline())["text"]
    first_row = read_shard(f"{root}/packed/pretrain-64", "shards/text/00000-000.parquet").column("input_ids")[0].as_py()
    assert first_doc.startswith(tokenizer.decode(first_row).split("<|endoftext|>")[0])
    again = prepare(prepared["config"], progress=lambda message: None)
    assert again["packed"]["pretrain-64"]["reused"] and again["stages"]["pretrain1"]["reused"]


def test_sft_rows_are_dialogs_with_their_answer_spans(prepared) -> None:
    root, manifest = prepared["root"], prepared["summary"]["packed"]["sft-128"]
    tokenizer = load_tokenizer(f"{root}/tokenizer")
    table = read_shard(f"{root}/packed/sft-128", load_shard_index(f"{root}/packed/sft-128")["chat"].paths[0])
    assert table.column_names == ["input_ids", "num_tokens", "turn_starts", "turn_ends", "domain"]
    multi_turn = 0
    for row in table.to_pylist():
        ids = row["input_ids"]
        assert len(ids) == row["turn_ends"][-1] and row["num_tokens"] == len(ids) + 1  # room for one EOS
        for start, end in zip(row["turn_starts"], row["turn_ends"]):
            assert tokenizer.decode(ids[:start]).endswith("<role>ASSISTANT</role>") and ids[end - 1] == 4  # <|role_end|>
        multi_turn += len(row["turn_ends"]) > 1
    assert multi_turn > 0  # follow-up questions: one row per dialog, each turn a possible target
    assert manifest["domains"]["chat"]["sequences"] == SPEC.num_sft_chats


def test_malformed_and_empty_records_are_counted_with_first_location(prepared, tmp_path) -> None:
    lines = ['{"text": "alice has 3 pens."}', '{"text": "broken', '{"body": "no text field"}',
             '{"text": "   "}', '{"text": "bob has 2 cups."}', "[1, 2]"]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "notes.txt").write_text("the red fox runs.\n\nthe blue owl sleeps.\n")
    pq.write_table(pa.table({"text": ["carol has 1 key.", ""]}), tmp_path / "table.parquet")
    config = PackConfig(sources=[SourceSpec(uri=str(tmp_path / "*.*"), domain="mixed")],
                        tokenizer_uri=f"{prepared['root']}/tokenizer", output_uri=str(tmp_path / "out"), seq_len=16)
    totals = run_pack_job(config)["domains"]["mixed"]
    assert (totals["documents"], totals["malformed"], totals["empty"]) == (5, 3, 2)
    assert totals["first_malformed"].startswith(f"{tmp_path}/bad.jsonl:2: invalid JSON")
    assert totals["first_empty"] == f"{tmp_path}/bad.jsonl:4"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["problems"] == [
        f"mixed: skipped 3 malformed records; first at {totals['first_malformed']}",
        f"mixed: skipped 2 empty documents; first at {tmp_path}/bad.jsonl:4"]


def test_corrupt_input_files_are_named(prepared, tmp_path) -> None:
    (tmp_path / "good.jsonl").write_text('{"text": "alice has 3 pens."}\n')
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    config = PackConfig(sources=[SourceSpec(uri=str(tmp_path / "*.*"), domain="web")],
                        tokenizer_uri=f"{prepared['root']}/tokenizer", output_uri=str(tmp_path / "out"))
    with pytest.raises(PackError) as error:
        run_pack_job(config)
    message = str(error.value)
    assert f"{tmp_path}/broken.parquet: not a readable parquet file" in message
    assert "good.jsonl" not in message
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(Exception, match="no files match"):
        run_pack_job(config.model_copy(update={"sources": [SourceSpec(uri=str(tmp_path / "*.csv"), domain="x")]}))


def test_a_byte_that_is_not_utf8_costs_its_line_not_the_file(prepared, tmp_path) -> None:
    (tmp_path / "mixed.jsonl").write_bytes(b'{"text": "alice has 3 pens."}\n{"text": "bad \xff\xfe byte"}\n'
                                           b'{"text": "bob has 2 cups."}\n')
    config = PackConfig(sources=[SourceSpec(uri=str(tmp_path / "mixed.jsonl"), domain="web")],
                        tokenizer_uri=f"{prepared['root']}/tokenizer", output_uri=str(tmp_path / "out"))
    totals = run_pack_job(config)["domains"]["web"]
    assert (totals["documents"], totals["malformed"]) == (2, 1)
    assert totals["first_malformed"] == f"{tmp_path}/mixed.jsonl:2: not UTF-8 (byte 14 of the line)"


def test_a_source_that_yields_nothing_fails_data_preparation(prepared, tmp_path) -> None:
    from pipelines.prepare import PrepareConfig, prepare
    from pipelines.sources import SourceError

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "junk.jsonl").write_text('{"body": "no text field"}\nnot json\n')
    config = PrepareConfig(output_uri=str(tmp_path / "out"), demo=False, tokenizer_uri=f"{prepared['root']}/tokenizer",
                           sources=[SourceSpec(uri=str(tmp_path / "*.jsonl"), domain="web")])
    with pytest.raises(SourceError, match=r"pretrain domain 'web': its 2 file\(s\) yielded no usable document "
                                          r"\(2 malformed, 0 empty; first: .*junk.jsonl:1: no 'text' field\)"):
        prepare(config, progress=lambda line: None)


def read_worker(stage_uri: str, rank: int, world: int, cursor: DataCursor, rows: int, s3=None) -> list:
    """The batches worker ``rank`` of ``world`` trains on, as the Train loop reads them."""
    plan = load_plan(stage_uri, s3)
    dataset = worker_dataset(plan, rank, world, cursor, rows, s3)
    return [(batch["position"].tolist(), after) for batch, after in iterate_batches(dataset, cursor, world, 8, rows)]


def test_workers_read_the_stage_order_in_batches_and_a_resume_equals_the_uninterrupted_run(prepared) -> None:
    stage = prepared["summary"]["stages"]["pretrain1"]
    assert stage["num_sequences"] == 600 and stage["composition"] == {"code": 819, "math": 819, "text": 2458}
    stage_uri = f"{prepared['root']}/stages/pretrain1"
    start = [DataCursor(world_size=2, batch_size=8) for _ in range(2)]
    full = [read_worker(stage_uri, rank, 2, start[rank], 80) for rank in range(2)]
    assert [len(batches) for batches in full] == [10, 10]
    positions = [p for rank in full for batch, _ in rank for p in batch]
    assert len(positions) == len(set(positions)) == 160  # no row twice
    assert positions[:80] == list(range(80)) and positions[80:] == list(range(4096, 4176))  # units 0 and 1
    head = [read_worker(stage_uri, rank, 2, start[rank], 24) for rank in range(2)]
    resumed = [read_worker(stage_uri, rank, 2, head[rank][-1][1], 56) for rank in range(2)]
    for rank in range(2):  # separate pipelines: the head plus the resumed tail is the whole run
        assert [b for b, _ in head[rank]] + [b for b, _ in resumed[rank]] == [b for b, _ in full[rank]]
    assert resumed[0][0][1].rows_consumed == 32
    one = read_worker(stage_uri, 0, 1, DataCursor(world_size=1, batch_size=8), 80)
    assert [p for batch, _ in one for p in batch] == list(range(80))  # one worker: the same order


def test_a_corrupt_packed_shard_is_named_when_read(prepared, tmp_path) -> None:
    copy = tmp_path / "data"
    shutil.copytree(prepared["root"], copy)
    plan = json.loads((copy / "stages" / "pretrain1" / "stage.json").read_text())
    plan["packed_uri"] = str(copy / "packed" / "pretrain-64")
    (copy / "stages" / "pretrain1" / "stage.json").write_text(json.dumps(plan))
    for path in (copy / "packed" / "pretrain-64" / "shards").rglob("*.parquet"):
        path.write_bytes(b"truncated")
    with pytest.raises(Exception, match=r"packed shard .*pretrain-64/shards/.* is corrupt or unreadable"):
        read_worker(str(copy / "stages" / "pretrain1"), 0, 1, DataCursor(world_size=1, batch_size=8), 8)
    with pytest.raises(DataError, match="no stage.json"):
        load_plan(str(tmp_path / "nowhere"))


def test_a_large_input_is_read_by_several_tasks_with_the_same_documents(prepared, tmp_path) -> None:
    source = f"{prepared['root']}/corpus/pretrain/text/part-00000.jsonl"
    whole = run_pack_job(PackConfig(sources=[SourceSpec(uri=source, domain="text")], output_uri=str(tmp_path / "whole"),
                                    tokenizer_uri=f"{prepared['root']}/tokenizer", seq_len=64))
    split = run_pack_job(PackConfig(sources=[SourceSpec(uri=source, domain="text")], output_uri=str(tmp_path / "split"),
                                    tokenizer_uri=f"{prepared['root']}/tokenizer", seq_len=64, split_bytes=3000))
    whole_totals, split_totals = whole["domains"]["text"], split["domains"]["text"]
    assert split_totals["inputs"] > 3 and split_totals["files"] == whole_totals["files"] == 1
    assert split_totals["documents"] == whole_totals["documents"]  # every line once, none cut
    assert split_totals["tokens"] - whole_totals["tokens"] == 0


def test_s3_end_to_end(prepared, s3_server) -> None:
    bucket = s3_server.bucket()
    config = PrepareConfig(output_uri=f"{bucket}/data", corpus=SPEC.model_copy(update={"num_sft_chats": 20}),
                           seq_len=64, stages={"pretrain2": MixtureSpec(weights=DEMO_STAGE_WEIGHTS["pretrain2"],
                                                                        token_budget=64 * 200)},
                           stage_seq_lens={"pretrain2": 32})
    summary = prepare(config, progress=lambda message: None)
    assert summary["packed"]["pretrain-32"]["domains"]["math"]["documents"] == SPEC.num_math_docs
    assert storage.exists(f"{bucket}/data/packed/pretrain-32/shards.parquet")
    assert summary["stages"]["pretrain2"]["seq_len"] == 32
    batches = read_worker(f"{bucket}/data/stages/pretrain2", 0, 1, DataCursor(world_size=1, batch_size=8), 16,
                          s3_server.settings)
    assert [b for b, _ in batches] == [list(range(8)), list(range(8, 16))]
    assert sorted(demo_sources(f"{bucket}/data/corpus")[0].uri.split("/")[-3:]) == ["*.jsonl", "pretrain", "text"]


def test_s3_down_gives_a_clear_error(prepared, s3_unreachable) -> None:
    config = PackConfig(sources=[SourceSpec(uri=f"{prepared['root']}/corpus/pretrain/text", domain="text")],
                        tokenizer_uri=f"{prepared['root']}/tokenizer", output_uri="s3://bucket/packed")
    with pytest.raises(storage.StorageError, match=f"cannot reach S3 at {s3_unreachable} .*Check AWS_ENDPOINT_URL"):
        run_pack_job(config)
    with pytest.raises(storage.StorageError, match="cannot reach S3"):
        load_plan("s3://bucket/stages/pretrain1")


def test_cli_prepare_prints_summary(ray_cluster, tmp_path, capsys) -> None:
    from llada.cli import main

    output = str(tmp_path / "cli")
    assert main(["data", "prepare", "--output", output, "--corpus-scale", "0.02", "--seq-len", "64",
                 "--stage", "pretrain1=6400"]) == 0
    printed = capsys.readouterr().out
    assert "[pack] pretrain at 64 tokens" in printed and "stage pretrain1: 100 sequences of 64 tokens" in printed
