"""Input files of a tokenize-and-pack job: which files a source names, and their documents.

Formats (by extension): ``.jsonl``/``.json`` (one JSON object per line; ``text`` field, or
``messages`` for SFT), ``.txt`` (documents separated by a blank line), ``.parquet`` (a ``text``
or ``messages`` column). A bad line or an empty document is counted, with the first offending
location (``uri:line``), and skipped; a file that cannot be read or decoded at all is an error
naming the file.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llada_core.tokens import ROLE_NAMES
from pipelines import storage

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "text", ".parquet": "parquet"}


class SourceError(ValueError):
    """An input source or file is unusable; the message names it."""


class SourceSpec(BaseModel):
    """One input of a pack job: files (a URI, a folder or a glob) that all belong to one domain."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    uri: str
    domain: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["pretrain", "sft"] = "pretrain"
    field: str | None = Field(None, description="record field; default 'text' (pretrain) or 'messages' (sft)")

    @property
    def record_field(self) -> str:
        return self.field or ("messages" if self.kind == "sft" else "text")


def file_format(uri: str) -> str:
    extension = os.path.splitext(uri)[1].lower()
    if extension not in FORMATS:
        raise SourceError(f"{uri}: unsupported file type {extension or '(none)'}; "
                          f"use one of {sorted(FORMATS)}")
    return FORMATS[extension]


def expand_sources(sources: list[SourceSpec], s3: storage.S3Settings | None = None) -> list[dict[str, Any]]:
    """One work unit per input file, in a deterministic order, with a fingerprint (size and
    modification time or ETag) so a rerun can tell whether its inputs changed."""
    units: list[dict[str, Any]] = []
    for source in sources:
        files = storage.list_files(source.uri, s3)
        if not files:
            raise SourceError(f"source {source.uri!r} (domain {source.domain}): no files match")
        for uri in files:
            units.append({"index": len(units), "uri": uri, "domain": source.domain, "kind": source.kind,
                          "field": source.record_field, "format": file_format(uri),
                          "fingerprint": storage.fingerprint(uri, s3)})
    return units


@dataclass
class ProblemCounter:
    """How many records of one kind were skipped, and where the first one was."""

    count: int = 0
    first: str = ""

    def add(self, location: str) -> None:
        if not self.count:
            self.first = location
        self.count += 1


@dataclass
class FileDocuments:
    """The usable records of one file, and what was skipped."""

    records: list[Any] = field(default_factory=list)
    malformed: ProblemCounter = field(default_factory=ProblemCounter)
    empty: ProblemCounter = field(default_factory=ProblemCounter)


def _check_record(value: Any, kind: str, where: str, documents: FileDocuments) -> None:
    """Append a usable record, or count it as malformed or empty."""
    if kind == "pretrain":
        if not isinstance(value, str):
            documents.malformed.add(f"{where}: expected a string, got {type(value).__name__}")
        elif not value.strip():
            documents.empty.add(where)
        else:
            documents.records.append(value)
        return
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLE_NAMES and isinstance(m.get("content"), str) for m in value):
        documents.malformed.add(f"{where}: expected a list of {{role, content}} messages")
    elif not any(m["role"] == "assistant" and m["content"].strip() for m in value):
        documents.empty.add(f"{where}: no non-empty assistant turn")
    else:
        documents.records.append(value)


def read_documents(unit: dict[str, Any], s3: storage.S3Settings | None = None) -> FileDocuments:
    """Parse one input file. Raises :class:`SourceError` naming the file if it cannot be read."""
    uri, kind, record_field = unit["uri"], unit["kind"], unit["field"]
    try:
        data = storage.read_bytes(uri, s3)
    except storage.StorageError as error:
        raise SourceError(f"{uri}: cannot read ({error})") from error
    documents = FileDocuments()
    if unit["format"] == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError ... for corrupt files
            raise SourceError(f"{uri}: not a readable parquet file ({error})") from error
        if record_field not in table.column_names:
            raise SourceError(f"{uri}: no column {record_field!r} (columns: {table.column_names})")
        for row, value in enumerate(table.column(record_field).to_pylist()):
            _check_record(value, kind, f"{uri}: row {row}", documents)
        return documents
    if unit["format"] == "text":
        if kind != "pretrain":
            raise SourceError(f"{uri}: SFT sources must be .jsonl or .parquet with a messages field")
        for number, piece in enumerate(data.split(b"\n\n"), start=1):
            where = f"{uri}: paragraph {number}"
            paragraph = _decoded(piece, where, documents)
            if paragraph is not None:
                _check_record(paragraph.strip("\n"), kind, where, documents)
        return documents
    for number, raw in enumerate(data.splitlines(), start=1):
        where = f"{uri}:{number}"
        line = _decoded(raw, where, documents)  # one bad byte costs its line, not the file
        if line is None or not line.strip():
            continue  # blank lines separate nothing in JSON lines
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            documents.malformed.add(f"{where}: invalid JSON ({error.msg})")
            continue
        if not isinstance(record, dict) or record_field not in record:
            documents.malformed.add(f"{where}: no {record_field!r} field")
            continue
        _check_record(record[record_field], kind, where, documents)
    return documents


def _decoded(raw: bytes, where: str, documents: FileDocuments) -> str | None:
    """A line or paragraph as text, or None (counted as malformed) when it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        documents.malformed.add(f"{where}: not UTF-8 (byte {error.start} of the line)")
        return None
