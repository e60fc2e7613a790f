"""Tokenize-and-pack on Ray Data: input files -> parquet token shards + a manifest + a shard index.

Packing (pretraining): the documents of one input (a file, or one byte range or row-group range
of a large file) are tokenized, each followed by one EOS (that EOS is the document separator the
model sees), concatenated, and cut into rows of exactly ``seq_len`` tokens; a sequence may hold
the end of one document and the start of the next. The last row of each input is padded with EOS
(= pad) and its ``num_tokens`` says how many are real.

SFT: one row per dialog: its token ids (``format_chat`` of every message, each assistant answer
followed by ``<|role_end|>``) up to the end of its last assistant turn that fits in ``seq_len``
with one EOS, and the spans of its assistant answers (``turn_starts``, ``turn_ends``). The reader
picks one of those turns as the target for each pass (LLADA_SPEC section 4: the earlier turns,
answers included, are the visible prompt; the target answer, ``<|role_end|>`` and EOS padding
are the response). A dialog whose first answer does not fit is counted as ``too_long``.

Shard columns: ``input_ids`` (list<int32>: ``seq_len`` long for pretraining, the dialog for SFT),
``num_tokens`` (int32), ``domain`` (string), and for SFT ``turn_starts``/``turn_ends``
(list<int32>). Shards are written in row groups of ``row_group_rows`` rows, so a reader fetches
only the row groups it needs. Shards are named after the input's position in the job, so the
output is the same on every run. ``shards.parquet`` indexes every shard (path, domain, kind,
rows, tokens) for readers and planners (compact at any size: 600k shards are a few MB); the
manifest is written last and marks the output complete; a rerun with the same inputs, tokenizer
and seq_len reuses it. The job's driver sees only per-input summaries, never the data.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

from llada_core.tokens import ROLE_CLOSE, ROLE_END, ROLE_NAMES, ROLE_START
from pipelines import storage
from pipelines.sources import FileDocuments, ProblemCounter, SourceError, SourceSpec, expand_sources, read_documents
from pipelines.tokenizer import load_tokenizer, special_token_ids, tokenizer_hash

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "llada-shards/2"
SHARD_INDEX_NAME = "shards.parquet"
ROW_GROUP_ROWS = 256
logger = logging.getLogger(__name__)


class PackError(RuntimeError):
    """The pack job could not finish; the message names the input files at fault."""


class PackConfig(BaseModel):
    """What to pack, with which tokenizer, where to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: list[SourceSpec] = Field(min_length=1)
    tokenizer_uri: str
    output_uri: str
    seq_len: int = Field(256, ge=8)
    rows_per_shard: int = Field(4096, ge=1)
    row_group_rows: int = Field(ROW_GROUP_ROWS, ge=1)
    split_bytes: int = Field(256 * 2**20, ge=1, description="inputs larger than this are read by several tasks")
    overwrite: bool = False


@functools.lru_cache(maxsize=2)
def _backend(tokenizer_json: str) -> Tokenizer:
    return Tokenizer.from_str(tokenizer_json)


