"""Shared session fixtures.

- ``ray_cluster``: ONE local Ray instance per test session (2 CPUs, no dashboard), started
  lazily by the first test that asks for it. Unit tests never ask for it. Its metrics agent
  serves Prometheus on 127.0.0.1:``RAY_METRICS_PORT`` (the serving tests scrape it).
- ``s3_server``: a real S3-protocol server (moto's server mode) on 127.0.0.1, started once per
  session; per test it sets the AWS environment (endpoint, region, fake credentials) and
  yields an :class:`S3Server` with the endpoint URL and bucket helpers.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import Iterator

import pytest

# Fake credentials for the local S3 server. Ray workers get them through the runtime
# environment because they may start before a test sets os.environ.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


RAY_METRICS_PORT = free_port()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict]:
    """Start (once) and yield the local Ray cluster's resources; shut it down at session end."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": dict(FAKE_AWS_ENV)},
            _metrics_export_port=RAY_METRICS_PORT,
        )
    # Keep Ray Data's progress bars out of test logs.
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    yield ray.cluster_resources()
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_metrics_url(ray_cluster: dict) -> str:
    """The Prometheus endpoint of the session cluster's metrics agent."""
    return f"http://127.0.0.1:{RAY_METRICS_PORT}/metrics"


@dataclass
class S3Server:
    """A running S3-protocol server: ``endpoint_url``, ``settings`` (pipelines.storage.S3Settings
    with short timeouts), and ``bucket()`` to create a fresh bucket and get its ``s3://`` URI."""

    endpoint_url: str

    @property
    def settings(self):  # type: ignore[no-untyped-def]
        from pipelines.storage import S3Settings

        return S3Settings(endpoint_url=self.endpoint_url, region="us-east-1",
                          connect_timeout_s=1.0, read_timeout_s=10.0, max_attempts=2)

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def _moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    saved = {key: os.environ.get(key) for key in FAKE_AWS_ENV}
    os.environ.update(FAKE_AWS_ENV)  # moto's own boto calls need credentials too
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_server(_moto_server: str, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The session's S3 server, with the AWS environment pointing at it for this test."""
    for key, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", _moto_server)
    monkeypatch.setenv("LLADA_S3_CONNECT_TIMEOUT_S", "1")
    monkeypatch.setenv("LLADA_S3_MAX_ATTEMPTS", "2")
    return S3Server(endpoint_url=_moto_server)


@pytest.fixture
def s3_unreachable(monkeypatch: pytest.MonkeyPatch) -> str:
    """An S3 endpoint URL on 127.0.0.1 where nothing listens ("S3 is down"), with the AWS
    environment pointing at it and short timeouts, for clear-error tests."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    for key, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("LLADA_S3_CONNECT_TIMEOUT_S", "0.5")
    monkeypatch.setenv("LLADA_S3_MAX_ATTEMPTS", "2")
    return endpoint


@pytest.fixture(scope="session")
def answering_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny model trained (about 8 s, once per session) to answer a few chat questions and stop
    with <|role_end|> and EOS mid-block, saved in the HF layout with its tokenizer
    (tests/answering_model.py)."""
    from answering_model import save_answering_checkpoint

    return save_answering_checkpoint(tmp_path_factory.mktemp("answering-model"))
