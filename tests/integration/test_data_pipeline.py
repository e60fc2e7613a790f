"""Corpus -> tokenizer -> Ray Data pack -> manifest -> stage mixture -> reader batches, on the
session's local Ray cluster, locally and on the S3 server; bad input is reported, corrupt files
are named, the cursor resumes exactly, S3 down gives the clear error."""

from __future__ import annotations

import io
import json
import shutil
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.demo.corpus import CorpusSpec
from pipelines.mixture import DEMO_STAGE_WEIGHTS, MixtureSpec, write_stage
from pipelines.pack import PackConfig, PackError, run_pack_job
from pipelines.prepare import PrepareConfig, demo_sources, prepare
from pipelines.reader import DataCursor, DataError, iterate_batches, load_stage, stage_dataset
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
                                                            token_budget=64 * 600, seed=1)})
    return {"root": root, "summary": prepare(config, progress=lambda message: None), "config": config}


def read_shard(root: str, path: str) -> pa.Table:
    return pq.read_table(f"{root}/{path}")


def test_manifest_matches_shards_and_rerun_reuses(prepared) -> None:
    root, manifest = prepared["root"], prepared["summary"]["packed"]["pretrain"]
    assert set(manifest["domains"]) == {"text", "math", "code", "anneal"}
    assert manifest["domains"]["text"]["documents"] == SPEC.num_text_docs
    tokenizer = load_tokenizer(f"{root}/tokenizer")
    assert manifest["tokenizer"]["hash"] == tokenizer_hash(tokenizer) and manifest["tokenizer"]["eos"] == 0
    for domain, totals in manifest["domains"].items():
        tables = [read_shard(f"{root}/packed/pretrain", s["path"]) for s in manifest["shards"] if s["domain"] == domain]
        rows = sum(t.num_rows for t in tables)
        assert rows == totals["sequences"] and totals["files"] == 2
        assert sum(t.column("num_tokens").to_numpy().sum() for t in tables) == totals["tokens"]
        ids = np.concatenate([np.stack(t.column("input_ids").to_numpy(zero_copy_only=False)) for t in tables])
        assert ids.shape == (rows, 64)
        # One EOS after every document, plus the EOS padding of each file's last row.
        assert int((ids == 0).sum()) == totals["documents"] + totals["pad_tokens"]
    first_doc = json.loads(open(f"{root}/corpus/pretrain/text/part-00000.jsonl").readline())["text"]
    first_row = read_shard(f"{root}/packed/pretrain", "shards/text/00000-000.parquet").column("input_ids")[0].as_py()
    assert first_doc.startswith(tokenizer.decode(first_row).split("<|endoftext|>")[0])
    again = prepare(prepared["config"], progress=lambda message: None)
    assert again["packed"]["pretrain"]["reused"] and again["stages"]["pretrain1"]["reused"]


def test_sft_rows_carry_prompt_length(prepared) -> None:
    root, manifest = prepared["root"], prepared["summary"]["packed"]["sft"]
    tokenizer = load_tokenizer(f"{root}/tokenizer")
    table = read_shard(f"{root}/packed/sft", manifest["shards"][0]["path"])
    assert table.column_names == ["input_ids", "num_tokens", "domain", "prompt_length"]
    for row in table.slice(0, 20).to_pylist():
        prompt, response = row["input_ids"][: row["prompt_length"]], row["input_ids"][row["prompt_length"]:]
        assert tokenizer.decode(prompt).endswith("<role>ASSISTANT</role>")
        real = response[: row["num_tokens"] - row["prompt_length"]]
        assert real[-2:] == [4, 0] and set(response[len(real):]) <= {0}  # <|role_end|>, EOS, EOS padding
    assert manifest["domains"]["chat"]["sequences"] > SPEC.num_sft_chats  # multi-turn chats give several rows


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


def read_split(stage_uri: str, cursors: list[DataCursor] | None = None, stop_after: int | None = None) -> list:
    """Consume the stage like 2 Train workers (streaming_split, ordered) from threads."""
    iterators = stage_dataset(stage_uri).streaming_split(2, equal=True)
    seen: list[list] = [[], []]

    def consume(rank: int) -> None:
        cursor = cursors[rank] if cursors else DataCursor(world_size=2, batch_size=8, seed=3)
        for batch, after in iterate_batches(iterators[rank], cursor, world_size=2, batch_size=8,
                                            shuffle_buffer_rows=64):
            assert batch["input_ids"].shape == (8, 64) and batch["input_ids"].dtype == np.int64
            seen[rank].append((batch["sample_index"].tolist(), after))
            if stop_after and len(seen[rank]) == stop_after:
                break

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return seen


