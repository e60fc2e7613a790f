"""Autoscaling and roll-outs, live (benchmarks/autoscale.py --quick, in its own process with its
own local Ray cluster of two nodes): a burst of closed-loop clients makes Serve start the second
sampler replica, which answers; after the burst Serve removes it; `llada serve --detach` rolls
out a second checkpoint while clients keep asking. Asserted on Serve's own status (replica
counts over time) and on every request's outcome, not on timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "autoscale.py"


def test_replicas_scale_up_and_down_and_a_rollout_loses_no_request(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    plot = tmp_path / "replicas.png"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--clients", "8", "--plot", str(plot),
                             "--details", str(tmp_path / "details.json")],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    details = json.loads((tmp_path / "details.json").read_text())
    replicas = details["replicas"]
    burst, rollout = figures["timeline"]["burst"], figures["timeline"]["rollout"]

    # Serve's status: one replica before the burst, two during it, one again after the cool-down.
    assert [r["running"] for r in replicas if r["t"] < burst[0]][-1] == 1
    assert figures["max_running_replicas_burst"] == 2
    assert figures["running_replicas_end_of_cool_down"] == 1
    assert figures["second_replica_first_answer_s"] is not None  # a request was answered by the second one
    # No request lost anywhere; a refusal is a 503 with Retry-After.
    assert figures["lost"] == {"burst": 0, "cool-down": 0, "roll-out": 0}, figures
    assert all(o["status"] == 200 or (o["status"] == 503 and o["retry_after"]) for o in details["outcomes"])
    # Never fewer than one running replica, the roll-out included (old replicas serve until the new are up).
    assert min(r["running"] for r in replicas if r["t"] >= burst[0]) >= 1
    assert figures["refused_503"]["roll-out"] == 0 and figures["answered"]["roll-out"] == figures["requests"]["roll-out"]

    # The roll-out: each answer names its checkpoint, and the two checkpoints answer differently.
    label_a, label_b = figures["checkpoints"]
    answers = figures["answers_per_checkpoint"]
    assert set(answers) == {label_a, label_b} and len(answers[label_a]) == len(answers[label_b]) == 1
    assert answers[label_a] != answers[label_b]
    assert figures["rollout_old_answers_after_start"] >= 1  # the old model served while the new one loaded
    assert figures["rollout_new_answers"] >= 1 and figures["rollout_old_answers_after_done"] == 0
    assert all(o["checkpoint"] == label_a for o in details["outcomes"] if o["ended"] < rollout[0])
    assert plot.read_bytes()[:4] == b"\x89PNG"
