"""`llada serve` as a user runs it, in its own process with its own local Ray: it says it is
ready only once /ready answers, prints a curl command that works (with the API key's header),
answers it, and Ctrl-C stops it quietly (no failed-task warnings), leaving no Ray process."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
from serve_fixtures import API_KEY, API_KEY_ENV, MODEL_NAME, build_tiny_checkpoint, free_port

pytestmark = pytest.mark.integration
LLADA = str(Path(sys.executable).with_name("llada"))


def test_llada_serve_announces_when_ready_answers_its_curl_hint_and_stops_quietly(tmp_path):
    checkpoint = build_tiny_checkpoint(tmp_path / "checkpoint")
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(f"model_name: {MODEL_NAME}\nport: {port}\napi_key_env: {API_KEY_ENV}\n"
                      "sampling: {max_tokens: 8, block_length: 4}\nreplica: {num_cpus: 0.5, torch_threads: 1}\n")
    env = {**os.environ, API_KEY_ENV: API_KEY}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen([LLADA, "serve", "--checkpoint", checkpoint, "--config", str(config)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:  # ends when the process does
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        output = "".join(lines)
        assert re.search(r"\(ready in \d+\.\d s\)", output), output
        ready = requests.get(f"http://127.0.0.1:{port}/ready", timeout=30)
        assert ready.status_code == 200  # announced only once it answers
        hint = next(line for line in lines if line.strip().startswith("try: curl"))
        assert f'-H "Authorization: Bearer ${API_KEY_ENV}"' in hint and API_KEY not in hint
        curl = subprocess.run(["bash", "-c", hint.strip().removeprefix("try: ") + " -s -o /dev/null -w '%{http_code}'"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert curl.stdout == "200", (curl.stdout, curl.stderr, shlex.quote(hint))
    finally:
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=180)
    assert process.returncode == 0, rest
    assert "stopping ..." in rest and "stopped" in rest
    assert "failed" not in rest.lower() and "Traceback" not in rest, rest
    assert not _session_processes(process.pid, wait_s=30), "Ray processes outlived `llada serve`"


def _session_processes(session: int, wait_s: float) -> list[int]:
    """Processes still in the command's session (its local Ray) after up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for candidate in psutil.process_iter():
            try:
                if os.getsid(candidate.pid) == session and candidate.status() != psutil.STATUS_ZOMBIE:
                    alive.append(candidate.pid)
            except (OSError, psutil.Error):
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)
