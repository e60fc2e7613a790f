"""The start-up and shutdown of `llada serve` (serve/cli.py) without starting Ray: the hint it
prints, the wait for readiness, and a Ray that cannot be reached."""

from __future__ import annotations

import http.server
import threading

import ray

from serve.cli import _serve_until_interrupted, http_probe, probe_base, try_command, wait_until_ready
from serve.config import AppArgs, ServeConfig


def test_the_try_command_sends_the_api_key_by_its_variable_never_the_key(monkeypatch):
    monkeypatch.setenv("LLADA_API_KEY", "s3cret")
    command = try_command(ServeConfig(api_key_env="LLADA_API_KEY", port=8080))
    assert '-H "Authorization: Bearer $LLADA_API_KEY"' in command and "s3cret" not in command
    assert command.startswith("curl http://127.0.0.1:8080/v1/completions ")
    assert "Authorization" not in try_command(ServeConfig())


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_start_up_waits_until_ready_answers_and_gives_up_at_the_timeout():
    clock, answers = FakeClock(), iter([False, False, True])
    assert wait_until_ready(lambda: next(answers), 10.0, poll_s=1.0, clock=clock, sleep=clock.sleep)
    assert clock.now == 2.0  # two polls in vain, then ready
    clock = FakeClock()
    assert not wait_until_ready(lambda: False, 10.0, poll_s=1.0, clock=clock, sleep=clock.sleep)
    assert clock.now == 10.0


def readiness_server(statuses: list[int]) -> http.server.HTTPServer:
    """A server on loopback whose GETs answer ``statuses`` in turn (the last one from then on)."""

    class Readiness(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the handler's API)
            self.send_response(statuses.pop(0) if len(statuses) > 1 else statuses[0])
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    return http.server.HTTPServer(("127.0.0.1", 0), Readiness)


def test_the_readiness_probe_is_true_only_on_200_and_false_when_nothing_listens():
    server = readiness_server([503, 200])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        probe = http_probe(f"{probe_base(ServeConfig(host='0.0.0.0', port=server.server_port))}/ready")
        assert [probe(), probe()] == [False, True]  # 503 while the replicas load, then 200
    finally:
        server.shutdown()
        server.server_close()
    assert not http_probe(f"http://127.0.0.1:{server.server_port}/ready", timeout_s=2.0)()


def test_a_ray_that_cannot_be_reached_is_one_line_naming_its_address(tmp_path, monkeypatch, capsys):
    def unreachable(**_) -> None:
        raise ConnectionError("Could not find any running Ray instance.\nPlease specify the one to connect to.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", unreachable)
    (tmp_path / "config.json").write_text("{}")
    app_args = AppArgs(checkpoint=str(tmp_path), config=ServeConfig())
    assert _serve_until_interrupted(app_args, "ray://10.1.2.3:10001") == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "ray://10.1.2.3:10001" in error
    assert error.startswith("llada serve: cannot start or reach Ray at ray://10.1.2.3:10001: Could not find")
