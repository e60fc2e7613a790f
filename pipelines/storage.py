"""One URI form for every artifact: a plain path or ``file://`` (the embedded default) and
``s3://bucket/prefix`` (AWS, MinIO or any S3-compatible store).

Small objects (manifests, shards, tokenizer files) go through boto3; Ray Data reads go through
pyarrow's ``S3FileSystem`` (see :func:`filesystem`). Both are built from one :class:`S3Settings`,
so region, endpoint override and the bounded timeouts/retries are the same on either path.

Atomicity: a local write goes to a temporary file in the same folder and is renamed over the
target; an S3 write is a single PUT, which S3 makes visible all at once. Multi-file artifacts
(a shard set) are complete only when their manifest, written last, exists.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob as globlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict

GLOB_CHARS = "*?["


class StorageError(RuntimeError):
    """A storage operation failed in a way the user can act on (the message says how)."""


class PreconditionFailed(StorageError):
    """A conditional write found the object in another state than required."""


class S3Settings(BaseModel):
    """How to reach S3. Credentials come from the standard AWS chain (environment, config
    files, instance role), never from here, so they are not shipped inside task arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = None
    region: str | None = None
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 20.0
    max_attempts: int = 3

    @classmethod
    def from_env(cls) -> "S3Settings":
        """``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
        and ``LLADA_S3_CONNECT_TIMEOUT_S`` / ``LLADA_S3_READ_TIMEOUT_S`` / ``LLADA_S3_MAX_ATTEMPTS``."""
        env = os.environ
        values: dict[str, Any] = {
            "endpoint_url": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        }
        for field, name, kind in (
            ("connect_timeout_s", "LLADA_S3_CONNECT_TIMEOUT_S", float),
            ("read_timeout_s", "LLADA_S3_READ_TIMEOUT_S", float),
            ("max_attempts", "LLADA_S3_MAX_ATTEMPTS", int),
        ):
            if env.get(name):
                try:
                    values[field] = kind(env[name])
                except ValueError as error:
                    raise StorageError(f"{name}: expected a number, got {env[name]!r}") from error
        return cls(**values)


@dataclass(frozen=True)
class Location:
    """A parsed URI: ``scheme`` is "file" or "s3"; ``path`` is an absolute local path or
    "bucket/key" for S3 (the form pyarrow file systems take)."""

    scheme: str
    path: str

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def key(self) -> str:
        parts = self.path.split("/", 1)
        return parts[1] if len(parts) > 1 else ""

    @property
    def uri(self) -> str:
        return f"s3://{self.path}" if self.scheme == "s3" else self.path


def parse_uri(uri: str) -> Location:
    """Plain paths and ``file://`` become absolute local paths; ``s3://bucket/key`` is kept."""
    if not isinstance(uri, str) or not uri:
        raise StorageError(f"storage URI: expected a non-empty string, got {uri!r}")
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        local = parsed.path if parsed.scheme == "file" else uri
        return Location("file", os.path.abspath(os.path.expanduser(local)))
    if parsed.scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise StorageError(f"storage URI {uri!r}: an s3:// URI needs a bucket (s3://bucket/prefix)")
        return Location("s3", f"{parsed.netloc}/{parsed.path.lstrip('/')}".rstrip("/"))
    raise StorageError(f"storage URI {uri!r}: unsupported scheme {parsed.scheme!r}; use a path, file:// or s3://")


def absolute(uri: str) -> str:
    """A relative local path made absolute against this process's working directory (an s3://
    URI is returned as is). Configs that travel to Ray workers hold absolute paths: a Ray Train
    worker runs in another directory, where ``./runs`` would name another folder."""
    location = parse_uri(uri)
    return location.uri if location.scheme == "file" else uri


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/run", "shards", "x.parquet")`` -> ``"s3://b/run/shards/x.parquet"``."""
    base = uri.rstrip("/")
    return "/".join([base, *(part.strip("/") for part in parts if part)])


def is_remote(uri: str) -> bool:
    return parse_uri(uri).scheme == "s3"


