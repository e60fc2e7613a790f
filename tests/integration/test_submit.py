"""`llada submit` against a real Ray head that this module starts (`ray start --head --block` on
127.0.0.1, with the dashboard's job server and token authentication), through the same CLI a
user runs: a stage that succeeds, one that fails with a clear message, and a missing token."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from serve_fixtures import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RECIPE = "jobs/recipes/tiny-cpu.yaml"
# One short pretraining stage on a small corpus: the job prepares data, trains 4 steps, scores.
SMALL_RUN = [
    "stages.pretrain1.num_steps=4", "stages.pretrain1.checkpoint_every=4", "stages.pretrain1.schedule.warmup_steps=1",
    "data.corpus.num_text_docs=300", "data.corpus.num_math_docs=200", "data.corpus.num_code_docs=100",
    "data.corpus.num_anneal_docs=100", "data.corpus.num_sft_chats=100", "data.vocab_size=512",
]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> Iterator[dict]:
    """A separate Ray head (its own ports, temp dir and token) for the job server."""
    token = secrets.token_hex(32)
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(token)
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # Ray's socket paths must stay short
    dashboard_port, gcs_port = free_port(), free_port()
    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         # Every port of its own: the session's Ray instance already holds the defaults (a second
         # dashboard agent on 52365 fails to bind, and the head then never takes a job).
         *(f"--{name}={free_port()}" for name in (
             "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")),
         "--min-worker-port=21000", "--max-worker-port=21999",
         "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env={**os.environ, **auth_env}, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(f"{address}/api/version", timeout=2,
                            headers={"Authorization": f"Bearer {token}"}).status_code == 200:
                break
        except requests.RequestException:
            pass
        if head.poll() is not None or time.monotonic() > deadline:
            head.kill()
            pytest.fail(f"the Ray head did not start (exit {head.poll()}); logs under {temp_dir}")
        time.sleep(1)
    wait_for_a_job_to_run(address, token, head, temp_dir)
    yield {"address": address, "gcs_address": f"127.0.0.1:{gcs_port}", "auth_env": auth_env}
    os.killpg(head.pid, signal.SIGTERM)  # --block stops the head's processes on SIGTERM
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_a_job_to_run(address: str, token: str, head: subprocess.Popen, temp_dir: str) -> None:
    """The dashboard answers before the head's job agent takes jobs: run `true` as a job first."""
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + 180
    job_id = None
    while time.monotonic() < deadline and head.poll() is None:
        try:  # the first submission can block while the head starts its job agent
            if job_id is None:
                reply = requests.post(f"{address}/api/jobs/", json={"entrypoint": "true"}, headers=headers,
                                      timeout=60)
                job_id = reply.json().get("job_id") if reply.status_code == 200 else None
            elif requests.get(f"{address}/api/jobs/{job_id}", headers=headers, timeout=30).json()["status"] == "SUCCEEDED":
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    pytest.fail(f"the Ray head at {address} ran no job within 180 s; logs under {temp_dir}")


def llada(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "llada"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def client_env(tmp_path: Path, extra: dict[str, str]) -> dict[str, str]:
    """The user's environment: no Ray address or token but what the test gives (HOME is empty,
    so no ~/.ray/auth_token is found)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    return {**env, "HOME": str(tmp_path), **extra}


def test_submit_runs_a_stage_as_a_ray_job_and_follows_its_logs(ray_head, tmp_path):
    storage = tmp_path / "runs"
    sets = [arg for item in [f"storage_uri={storage}", *SMALL_RUN] for arg in ("--set", item)]
    env = client_env(tmp_path, ray_head["auth_env"])
    result = llada("submit", RECIPE, "--address", ray_head["address"], "--stage", "pretrain1", *sets,
                   "--working-dir", str(ROOT), "--follow", env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "submitted job raysubmit_" in output
    assert "[pretrain1] step 4/4" in output  # the workers' progress, streamed by --follow
    assert result.stdout.rstrip().endswith("SUCCEEDED")
    assert_quiet(result.stdout)  # the job's log is the driver's console: no Ray noise there either
    status = llada("status", RECIPE, *sets, "--json", env=env, timeout=120)  # the same run: the same overrides
    stages = {row["stage"]: row for row in json.loads(status.stdout)["stages"]}
    assert stages["pretrain1"]["state"] == "done"
    assert stages["pretrain1"]["selected"]["step"] == 4
    assert stages["pretrain2"]["state"] == "not started"


def test_a_failing_job_exits_non_zero_with_the_reason(ray_head, tmp_path):
    env = client_env(tmp_path, ray_head["auth_env"])
    result = llada("submit", RECIPE, "--address", ray_head["address"], "--stage", "sft",
                   "--set", f"storage_uri={tmp_path / 'empty'}", "--working-dir", str(ROOT), "--follow", env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "stage 'anneal2' has no selection record" in output
    assert result.stdout.rstrip().endswith("FAILED")


def test_a_missing_token_is_named(ray_head, tmp_path):
    result = llada("submit", RECIPE, "--address", ray_head["address"], "--working-dir", str(ROOT),
                   env=client_env(tmp_path, {}), timeout=120)
    assert result.returncode == 1
    assert "could not submit" in result.stderr and "RAY_AUTH_TOKEN" in result.stderr


# What the console keeps off the terminal: Ray's and DeepSpeed's own lines, and the workers'
# output that Ray forwards with a "(ActorName pid=...)" prefix.
RAY_NOISE = ("Failed to query Ray Train Controller", "core_worker", "(RayTrainWorker", "(TrainController",
             "(PlacementGroupCleaner", "[WARNING]", "WARNING", "Started a local Ray instance", "streaming_executor")


def assert_quiet(stdout: str) -> None:
    lines = [line for line in stdout.splitlines() if line.strip()]
    repeated = sorted({line for line in lines if lines.count(line) > 1 and not set(line) <= set("-= ")})
    assert not repeated, f"lines printed more than once: {repeated[:5]}"
    noisy = [line for line in lines if any(marker in line for marker in RAY_NOISE)]
    assert not noisy, f"Ray/DeepSpeed lines on the terminal: {noisy[:5]}"


def test_a_run_prints_each_platform_line_once_and_routes_ray_output_to_the_run_log(ray_head, tmp_path):
    """`llada run` as a user types it (no terminal here, so progress is plain lines): platform lines
    once, no Ray warning or forwarded worker line, and everything else in logs/ of the run folder."""
    storage = tmp_path / "runs"
    sets = [arg for item in [f"storage_uri={storage}", *SMALL_RUN] for arg in ("--set", item)]
    env = client_env(tmp_path, ray_head["auth_env"])
    result = llada("run", RECIPE, "--stage", "pretrain1", *sets, "--ray-address", ray_head["gcs_address"], env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert_quiet(result.stdout)
    assert not result.stderr.strip(), result.stderr[-2000:]
    lines = result.stdout.splitlines()
    [log_line] = [line for line in lines if line.startswith("logs: ")]
    log_path = Path(log_line.split()[1])
    assert log_path.parent == storage / "tiny-cpu" / "logs"
    for expected in ("[dag] pretrain1: training (pretrain)", "[pretrain1] step 4/4", "[dag] pretrain1: selected"):
        assert any(line.startswith(expected) for line in lines), expected
    assert any(line.startswith("stage ") and line.rstrip().endswith("selected") for line in lines)  # the table
    assert any(line.startswith("pretrain1    done") for line in lines)
    log = log_path.read_text()
    assert "(RayTrainWorker" in log or "(TrainController" in log, "Ray's forwarded output belongs in the log"