def test_stage_mixture_and_exact_resume(prepared) -> None:
    stage = prepared["summary"]["stages"]["pretrain1"]
    assert stage["num_sequences"] == 600
    assert stage["domain_sequences"] == {"text": 360, "math": 120, "code": 120}
    stage_uri = f"{prepared['root']}/stages/pretrain1"
    full = read_split(stage_uri)
    indices = [i for rank in full for batch, _ in rank for i in batch]
    assert len(indices) == len(set(indices)) == 592  # 600 rows, drop_last over 2 x 8
    head = read_split(stage_uri, stop_after=10)
    resumed = read_split(stage_uri, cursors=[head[rank][-1][1] for rank in range(2)])
    # Three separate runs of the pipeline: the head plus the resumed tail is exactly the full run
    # (so each worker's order also repeats from run to run).
    for rank in range(2):
        assert [b for b, _ in head[rank]] + [b for b, _ in resumed[rank]] == [b for b, _ in full[rank]]
    assert resumed[0][0][1].batches_consumed == 11


def test_corrupt_stage_shard_is_named(prepared, tmp_path) -> None:
    copy = tmp_path / "stage"
    shutil.copytree(f"{prepared['root']}/stages/pretrain1", copy)
    (copy / "shards" / "00000.parquet").write_bytes(b"truncated")
    with pytest.raises(DataError, match=f"stage shard {copy}/shards/00000.parquet is corrupt or unreadable"):
        stage_dataset(str(copy))
    with pytest.raises(DataError, match="no stage.json"):
        load_stage(str(tmp_path / "nowhere"))


def test_s3_end_to_end(prepared, s3_server) -> None:
    bucket = s3_server.bucket()
    config = PrepareConfig(output_uri=f"{bucket}/data", corpus=SPEC.model_copy(update={"num_sft_chats": 20}),
                           seq_len=64, stages={"pretrain2": MixtureSpec(weights=DEMO_STAGE_WEIGHTS["pretrain2"],
                                                                        token_budget=64 * 200)})
    summary = prepare(config, progress=lambda message: None)
    assert summary["packed"]["pretrain"]["domains"]["math"]["documents"] == SPEC.num_math_docs
    assert storage.exists(f"{bucket}/data/packed/pretrain/manifest.json")
    assert summary["stages"]["pretrain2"]["domain_sequences"] == {"text": 60, "math": 70, "code": 70}
    dataset = stage_dataset(f"{bucket}/data/stages/pretrain2")  # Ray Data reads through pyarrow's S3
    batch = next(iter(dataset.iter_batches(batch_size=16, batch_format="numpy")))
    assert len(batch["input_ids"]) == 16 and dataset.count() == 200
    assert sorted(demo_sources(f"{bucket}/data/corpus")[0].uri.split("/")[-3:]) == ["*.jsonl", "pretrain", "text"]


def test_s3_down_gives_a_clear_error(prepared, s3_unreachable) -> None:
    config = PackConfig(sources=[SourceSpec(uri=f"{prepared['root']}/corpus/pretrain/text", domain="text")],
                        tokenizer_uri=f"{prepared['root']}/tokenizer", output_uri="s3://bucket/packed")
    with pytest.raises(storage.StorageError, match=f"cannot reach S3 at {s3_unreachable} .*Check AWS_ENDPOINT_URL"):
        run_pack_job(config)
    with pytest.raises(storage.StorageError, match="cannot reach S3"):
        stage_dataset("s3://bucket/stages/pretrain1")


def test_cli_prepare_prints_summary(ray_cluster, tmp_path, capsys) -> None:
    from llada.cli import main

    output = str(tmp_path / "cli")
    assert main(["data", "prepare", "--output", output, "--corpus-scale", "0.02", "--seq-len", "64",
                 "--stage", "pretrain1=6400"]) == 0
    printed = capsys.readouterr().out
    assert "[pack] pretrain" in printed and "stage pretrain1: 100 sequences" in printed
    assert [line.split()[0] for line in printed.splitlines() if line.endswith("written")] == \
        ["anneal", "code", "math", "text", "chat"]
    assert io.StringIO(printed).read().count("tokenizer:") == 1