# ---------------------------------------------------------------- clients


@functools.lru_cache(maxsize=8)
def _s3_client(settings: S3Settings) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        s3={"addressing_style": "path"} if settings.endpoint_url else None,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config
    )


def filesystem(uri: str, s3: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow file system and the path inside it, for Ray Data's ``filesystem=`` argument."""
    location = parse_uri(uri)
    if location.scheme == "file":
        return pafs.LocalFileSystem(), location.path
    settings = s3 or S3Settings.from_env()
    kwargs: dict[str, Any] = {
        "region": settings.region,
        "connect_timeout": settings.connect_timeout_s,
        "request_timeout": settings.read_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
    }
    if settings.endpoint_url:
        endpoint = urlparse(settings.endpoint_url)
        kwargs["scheme"] = endpoint.scheme or "https"
        kwargs["endpoint_override"] = endpoint.netloc or endpoint.path
    return pafs.S3FileSystem(**kwargs), location.path


def _s3_error(error: Exception, action: str, location: Location, settings: S3Settings) -> StorageError:
    """Translate a botocore error into a message that names the object and what to check."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
    from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError

    endpoint = settings.endpoint_url or "the default AWS endpoint"
    if isinstance(error, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)):
        return StorageError(
            f"cannot reach S3 at {endpoint} while trying to {action} {location.uri} "
            f"(gave up after {settings.max_attempts} attempts, {settings.connect_timeout_s:g}s connect "
            f"timeout): {error}. Check AWS_ENDPOINT_URL and that the store is up."
        )
    if isinstance(error, NoCredentialsError):
        return StorageError(f"no AWS credentials to {action} {location.uri}: set AWS_ACCESS_KEY_ID/"
                            f"AWS_SECRET_ACCESS_KEY or an AWS profile")
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"not found: {location.uri}")
        if code == "NoSuchBucket":
            return StorageError(f"bucket {location.bucket!r} does not exist at {endpoint} ({location.uri})")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"access denied to {action} {location.uri} ({code}): check AWS credentials")
        return StorageError(f"S3 error {code or '?'} while trying to {action} {location.uri}: {error}")
    return StorageError(f"failed to {action} {location.uri}: {error}")


def _s3_call(action: str, location: Location, settings: S3Settings | None, call: str, **kwargs: Any) -> Any:
    settings = settings or S3Settings.from_env()
    client = _s3_client(settings)
    try:
        return getattr(client, call)(**kwargs)
    except Exception as error:  # botocore raises many unrelated classes; translate them all
        raise _s3_error(error, action, location, settings) from error


# ---------------------------------------------------------------- operations


def read_bytes(uri: str, s3: S3Settings | None = None) -> bytes:
    location = parse_uri(uri)
    if location.scheme == "file":
        try:
            return Path(location.path).read_bytes()
        except FileNotFoundError as error:
            raise StorageError(f"not found: {location.path}") from error
        except OSError as error:
            raise StorageError(f"cannot read {location.path}: {error}") from error
    response = _s3_call("read", location, s3, "get_object", Bucket=location.bucket, Key=location.key)
    return response["Body"].read()


def write_bytes(uri: str, data: bytes, s3: S3Settings | None = None) -> None:
    """Atomic write: readers see the old object or the whole new one, never a part."""
    location = parse_uri(uri)
    if location.scheme == "s3":
        _s3_call("write", location, s3, "put_object", Bucket=location.bucket, Key=location.key, Body=data)
        return
    target = Path(location.path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except OSError as error:
        raise StorageError(f"cannot write {target}: {error}") from error


def read_range(uri: str, start: int, end: int, s3: S3Settings | None = None) -> bytes:
    """Bytes [start, end) of a file (fewer at its end; empty past it)."""
    location = parse_uri(uri)
    if end <= start:
        return b""
    if location.scheme == "file":
        try:
            with open(location.path, "rb") as handle:
                handle.seek(start)
                return handle.read(end - start)
        except OSError as error:
            raise StorageError(f"cannot read {location.path}: {error}") from error
    try:
        response = _s3_client(s3 or S3Settings.from_env()).get_object(
            Bucket=location.bucket, Key=location.key, Range=f"bytes={start}-{end - 1}")
    except Exception as error:
        from botocore.exceptions import ClientError

        if isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") == "InvalidRange":
            return b""
        raise _s3_error(error, "read", location, s3 or S3Settings.from_env()) from error
    return response["Body"].read()


def read_text(uri: str, s3: S3Settings | None = None) -> str:
    return read_bytes(uri, s3).decode("utf-8")


def write_text(uri: str, text: str, s3: S3Settings | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), s3)


def read_json(uri: str, s3: S3Settings | None = None) -> Any:
    try:
        return json.loads(read_text(uri, s3))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StorageError(f"{uri}: not valid JSON ({error})") from error


def write_json(uri: str, value: Any, s3: S3Settings | None = None) -> None:
    write_text(uri, json.dumps(value, indent=2, sort_keys=True) + "\n", s3)


def exists(uri: str, s3: S3Settings | None = None) -> bool:
    location = parse_uri(uri)
    if location.scheme == "file":
        return os.path.exists(location.path)
    try:
        _s3_call("check", location, s3, "head_object", Bucket=location.bucket, Key=location.key)
        return True
    except StorageError as error:
        if str(error).startswith("not found"):
            return False
        raise


def fingerprint(uri: str, s3: S3Settings | None = None) -> str:
    """Size plus modification time (local) or ETag (S3): changes when the content does."""
    location = parse_uri(uri)
    if location.scheme == "file":
        try:
            stat = os.stat(location.path)
        except OSError as error:
            raise StorageError(f"cannot stat {location.path}: {error}") from error
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    head = _s3_call("stat", location, s3, "head_object", Bucket=location.bucket, Key=location.key)
    return f"{head['ContentLength']}:{head.get('ETag', '')}"


def list_files(pattern: str, s3: S3Settings | None = None) -> list[str]:
    """Files under a prefix/folder, or matching a glob (``*``, ``?``, ``[``; ``**`` crosses
    folders), sorted. Returns URIs in the input's form (local paths or s3://)."""
    location = parse_uri(pattern)
    has_glob = any(char in location.path for char in GLOB_CHARS)
    if location.scheme == "file":
        if has_glob:
            return sorted(p for p in globlib.glob(location.path, recursive=True) if os.path.isfile(p))
        if os.path.isfile(location.path):
            return [location.path]
        return sorted(str(p) for p in Path(location.path).rglob("*") if p.is_file())
    key = location.key
    prefix = key[: min((key.find(c) for c in GLOB_CHARS if c in key), default=len(key))]
    if not has_glob and prefix and not prefix.endswith("/"):
        prefix_dir = prefix + "/"
    else:
        prefix_dir = prefix
    keys: list[str] = []
    token: str | None = None
    while True:
        kwargs = {"Bucket": location.bucket, "Prefix": prefix_dir}
        if token:
            kwargs["ContinuationToken"] = token
        page = _s3_call("list", location, s3, "list_objects_v2", **kwargs)
        keys.extend(item["Key"] for item in page.get("Contents", []))
        if not page.get("IsTruncated"):
            break
        token = page["NextContinuationToken"]
    if has_glob:
        keys = [k for k in keys if fnmatch.fnmatchcase(k, key)]
    elif prefix and not prefix.endswith("/") and exists(pattern, s3):
        keys = [key]
    return sorted(f"s3://{location.bucket}/{k}" for k in keys)


def remove_tree(uri: str, s3: S3Settings | None = None) -> None:
    """Delete a file or everything under a folder/prefix (missing is not an error)."""
    location = parse_uri(uri)
    if location.scheme == "file":
        if os.path.isdir(location.path):
            shutil.rmtree(location.path)
        elif os.path.exists(location.path):
            os.remove(location.path)
        return
    for file_uri in list_files(uri, s3):
        file_location = parse_uri(file_uri)
        _s3_call("delete", file_location, s3, "delete_object", Bucket=file_location.bucket, Key=file_location.key)


def file_sizes(folder_uri: str, s3: S3Settings | None = None) -> dict[str, int]:
    """Every file under a folder and its size in bytes, by path relative to the folder (one
    listing; no file is read). Missing folder: empty."""
    location = parse_uri(folder_uri)
    if location.scheme == "file":
        root = Path(location.path)
        if not root.is_dir():
            return {}
        return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    prefix = location.key.rstrip("/") + "/"
    sizes: dict[str, int] = {}
    token: str | None = None
    while True:
        kwargs = {"Bucket": location.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = _s3_call("list", location, s3, "list_objects_v2", **kwargs)
        sizes.update({item["Key"][len(prefix):]: int(item["Size"]) for item in page.get("Contents", [])})
        if not page.get("IsTruncated"):
            return sizes
        token = page["NextContinuationToken"]


def copy_dir_to(local_dir: str, uri: str, s3: S3Settings | None = None) -> list[str]:
    """Copy every file of a local folder to ``uri``, streaming from disk (multipart on S3), so a
    multi-GB optimizer shard never sits in memory. A failure (no space, a lost connection)
    raises StorageError naming the file; files already copied stay (their folder is incomplete
    until its owner writes a completion record)."""
    written = []
    for path in sorted(Path(local_dir).rglob("*")):
        if not path.is_file():
            continue
        target = join(uri, path.relative_to(local_dir).as_posix())
        location = parse_uri(target)
        if location.scheme == "file":
            try:
                Path(location.path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, location.path)
            except OSError as error:
                raise StorageError(f"cannot write {location.path}: {error}") from error
        else:
            _s3_call("write", location, s3, "upload_file", Filename=str(path), Bucket=location.bucket,
                     Key=location.key)
        written.append(target)
    return written


def move_tree(source_uri: str, target_uri: str, s3: S3Settings | None = None) -> None:
    """Move a folder: a rename on a local disk; on S3 a server-side copy of each object, then
    the delete of the source (no data passes through this process)."""
    source, target = parse_uri(source_uri), parse_uri(target_uri)
    if source.scheme != target.scheme:
        raise StorageError(f"cannot move {source.uri} to {target.uri}: both must be on the same storage")
    if source.scheme == "file":
        try:
            Path(target.path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(source.path, target.path)
        except OSError as error:
            raise StorageError(f"cannot move {source.path} to {target.path}: {error}") from error
        return
    for relative in file_sizes(source_uri, s3):
        src, dst = parse_uri(join(source_uri, relative)), parse_uri(join(target_uri, relative))
        # boto3's managed copy: multipart for objects over 5 GB (optimizer shards at 7B are)
        _s3_call("copy", src, s3, "copy", Bucket=dst.bucket, Key=dst.key,
                 CopySource={"Bucket": src.bucket, "Key": src.key})
    remove_tree(source_uri, s3)


def upload_dir(local_dir: str, uri: str, s3: S3Settings | None = None) -> list[str]:
    """Copy every file of a local folder to ``uri`` (one atomic write per file)."""
    written = []
    for path in sorted(Path(local_dir).rglob("*")):
        if path.is_file():
            target = join(uri, str(path.relative_to(local_dir)).replace(os.sep, "/"))
            write_bytes(target, path.read_bytes(), s3)
            written.append(target)
    return written


def download_dir(uri: str, local_dir: str, s3: S3Settings | None = None) -> str:
    """Copy every file under ``uri`` into ``local_dir``; returns ``local_dir``."""
    base = parse_uri(uri)
    files = list_files(uri, s3)
    if not files:
        raise StorageError(f"not found: nothing under {base.uri}")
    for file_uri in files:
        relative = parse_uri(file_uri).path[len(base.path):].lstrip("/") or os.path.basename(file_uri)
        target = Path(local_dir) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        location = parse_uri(file_uri)
        if location.scheme == "s3":  # streamed to disk: checkpoint shards can be many GB
            _s3_call("read", location, s3, "download_file", Bucket=location.bucket, Key=location.key,
                     Filename=str(target))
        else:
            target.write_bytes(read_bytes(file_uri, s3))
    return local_dir


@contextlib.contextmanager
def local_copy(uri: str, s3: S3Settings | None = None, only: tuple[str, ...] | None = None,
               prefix: str = "llada-") -> Iterator[str]:
    """A local folder holding the files under ``uri``: the folder itself when it is local, else a
    temporary download removed when the ``with`` ends (read inside it). ``only`` limits a
    download to these file names (those that exist), e.g. a checkpoint's small files."""
    location = parse_uri(uri)
    if location.scheme == "file":
        yield location.path
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as local:
        if only is None:
            download_dir(uri, local, s3)
        else:
            for name in only:
                source = join(uri, name)
                if exists(source, s3):
                    (Path(local) / name).write_bytes(read_bytes(source, s3))
        yield local


# ---------------------------------------------------------------- conditional writes (leases)


def read_with_etag(uri: str, s3: S3Settings | None = None) -> tuple[bytes, str]:
    """The object's bytes and a version tag (the S3 ETag; a content hash for a local file)."""
    location = parse_uri(uri)
    if location.scheme == "file":
        data = read_bytes(uri)
        return data, hashlib.sha256(data).hexdigest()
    response = _s3_call("read", location, s3, "get_object", Bucket=location.bucket, Key=location.key)
    return response["Body"].read(), response["ETag"]


def put_if_absent(uri: str, data: bytes, s3: S3Settings | None = None) -> str:
    """Create the object only if it does not exist (S3 ``If-None-Match: *``) -> its ETag;
    PreconditionFailed when it exists."""
    location = parse_uri(uri)
    if location.scheme == "file":
        raise StorageError("put_if_absent is for S3; create local files exclusively with os.O_EXCL")
    try:
        response = _s3_client(s3 or S3Settings.from_env()).put_object(
            Bucket=location.bucket, Key=location.key, Body=data, IfNoneMatch="*")
    except Exception as error:
        raise _conditional_error(error, "create", location, s3) from error
    return response["ETag"]


def put_if_match(uri: str, data: bytes, etag: str, s3: S3Settings | None = None) -> str:
    """Replace the object only if its ETag is ``etag`` -> the new ETag; PreconditionFailed otherwise."""
    location = parse_uri(uri)
    try:
        response = _s3_client(s3 or S3Settings.from_env()).put_object(
            Bucket=location.bucket, Key=location.key, Body=data, IfMatch=etag)
    except Exception as error:
        raise _conditional_error(error, "replace", location, s3) from error
    return response["ETag"]


def remove_if_unchanged(uri: str, etag: str | None, s3: S3Settings | None = None) -> None:
    """Delete the object if it is still the version ``etag`` names (S3 ``If-Match``; a local
    file's content hash); a newer version stays."""
    location = parse_uri(uri)
    if location.scheme == "file":
        try:
            if etag is None or hashlib.sha256(Path(location.path).read_bytes()).hexdigest() == etag:
                os.remove(location.path)
        except FileNotFoundError:
            pass
        return
    client = _s3_client(s3 or S3Settings.from_env())
    try:
        client.delete_object(Bucket=location.bucket, Key=location.key, **({"IfMatch": etag} if etag else {}))
    except Exception as error:
        failure = _conditional_error(error, "delete", location, s3)
        if isinstance(failure, PreconditionFailed):
            return
        raise failure from error


def _conditional_error(error: Exception, action: str, location: Location, s3: S3Settings | None) -> StorageError:
    from botocore.exceptions import ClientError

    if isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") in (
            "PreconditionFailed", "412", "ConditionalRequestConflict"):
        return PreconditionFailed(f"{location.uri} changed: the conditional {action} did not apply")
    return _s3_error(error, action, location, s3 or S3Settings.from_env())
