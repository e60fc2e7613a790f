"""Input files of a tokenize-and-pack job: which files a source names, and their documents.

Formats (by extension): ``.jsonl``/``.json`` (one JSON object per line; ``text`` field, or
``messages`` for SFT), ``.txt`` (documents separated by a blank line), ``.parquet`` (a ``text``
or ``messages`` column). A bad line (invalid JSON, not UTF-8, no field) or an empty document is
counted, with the first offending location (``uri:line``), and skipped; a file that cannot be
read at all is an error naming the file.

A file larger than ``split_bytes`` becomes several work units, so no task holds a whole
multi-GB file: JSON lines by byte range (a line belongs to the range its first byte is in, and
its location reads ``uri@byte+line``), parquet by row groups. Plain text files are read whole.
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


def expand_sources(sources: list[SourceSpec], s3: storage.S3Settings | None = None,
                   split_bytes: int | None = None) -> list[dict[str, Any]]:
    """Work units in a deterministic order: one per input file, or per byte range / row-group
    range of a file larger than ``split_bytes``; each with the file's fingerprint (size and
    modification time or ETag) so a rerun can tell whether its inputs changed."""
    units: list[dict[str, Any]] = []
    for source in sources:
        files = storage.list_files(source.uri, s3)
        if not files:
            raise SourceError(f"source {source.uri!r} (domain {source.domain}): no files match")
        for uri in files:
            fingerprint = storage.fingerprint(uri, s3)
            unit = {"uri": uri, "domain": source.domain, "kind": source.kind, "field": source.record_field,
                    "format": file_format(uri), "fingerprint": fingerprint, "range": None}
            for piece in _split(unit, int(fingerprint.split(":", 1)[0]), split_bytes, s3):
                units.append({**unit, "range": piece, "index": len(units)})
    return units


def _split(unit: dict[str, Any], size: int, split_bytes: int | None,
           s3: storage.S3Settings | None) -> list[list[int] | None]:
    """The ranges a file is read in: [None] (whole), byte ranges of JSON lines, or row-group
    ranges of parquet (read from its footer)."""
    if split_bytes is None or size <= split_bytes or unit["format"] == "text":
        return [None]
    if unit["format"] == "jsonl":
        return [[start, min(start + split_bytes, size)] for start in range(0, size, split_bytes)]
    import pyarrow.parquet as pq

    filesystem, path = storage.filesystem(unit["uri"], s3)
    with filesystem.open_input_file(path) as handle:
        metadata = pq.ParquetFile(handle).metadata
    groups = max(1, metadata.num_row_groups)
    per_unit = max(1, round(groups * split_bytes / size))
    return [[start, min(start + per_unit, groups)] for start in range(0, groups, per_unit)]


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
    """Parse one work unit (a file, or its range). Raises :class:`SourceError` naming the file if
    it cannot be read."""
    uri, kind, record_field, piece = unit["uri"], unit["kind"], unit["field"], unit.get("range")
    documents = FileDocuments()
    if unit["format"] == "parquet":
        for row, value in enumerate(_parquet_column(uri, record_field, piece, s3)):
            _check_record(value, kind, f"{uri}: row {row}" if piece is None else f"{uri}: row group {piece[0]}+{row}",
                          documents)
        return documents
    if piece is None:
        data, where = _read(uri, s3), uri
    else:
        data, where = _read_lines_of_range(uri, piece[0], piece[1], s3), f"{uri}@{piece[0]}+"
    if unit["format"] == "text":
        if kind != "pretrain":
            raise SourceError(f"{uri}: SFT sources must be .jsonl or .parquet with a messages field")
        for number, chunk in enumerate(data.split(b"\n\n"), start=1):
            location = f"{uri}: paragraph {number}"
            paragraph = _decoded(chunk, location, documents)
            if paragraph is not None:
                _check_record(paragraph.strip("\n"), kind, location, documents)
        return documents
    for number, raw in enumerate(data.splitlines(), start=1):
        location = f"{where}:{number}" if piece is None else f"{where}{number}"
        line = _decoded(raw, location, documents)  # one bad byte costs its line, not the file
        if line is None or not line.strip():
            continue  # blank lines separate nothing in JSON lines
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            documents.malformed.add(f"{location}: invalid JSON ({error.msg})")
            continue
        if not isinstance(record, dict) or record_field not in record:
            documents.malformed.add(f"{location}: no {record_field!r} field")
            continue
        _check_record(record[record_field], kind, location, documents)
    return documents


def _read(uri: str, s3: storage.S3Settings | None) -> bytes:
    try:
        return storage.read_bytes(uri, s3)
    except storage.StorageError as error:
        raise SourceError(f"{uri}: cannot read ({error})") from error


def _read_lines_of_range(uri: str, start: int, end: int, s3: storage.S3Settings | None) -> bytes:
    """The JSON lines whose first byte lies in [start, end): from the first line start at or
    after ``start`` through the end of the line that holds byte ``end - 1``."""
    try:
        head = start - 1 if start > 0 else 0  # one byte before: was ``start`` a line's first byte?
        data = storage.read_range(uri, head, end, s3)
        position = end
        while not data.endswith(b"\n"):  # finish the last line from the next bytes
            more = storage.read_range(uri, position, position + 2**20, s3)
            if not more:
                break
            cut = more.find(b"\n")
            data += more if cut < 0 else more[: cut + 1]
            position += len(more)
            if cut >= 0:
                break
    except storage.StorageError as error:
        raise SourceError(f"{uri}: cannot read bytes {start}-{end} ({error})") from error
    if start > 0:
        data = data[data.find(b"\n") + 1:] if b"\n" in data else b""
    return data


def _parquet_column(uri: str, field: str, piece: list[int] | None, s3: storage.S3Settings | None) -> list[Any]:
    import pyarrow.parquet as pq

    try:
        if piece is None:
            table = pq.read_table(io.BytesIO(_read(uri, s3)))
        else:
            filesystem, path = storage.filesystem(uri, s3)
            with filesystem.open_input_file(path) as handle:
                table = pq.ParquetFile(handle).read_row_groups(list(range(piece[0], piece[1])))
    except SourceError:
        raise
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError ... for corrupt files
        raise SourceError(f"{uri}: not a readable parquet file ({error})") from error
    if field not in table.column_names:
        raise SourceError(f"{uri}: no column {field!r} (columns: {table.column_names})")
    return table.column(field).to_pylist()


def _decoded(raw: bytes, where: str, documents: FileDocuments) -> str | None:
    """A line or paragraph as text, or None (counted as malformed) when it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        documents.malformed.add(f"{where}: not UTF-8 (byte {error.start} of the line)")
        return None