def pack_pretrain(token_lists: list[list[int]], seq_len: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> (rows [N, seq_len] int32, real-token counts [N]); each document ends with EOS."""
    if not token_lists:
        return np.zeros((0, seq_len), np.int32), np.zeros(0, np.int32)
    stream = np.concatenate([np.append(np.asarray(ids, np.int32), np.int32(eos_id)) for ids in token_lists])
    num_rows = -(-len(stream) // seq_len)
    rows = np.full(num_rows * seq_len, eos_id, np.int32)
    rows[: len(stream)] = stream
    counts = np.full(num_rows, seq_len, np.int32)
    counts[-1] = len(stream) - (num_rows - 1) * seq_len
    return rows.reshape(num_rows, seq_len), counts


def dialog_pieces(messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """A dialog as text pieces in order, each marked True when it is an assistant answer (the
    answer's content and ``<|role_end|>``); joined they are ``format_chat`` of the whole dialog.
    Every piece boundary touches a special token, so tokenizing piece by piece gives the ids of
    the whole text."""
    pieces: list[tuple[str, bool]] = []
    for message in messages:
        name = ROLE_NAMES[message["role"]]
        if message["role"] == "assistant":
            pieces.append((f"{ROLE_START}{name}{ROLE_CLOSE}", False))
            pieces.append((message["content"] + ROLE_END, bool(message["content"].strip())))
        else:
            pieces.append((f"{ROLE_START}{name}{ROLE_CLOSE}{message['content']}{ROLE_END}", False))
    return pieces


def _sft_rows(documents: FileDocuments, backend: Tokenizer, seq_len: int, eos_id: int,
              uri: str) -> tuple[dict[str, Any], ProblemCounter]:
    """One row per dialog: ids up to its last answer that fits with one EOS, and answer spans."""
    too_long = ProblemCounter()
    rows, starts, ends, counts = [], [], [], []
    for number, messages in enumerate(documents.records):
        pieces = dialog_pieces(messages)
        encodings = backend.encode_batch([text for text, _ in pieces], add_special_tokens=False)
        ids: list[int] = []
        spans = []
        for (_, is_answer), encoding in zip(pieces, encodings):
            start = len(ids)
            ids.extend(encoding.ids)
            if is_answer and len(ids) + 1 <= seq_len:  # the answer, <|role_end|> and one EOS fit
                spans.append((start, len(ids)))
        if not spans:
            too_long.add(f"{uri}: dialog {number} has no answer that fits in seq_len {seq_len} with its prompt")
            continue
        rows.append(ids[: spans[-1][1]])
        starts.append([a for a, _ in spans])
        ends.append([b for _, b in spans])
        counts.append(spans[-1][1] + 1)
    columns = {"input_ids": rows, "num_tokens": np.asarray(counts, np.int32), "turn_starts": starts,
               "turn_ends": ends}
    return columns, too_long


def _write_shards(columns: dict[str, Any], unit: dict[str, Any], config: dict[str, Any],
                  s3: storage.S3Settings | None) -> list[dict[str, Any]]:
    shards = []
    num_rows = len(columns["num_tokens"])
    for part, start in enumerate(range(0, num_rows, config["rows_per_shard"])):
        stop = min(start + config["rows_per_shard"], num_rows)
        if unit["kind"] == "sft":
            arrays = {"input_ids": pa.array(columns["input_ids"][start:stop], pa.list_(pa.int32())),
                      "num_tokens": pa.array(columns["num_tokens"][start:stop]),
                      "turn_starts": pa.array(columns["turn_starts"][start:stop], pa.list_(pa.int32())),
                      "turn_ends": pa.array(columns["turn_ends"][start:stop], pa.list_(pa.int32()))}
        else:
            ids = columns["input_ids"][start:stop]
            arrays = {"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), config["seq_len"])
                      .cast(pa.list_(pa.int32())),
                      "num_tokens": pa.array(columns["num_tokens"][start:stop])}
        arrays["domain"] = pa.array([unit["domain"]] * (stop - start), pa.string())
        buffer = io.BytesIO()
        pq.write_table(pa.table(arrays), buffer, row_group_size=config["row_group_rows"])
        relative = f"shards/{unit['domain']}/{unit['index']:05d}-{part:03d}.parquet"
        storage.write_bytes(storage.join(config["output_uri"], relative), buffer.getvalue(), s3)
        shards.append({"path": relative, "domain": unit["domain"], "kind": unit["kind"], "rows": stop - start,
                       "tokens": int(np.asarray(columns["num_tokens"][start:stop]).sum())})
    return shards


def process_unit(unit: dict[str, Any], config: dict[str, Any], tokenizer_ref: Any, s3: dict | None) -> dict[str, Any]:
    """Ray Data task: one input file -> its shards and a stats row. Never raises for a bad
    file: the error is returned, so the driver can name every failing file at once."""
    import os

    import ray

    if config.get("one_thread_per_task", False):
        # A task owns one CPU; the tokenizers library's own thread pool in every task would fight
        # the other tasks for the same cores (measured: tasks twice as slow on 2 CPUs).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    settings = storage.S3Settings(**s3) if s3 else None
    stats = {"index": unit["index"], "uri": unit["uri"], "domain": unit["domain"], "kind": unit["kind"],
             "error": "", "result": ""}
    try:
        documents = read_documents(unit, settings)
        tokenizer_json = tokenizer_ref if isinstance(tokenizer_ref, str) else ray.get(tokenizer_ref)
        backend = _backend(tokenizer_json)
        eos_id = config["eos_id"]
        too_long = ProblemCounter()
        if unit["kind"] == "sft":
            columns, too_long = _sft_rows(documents, backend, config["seq_len"], eos_id, unit["uri"])
        else:
            encodings = backend.encode_batch(documents.records, add_special_tokens=False)
            rows, counts = pack_pretrain([e.ids for e in encodings], config["seq_len"], eos_id)
            columns = {"input_ids": rows, "num_tokens": counts}
        shards = _write_shards(columns, unit, config, settings)
    except (SourceError, storage.StorageError) as error:
        stats["error"] = str(error)
        return stats
    result = {
        "documents": len(documents.records), "sequences": int(len(columns["num_tokens"])),
        "tokens": int(columns["num_tokens"].sum()),
        # SFT rows are padded when read (to the sampled turn), so only pretraining rows count here
        "pad_tokens": 0 if unit["kind"] == "sft" else
        int(len(columns["num_tokens"]) * config["seq_len"] - columns["num_tokens"].sum()),
        "malformed": documents.malformed.count, "first_malformed": documents.malformed.first,
        "empty": documents.empty.count, "first_empty": documents.empty.first,
        "too_long": too_long.count, "first_too_long": too_long.first, "shards": shards,
    }
    stats["result"] = json.dumps(result)  # one string column keeps Ray Data's schema simple
    return stats


# ---------------------------------------------------------------- driver


def job_key(units: list[dict[str, Any]], tokenizer_digest: str, config: PackConfig) -> str:
    """Identifies a job's output: the same inputs (by fingerprint), tokenizer and packing -> same key."""
    identity = {"format": MANIFEST_FORMAT, "tokenizer": tokenizer_digest, "seq_len": config.seq_len,
                "rows_per_shard": config.rows_per_shard, "row_group_rows": config.row_group_rows,
                "units": [[u["uri"], u["domain"], u["kind"], u["field"], u["fingerprint"], u["range"]] for u in units]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def load_manifest(output_uri: str, s3: storage.S3Settings | None = None) -> dict[str, Any]:
    """The manifest of a finished pack job (error if the job never finished there)."""
    uri = storage.join(output_uri, MANIFEST_NAME)
    if not storage.exists(uri, s3):
        raise PackError(f"{output_uri}: no {MANIFEST_NAME}; the pack job has not finished there "
                        f"(run `llada data prepare` first)")
    manifest = storage.read_json(uri, s3)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise PackError(f"{uri}: unknown manifest format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
    return manifest


def _summarise(rows: list[dict[str, Any]], seq_len: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-domain totals (documents, tokens, sequences, skipped records with first locations)."""
    domains: dict[str, dict[str, Any]] = {}
    shards: list[dict[str, Any]] = []
    files: dict[str, set[str]] = {}
    for row in sorted(rows, key=lambda r: r["index"]):
        result = json.loads(row["result"])
        totals = domains.setdefault(row["domain"], {
            "kind": row["kind"], "files": 0, "inputs": 0, "documents": 0, "tokens": 0, "sequences": 0,
            "pad_tokens": 0, "malformed": 0, "first_malformed": "", "empty": 0, "first_empty": "", "too_long": 0,
            "first_too_long": ""})
        files.setdefault(row["domain"], set()).add(row["uri"])
        totals["files"] = len(files[row["domain"]])
        totals["inputs"] += 1  # a large file is read by several tasks
        for name in ("documents", "tokens", "sequences", "pad_tokens", "malformed", "empty", "too_long"):
            totals[name] += result[name]
            if name in ("malformed", "empty", "too_long") and result[name] and not totals[f"first_{name}"]:
                totals[f"first_{name}"] = result[f"first_{name}"]
        shards.extend(result["shards"])
    return domains, shards


def _report_problems(domains: dict[str, Any]) -> list[str]:
    problems = []
    for domain, totals in sorted(domains.items()):
        for name, what in (("malformed", "malformed records"), ("empty", "empty documents"),
                           ("too_long", "examples longer than seq_len")):
            if totals[name]:
                problems.append(f"{domain}: skipped {totals[name]} {what}; first at {totals[f'first_{name}']}")
    for problem in problems:
        logger.warning(problem)
    return problems


def run_pack_job(config: PackConfig, s3: storage.S3Settings | None = None) -> dict[str, Any]:
    """Run (or reuse) the tokenize-and-pack job; returns the manifest plus ``reused``."""
    import ray
    import ray.data

    settings = s3 or storage.S3Settings.from_env()
    tokenizer = load_tokenizer(config.tokenizer_uri, settings)
    ids = special_token_ids(tokenizer)
    digest = tokenizer_hash(tokenizer)
    units = expand_sources(list(config.sources), settings, split_bytes=config.split_bytes)
    key = job_key(units, digest, config)
    manifest_uri = storage.join(config.output_uri, MANIFEST_NAME)
    if storage.exists(manifest_uri, settings):
        existing = storage.read_json(manifest_uri, settings)
        if existing.get("job_key") == key:
            return {**existing, "reused": True}
        if not config.overwrite:
            raise PackError(f"{config.output_uri} already holds shards of other inputs (or another tokenizer or "
                            f"seq_len); choose another output or pass overwrite")
    storage.remove_tree(manifest_uri, settings)  # the old output is incomplete from here on
    storage.remove_tree(storage.join(config.output_uri, "shards"), settings)

    task_config = {"seq_len": config.seq_len, "rows_per_shard": config.rows_per_shard, "eos_id": ids.eos,
                   "output_uri": config.output_uri, "row_group_rows": config.row_group_rows,
                   "one_thread_per_task": True}
    tokenizer_ref = ray.put(tokenizer.backend_tokenizer.to_str())
    context = ray.data.DataContext.get_current()
    reservation = context.op_resource_reservation_enabled
    # One map operator and nothing downstream to reserve CPUs for: with reservation on, Ray Data
    # keeps part of the cluster back and runs about one task at a time on 2 CPUs (measured: the
    # same 24 tasks took 1.38 s with it, 0.86 s without; plain Ray tasks 0.79 s).
    context.op_resource_reservation_enabled = False
    try:
        dataset = ray.data.from_items(units, override_num_blocks=len(units)).map(
            process_unit, fn_kwargs={"config": task_config, "tokenizer_ref": tokenizer_ref,
                                     "s3": settings.model_dump()}, num_cpus=1)
        rows = dataset.take_all()
    finally:
        context.op_resource_reservation_enabled = reservation
    failures = sorted((row for row in rows if row["error"]), key=lambda r: r["index"])
    if failures:
        raise PackError("cannot pack; fix or remove these input files:\n" +
                        "\n".join(f"  {row['error']}" for row in failures))
    domains, shards = _summarise(rows, config.seq_len)
    write_shard_index(config.output_uri, shards, settings)
    manifest = {
        "format": MANIFEST_FORMAT, "job_key": key, "seq_len": config.seq_len, "row_group_rows": config.row_group_rows,
        "tokenizer": {"uri": config.tokenizer_uri, "hash": digest, "size": len(tokenizer),
                      **ids.model_dump()},
        "sources": [{**source.model_dump(), "files": sorted({u["uri"] for u in units if u["domain"] == source.domain})}
                    for source in config.sources],
        "domains": domains, "shard_index": SHARD_INDEX_NAME, "num_shards": len(shards),
        "problems": _report_problems(domains),
    }
    storage.write_json(manifest_uri, manifest, settings)  # written last: marks the output complete
    return {**manifest, "reused": False}


def write_shard_index(output_uri: str, shards: list[dict[str, Any]], s3: storage.S3Settings | None = None) -> None:
    """``shards.parquet``: one row per shard (path, domain, kind, rows, tokens), in job order."""
    table = pa.table({"path": pa.array([s["path"] for s in shards], pa.string()),
                      "domain": pa.array([s["domain"] for s in shards], pa.string()),
                      "kind": pa.array([s["kind"] for s in shards], pa.string()),
                      "rows": pa.array([s["rows"] for s in shards], pa.int64()),
                      "tokens": pa.array([s["tokens"] for s in shards], pa.int64())})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(storage.join(output_uri, SHARD_INDEX_NAME), buffer.getvalue(), s3)


def load_shard_index(output_uri: str, s3: storage.S3Settings | None = None) -> dict[str, Any]:
    """Each domain's shards of a packed set (pipelines.mixture.DomainShards), from its index."""
    from pipelines.mixture import DomainShards

    uri = storage.join(output_uri, SHARD_INDEX_NAME)
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri, s3)), columns=["path", "domain", "rows"])
    except storage.StorageError:
        raise
    except Exception as error:  # pyarrow raises several kinds for a corrupt file
        raise PackError(f"{uri}: the shard index is corrupt ({error}); run `llada data prepare` again") from error
    domains = table.column("domain").to_numpy(zero_copy_only=False)
    paths = table.column("path").to_numpy(zero_copy_only=False)
    rows = table.column("rows").to_numpy()
    index = {}
    for domain in np.unique(domains):
        mine = domains == domain
        index[str(domain)] = DomainShards(list(paths[mine]), rows[mine])
    return index
