"""One driver per run: a lease taken before any work and held, with a heartbeat, until the
command ends.

Two `llada run` drivers on one run folder would train every stage twice into the same folders,
write false records when their configs differ, and one's rotation would delete checkpoints the
other is scoring; a retried RayJob whose old driver still lives is that case. So a driver first
takes ``{run}/driver.lease.json``:

- local storage: the file is created exclusively (``O_CREAT | O_EXCL``);
- S3: a conditional PUT (``If-None-Match: *``), so of two drivers exactly one succeeds; the
  heartbeat rewrites it only if it is still ours (``If-Match`` on our ETag).

The lease names its holder (host, pid, command, start) and is refreshed every ``HEARTBEAT_S``.
One whose heartbeat is older than ``EXPIRY_S``, or whose holder ran on this host and is gone, is
stale: it is taken over, with a line naming the old holder. A live one refuses the new driver
with a message naming the holder and how to break the lease (``--break-lease``) if that driver
is known to be dead.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from pipelines import storage

LEASE_FILE = "driver.lease.json"
HEARTBEAT_S = 30.0
EXPIRY_S = 180.0  # six missed heartbeats


class LeaseHeld(RuntimeError):
    """Another driver holds the run; the message names it and how to break a stale lease."""


@dataclass
class Lease:
    uri: str
    holder: dict[str, Any]
    etag: str | None = None  # S3: the ETag of our last write


def _holder(command: str) -> dict[str, Any]:
    now = time.time()
    return {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "command": command,
            "started_at": now, "heartbeat_at": now}


def describe(holder: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    return (f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command', '?')}), started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(holder.get('started_at', 0)))} UTC, last heartbeat "
            f"{now - holder.get('heartbeat_at', 0):.0f} s ago")


def is_stale(holder: dict[str, Any], now: float | None = None) -> str | None:
    """Why the holder is gone (a heartbeat older than EXPIRY_S, or a pid that no longer runs on
    this host), else None."""
    now = time.time() if now is None else now
    age = now - float(holder.get("heartbeat_at", 0))
    if age > EXPIRY_S:
        return f"its last heartbeat was {age:.0f} s ago (expiry {EXPIRY_S:.0f} s)"
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
        return f"its process {holder.get('pid')} no longer runs on this host"
    return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------ one backend per storage kind


def _create_local(path: str, holder: dict[str, Any]) -> bool:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as handle:
        json.dump(holder, handle)
    return True


def _create_s3(uri: str, holder: dict[str, Any], s3: storage.S3Settings | None) -> str | None:
    """The new object's ETag, or None when the lease already exists."""
    try:
        return storage.put_if_absent(uri, json.dumps(holder).encode(), s3)
    except storage.PreconditionFailed:
        return None


def _read(uri: str, s3: storage.S3Settings | None) -> tuple[dict[str, Any] | None, str | None]:
    try:
        body, etag = storage.read_with_etag(uri, s3)
    except storage.StorageError:
        return None, None  # released between our create and this read
    try:
        return json.loads(body), etag
    except json.JSONDecodeError:
        return {"heartbeat_at": 0, "host": "?", "pid": -1, "command": "unreadable lease"}, etag


def acquire(run_uri: str, command: str, s3: storage.S3Settings | None = None, break_lease: bool = False,
            say: Callable[[str], None] = print) -> Lease:
    """Take the run's lease or raise LeaseHeld."""
    uri = storage.join(run_uri, LEASE_FILE)
    remote = storage.is_remote(uri)
    for _ in range(3):  # a stale lease is removed, then created again; a racing driver may win
        holder = _holder(command)
        if remote:
            etag = _create_s3(uri, holder, s3)
            if etag is not None:
                return Lease(uri, holder, etag)
        elif _create_local(storage.parse_uri(uri).path, holder):
            return Lease(uri, holder)
        current, etag = _read(uri, s3)
        if current is None:
            continue
        stale = is_stale(current)
        if stale is None and not break_lease:
            raise LeaseHeld(f"run {run_uri} is being run by another driver: {describe(current)}. Wait for it to "
                            f"finish, or, if that driver is gone, rerun with --break-lease (or delete {uri})")
        say(f"[lease] taking over {uri} from {describe(current)}: "
            f"{stale or 'broken on request (--break-lease)'}")
        storage.remove_if_unchanged(uri, etag, s3)
    raise LeaseHeld(f"run {run_uri}: another driver took the lease while this one was breaking a stale one; "
                    "check which drivers run")


def heartbeat(lease: Lease, s3: storage.S3Settings | None = None) -> bool:
    """Refresh the lease; False when it is no longer ours (broken by another driver)."""
    current, etag = _read(lease.uri, s3)
    if current is None or current.get("id") != lease.holder["id"]:
        return False
    lease.holder["heartbeat_at"] = time.time()
    body = json.dumps(lease.holder).encode()
    if storage.is_remote(lease.uri):
        try:
            lease.etag = storage.put_if_match(lease.uri, body, etag, s3)
        except storage.PreconditionFailed:
            return False
    else:
        storage.write_bytes(lease.uri, body, s3)
    return True


def release(lease: Lease, s3: storage.S3Settings | None = None) -> None:
    current, etag = _read(lease.uri, s3)
    if current is not None and current.get("id") == lease.holder["id"]:
        storage.remove_if_unchanged(lease.uri, etag, s3)


@contextlib.contextmanager
def run_lease(run_uri: str, command: str, s3: storage.S3Settings | None = None, break_lease: bool = False,
              say: Callable[[str], None] = print, heartbeat_s: float = HEARTBEAT_S) -> Iterator[Lease]:
    """Hold the run's lease while the block runs (heartbeat thread; released at the end)."""
    lease = acquire(run_uri, command, s3, break_lease, say)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            try:
                if not heartbeat(lease, s3):
                    say(f"[lease] {lease.uri} was taken by another driver; this driver no longer owns the run")
                    return
            except Exception as error:  # storage hiccups: the next beat tries again
                print(f"lease heartbeat failed: {error}", file=sys.stderr)

    thread = threading.Thread(target=beat, name="llada-lease", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            release(lease, s3)
