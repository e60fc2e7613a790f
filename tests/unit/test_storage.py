"""Storage URIs: local paths, file:// and s3:// (against the local S3 server), atomic writes,
globs, and clear errors (missing object, missing bucket, unreachable endpoint)."""

from __future__ import annotations

import os
import time

import pyarrow.fs as pafs
import pytest

from pipelines import storage
from pipelines.storage import S3Settings, StorageError


def test_parse_uri_forms(tmp_path) -> None:
    assert storage.parse_uri(str(tmp_path)).path == str(tmp_path)
    assert storage.parse_uri(f"file://{tmp_path}/a").path == f"{tmp_path}/a"
    relative = storage.parse_uri("runs/x")
    assert relative.scheme == "file" and os.path.isabs(relative.path)
    s3 = storage.parse_uri("s3://bucket/some/prefix/")
    assert (s3.scheme, s3.bucket, s3.key, s3.uri) == ("s3", "bucket", "some/prefix", "s3://bucket/some/prefix")
    assert storage.join("s3://b/run/", "shards", "x.parquet") == "s3://b/run/shards/x.parquet"
    with pytest.raises(StorageError, match="unsupported scheme 'gs'"):
        storage.parse_uri("gs://bucket/x")
    with pytest.raises(StorageError, match="needs a bucket"):
        storage.parse_uri("s3:///key")


def test_local_atomic_write_read_list_remove(tmp_path) -> None:
    target = f"file://{tmp_path}/deep/folder/manifest.json"
    storage.write_json(target, {"a": 1})
    storage.write_json(target, {"a": 2})  # overwrite in place
    assert storage.read_json(target) == {"a": 2}
    # No temporary files are left next to the target.
    assert os.listdir(tmp_path / "deep" / "folder") == ["manifest.json"]
    storage.write_text(str(tmp_path / "deep" / "x.txt"), "hello")
    assert storage.list_files(str(tmp_path / "deep")) == [
        str(tmp_path / "deep" / "folder" / "manifest.json"), str(tmp_path / "deep" / "x.txt")]
    assert storage.list_files(str(tmp_path / "**" / "*.txt")) == [str(tmp_path / "deep" / "x.txt")]
    assert storage.exists(target) and not storage.exists(str(tmp_path / "nope"))
    storage.remove_tree(str(tmp_path / "deep"))
    assert not storage.exists(target)
    with pytest.raises(StorageError, match="not found: .*nope"):
        storage.read_bytes(str(tmp_path / "nope"))


def test_local_write_failure_leaves_old_content(tmp_path, monkeypatch) -> None:
    target = str(tmp_path / "m.json")
    storage.write_text(target, "old")

    def broken_replace(source: str, destination: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError, match="cannot write .*m.json: disk full"):
        storage.write_text(target, "new")
    monkeypatch.undo()
    assert storage.read_text(target) == "old"


def test_s3_roundtrip_glob_and_pyarrow(s3_server) -> None:
    bucket = s3_server.bucket()
    storage.write_json(f"{bucket}/run/manifest.json", {"ok": True})
    for name in ("a.jsonl", "b.jsonl", "c.txt"):
        storage.write_text(f"{bucket}/run/corpus/{name}", name)
    assert storage.read_json(f"{bucket}/run/manifest.json") == {"ok": True}
    assert storage.list_files(f"{bucket}/run/corpus/*.jsonl") == [
        f"{bucket}/run/corpus/a.jsonl", f"{bucket}/run/corpus/b.jsonl"]
    assert len(storage.list_files(f"{bucket}/run")) == 4
    assert storage.exists(f"{bucket}/run/corpus/c.txt")
    assert not storage.exists(f"{bucket}/run/corpus/zzz.txt")
    # The pyarrow file system (what Ray Data reads through) sees the same objects.
    filesystem, path = storage.filesystem(f"{bucket}/run/corpus/c.txt")
    assert isinstance(filesystem, pafs.S3FileSystem)
    with filesystem.open_input_stream(path) as handle:
        assert handle.read() == b"c.txt"
    storage.remove_tree(f"{bucket}/run/corpus")
    assert storage.list_files(f"{bucket}/run") == [f"{bucket}/run/manifest.json"]


def test_s3_dir_upload_download(s3_server, tmp_path) -> None:
    bucket = s3_server.bucket()
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "a.json").write_text("1")
    (tmp_path / "src" / "sub" / "b.json").write_text("2")
    storage.upload_dir(str(tmp_path / "src"), f"{bucket}/tok")
    storage.download_dir(f"{bucket}/tok", str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "sub" / "b.json").read_text() == "2"


def test_s3_missing_object_and_bucket_errors(s3_server) -> None:
    bucket = s3_server.bucket()
    with pytest.raises(StorageError, match=f"not found: {bucket}/missing.json"):
        storage.read_bytes(f"{bucket}/missing.json")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        storage.write_text("s3://no-such-bucket-x/a.txt", "x")


def test_s3_unreachable_endpoint_fails_fast_with_clear_error(s3_unreachable) -> None:
    started = time.monotonic()
    with pytest.raises(StorageError, match=rf"cannot reach S3 at {s3_unreachable} while trying to read "
                                           r"s3://b/k .*after 2 attempts"):
        storage.read_bytes("s3://b/k")
    with pytest.raises(StorageError, match=f"cannot reach S3 at {s3_unreachable}"):
        storage.list_files("s3://b/corpus/*.jsonl")
    assert time.monotonic() - started < 10


def test_settings_from_env(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("LLADA_S3_MAX_ATTEMPTS", "4")
    settings = S3Settings.from_env()
    assert settings.endpoint_url == "http://127.0.0.1:9000" and settings.max_attempts == 4
    monkeypatch.setenv("LLADA_S3_MAX_ATTEMPTS", "many")
    with pytest.raises(StorageError, match="LLADA_S3_MAX_ATTEMPTS: expected a number"):
        S3Settings.from_env()
