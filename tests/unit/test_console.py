"""The `llada` console (llada/console.py): platform lines once on the terminal, everything else a
process writes (Python prints, C-level writes to fd 1 and 2, logging) in the log file, an escaping
exception named on the terminal with its traceback in the log, progress without a terminal as
plain lines. Routing works on the process's real file descriptors, so it runs in a subprocess."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

from llada.console import Console

ROOT = Path(__file__).resolve().parents[2]


def run_script(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_only_platform_lines_reach_the_terminal_and_the_rest_goes_to_the_log(tmp_path):
    log = tmp_path / "run" / "logs" / "llada-run.log"
    done = run_script(f"""
        import logging, os, sys
        from llada.console import Console

        console = Console()
        with console.routed({str(log)!r}):
            console.say("[dag] pretrain1: training (pretrain)")
            print("(RayTrainWorker pid=1) a worker line Ray forwards")
            os.write(2, b"[2026-12-02 E core_worker.cc:2465] a C++ log line\\n")
            logging.getLogger("ray").warning("Token authentication is enabled")
            console.error("llada run: a platform error")
        print("after the command: the terminal again")
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"logs: {log} (Ray, Ray Data and DeepSpeed output; --verbose shows it here)",
        "[dag] pretrain1: training (pretrain)",
        "after the command: the terminal again",
    ]
    assert done.stderr.splitlines() == ["llada run: a platform error"]
    text = log.read_text()
    for stray in ("a worker line Ray forwards", "a C++ log line", "Token authentication is enabled"):
        assert stray in text


def test_an_escaping_exception_is_named_on_the_terminal_with_its_traceback_in_the_log(tmp_path):
    log = tmp_path / "crash.log"
    done = run_script(f"""
        from llada.console import Console

        with Console().routed({str(log)!r}):
            raise RuntimeError("the cluster went away")
    """, tmp_path)
    assert done.returncode == 1
    assert "llada: RuntimeError: the cluster went away" in done.stderr and str(log) in done.stderr
    assert "Traceback" not in done.stderr
    assert "Traceback" in log.read_text() and "the cluster went away" in log.read_text()


def test_verbose_routes_nothing(tmp_path):
    log = tmp_path / "verbose.log"
    done = run_script(f"""
        from llada.console import Console

        console = Console(verbose=True)
        with console.routed({str(log)!r}):
            console.say("platform")
            print("library output")
    """, tmp_path)
    assert done.stdout.splitlines() == ["platform", "library output"] and not log.exists()


def row(step: int, num_steps: int = 100, stage: str = "pretrain1") -> dict:
    return {"stage": stage, "step": step, "num_steps": num_steps, "loss": 3.0 - step / 100, "tokens_per_s": 4000.0}


def test_without_a_terminal_progress_is_a_few_plain_lines_each_printed_once():
    out = io.StringIO()
    console = Console(out=out, err=io.StringIO())
    for step in range(1, 101):
        console.step(row(step))
    console.say("[dag] pretrain1: selected step 100")
    for step in range(41, 61):  # a resumed stage starts where it stopped
        console.step(row(step, num_steps=60, stage="sft"))
    lines = out.getvalue().splitlines()
    assert lines == ["[pretrain1] step 1/100 loss 2.9900 4000 tok/s", "[pretrain1] step 100/100 loss 2.0000 4000 tok/s",
                     "[dag] pretrain1: selected step 100", "[sft] step 41/60 loss 2.5900 4000 tok/s",
                     "[sft] step 60/60 loss 2.4000 4000 tok/s"]
    assert len(lines) == len(set(lines))
