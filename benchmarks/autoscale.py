"""Autoscaling and roll-outs, live, on a local Ray cluster of two nodes.

    python benchmarks/autoscale.py [--clients 8] [--plot benchmarks/results/autoscale-replicas.png]

Serves a tiny random checkpoint A with `llada serve --detach` (min 1, max 2 sampler replicas,
short autoscaling delays), then:

1. **burst**: closed-loop clients (each sends its next request as soon as the last returns) until
   a second replica has answered and the replica count held for a while (bounded);
2. **cool-down**: one client while Serve scales back to one replica (bounded);
3. **roll-out**: a few clients while `llada serve --detach` rolls out checkpoint B over A.

Serve's own status (the sampler's replicas by state) is sampled every 0.25 s throughout. Every
request's outcome is recorded: 200 with the checkpoint and replica that answered (the
X-LLaDA-Checkpoint / X-LLaDA-Replica headers), 503 with Retry-After (refused: the client may
retry), or lost (any other status, no Retry-After, a connection error or a timeout). The two
checkpoints answer the same prompt differently, so each answer also proves which model made it.

Ray's autoscaling defaults apply except the deployment's own delays: replicas push their load
every 10 s (RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S), which bounds how soon a burst is
seen. Ends with one JSON line of the figures; tests/integration/test_autoscale.py runs it and
asserts on that line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLADA = str(Path(sys.executable).with_name("llada"))
PROMPT = "the cat sat on the"
MAX_TOKENS = 48


@dataclass
class Outcome:
    phase: str
    started: float  # seconds since the benchmark's clock started
    ended: float
    status: int | None  # None: no HTTP answer (connection error, timeout)
    retry_after: bool
    checkpoint: str | None
    replica: str | None
    text: str | None

    @property
    def lost(self) -> bool:
        return not (self.status == 200 or (self.status == 503 and self.retry_after))


def tiny_checkpoint(directory: Path, seed: int) -> str:
    """A random tiny LLaDA-MoE (4 layers, 128 wide: a few ms per forward) with sharpened logits
    and a small BPE tokenizer, exported in the HF layout. Two seeds answer differently."""
    import torch

    from llada_core import LLaDAMoEModelLM, preset, save_model
    from pipelines.tokenizer import save_tokenizer, train_bpe

    texts = ["the cat sat on the mat", "a dog ran in the park", "one two three four five six seven"] * 20
    tokenizer = train_bpe(texts, vocab_size=300, min_frequency=1)
    torch.manual_seed(seed)
    config = preset("tiny", vocab_size=320, max_position_embeddings=512)
    model = LLaDAMoEModelLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    save_model(model, directory)
    save_tokenizer(tokenizer, str(directory))
    return str(directory)


def serve_config(port: int, quick: bool) -> str:
    return json.dumps({
        "model_name": "tiny", "port": port, "request_timeout_s": 60,
        # the reference loop: one forward per answer token, so a request keeps a replica busy
        "sampling": {"max_tokens": MAX_TOKENS, "block_length": 16, "threshold": None, "cache": None,
                     "early_stop": False},
        "batching": {"max_batch_size": 4}, "limits": {"max_prompts_per_request": 4},
        "replica": {"num_cpus": 1, "torch_threads": 1, "max_ongoing_requests": 8, "max_queued_requests": 64},
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                        "upscale_delay_s": 2 if quick else 5, "downscale_delay_s": 5 if quick else 20,
                        "look_back_period_s": 12},  # Ray wants it above its 10 s metrics interval
        "rollout": {"max_surge_percent": 100},
    })


class Recorder:
    def __init__(self) -> None:
        self.clock = time.monotonic()
        self.outcomes: list[Outcome] = []
        self.replicas: list[dict[str, Any]] = []  # {"t", "running", "total"}
        self.lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.clock


def ask(base: str, phase: str, recorder: Recorder, session: requests.Session) -> Outcome:
    started = recorder.now()
    status, retry_after, checkpoint, replica, text = None, False, None, None, None
    try:
        response = session.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": PROMPT}, timeout=90)
        status, retry_after = response.status_code, "Retry-After" in response.headers
        checkpoint = response.headers.get("X-LLaDA-Checkpoint")
        replica = response.headers.get("X-LLaDA-Replica")
        if status == 200:
            text = response.json()["choices"][0]["text"]
    except requests.RequestException:
        pass
    outcome = Outcome(phase, started, recorder.now(), status, retry_after, checkpoint, replica, text)
    with recorder.lock:
        recorder.outcomes.append(outcome)
    return outcome


class Clients:
    """``count`` closed-loop clients in ``phase`` until stopped; a refused request (503) waits
    its Retry-After as a client should (0.2 s here, so refusals still probe the server)."""

    def __init__(self, base: str, recorder: Recorder, phase: str, count: int) -> None:
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(base, recorder, phase), daemon=True)
                        for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _loop(self, base: str, recorder: Recorder, phase: str) -> None:
        with requests.Session() as session:
            while not self.stop.is_set():
                if ask(base, phase, recorder, session).status == 503:
                    time.sleep(0.2)

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


def watch_replicas(recorder: Recorder, stop: threading.Event) -> None:
    """Serve's status of the sampler every 0.25 s: running replicas and all (starting, stopping)."""
    from ray import serve

    from serve.app import APP_NAME, SAMPLER_NAME

    while not stop.is_set():
        try:
            states = serve.status().applications[APP_NAME].deployments[SAMPLER_NAME].replica_states
            row = {"t": round(recorder.now(), 2), "running": states.get("RUNNING", 0),
                   "total": sum(states.values())}
            with recorder.lock:
                recorder.replicas.append(row)
        except Exception:  # the app is being (re)deployed
            pass
        stop.wait(0.25)


def deploy(checkpoint: str, config_file: str, address: str) -> float:
    started = time.perf_counter()
    result = subprocess.run([LLADA, "serve", "--checkpoint", checkpoint, "--config", config_file,
                             "--ray-address", address, "--detach"], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"llada serve --detach failed:\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from llada.cluster import free_port, local_cluster
    from serve.checkpoint import checkpoint_label

    work = Path(tempfile.mkdtemp(prefix="llada-autoscale-"))
    checkpoint_a = tiny_checkpoint(work / "ckpt-a", seed=1)
    checkpoint_b = tiny_checkpoint(work / "ckpt-b", seed=2)
    port = free_port()
    config_file = work / "serve.json"  # JSON is YAML
    config_file.write_text(serve_config(port, args.quick))
    base = f"http://127.0.0.1:{port}"
    recorder = Recorder()
    figures: dict[str, Any] = {}
    with local_cluster(2, cpus_per_node=3.0) as address:
        ray.init(address=address, log_to_driver=False)
        figures["deploy_s"] = round(deploy(checkpoint_a, str(config_file), address), 1)
        stop_watch = threading.Event()
        watcher = threading.Thread(target=watch_replicas, args=(recorder, stop_watch), daemon=True)
        watcher.start()
        deadline = time.monotonic() + 60
        while not recorder.replicas and time.monotonic() < deadline:  # the first status before any load
            time.sleep(0.1)
        with requests.Session() as session:
            first_replica = ask(base, "warm-up", recorder, session).replica

        # 1. burst until a second replica answered and held a while (bounded)
        burst_start = recorder.now()
        clients = Clients(base, recorder, "burst", args.clients)
        second_answer = None
        while recorder.now() - burst_start < args.max_burst_s:
            with recorder.lock:
                second_answer = min((o.ended for o in recorder.outcomes
                                     if o.phase == "burst" and o.replica not in (None, first_replica)), default=None)
            if second_answer is not None and recorder.now() - second_answer >= args.hold_s:
                break
            time.sleep(0.25)
        clients.join()
        burst_end = recorder.now()
        figures["second_replica_first_answer_s"] = None if second_answer is None else round(
            second_answer - burst_start, 1)

        # 2. cool-down with one client until Serve is back to one replica (bounded)
        clients = Clients(base, recorder, "cool-down", 1)
        cool_start = recorder.now()
        while recorder.now() - cool_start < args.max_cool_s:
            with recorder.lock:
                last = recorder.replicas[-4:]  # one running replica and nothing stopping, for a second
                settled = len(last) == 4 and all(r["total"] == r["running"] == 1 for r in last)
            if settled:
                break
            time.sleep(0.25)
        time.sleep(1.0)
        clients.join()
        cool_end = recorder.now()
        figures["scale_down_s"] = round(cool_end - cool_start, 1)

        # 3. roll-out of checkpoint B under load
        clients = Clients(base, recorder, "roll-out", args.rollout_clients)
        time.sleep(2.0)
        rollout_start = recorder.now()
        figures["rollout_s"] = round(deploy(checkpoint_b, str(config_file), address), 1)
        rollout_done = recorder.now()
        time.sleep(3.0)
        clients.join()
        stop_watch.set()
        watcher.join(timeout=10)
        from ray import serve

        serve.shutdown()  # the cluster's end disconnects this driver too

    outcomes = recorder.outcomes
    by_phase = {phase: [o for o in outcomes if o.phase == phase] for phase in ("burst", "cool-down", "roll-out")}
    texts: dict[str, set[str]] = {}
    for o in outcomes:
        if o.status == 200 and o.checkpoint:
            texts.setdefault(o.checkpoint, set()).add(o.text or "")
    rollout = by_phase["roll-out"]
    label_a, label_b = checkpoint_label(checkpoint_a), checkpoint_label(checkpoint_b)
    figures.update({
        "checkpoints": [label_a, label_b],
        "requests": {phase: len(items) for phase, items in by_phase.items()},
        "answered": {phase: sum(o.status == 200 for o in items) for phase, items in by_phase.items()},
        "refused_503": {phase: sum(o.status == 503 and o.retry_after for o in items) for phase, items in by_phase.items()},
        "lost": {phase: sum(o.lost for o in items) for phase, items in by_phase.items()},
        "max_running_replicas_burst": max((r["running"] for r in recorder.replicas
                                           if burst_start <= r["t"] <= burst_end), default=0),
        "running_replicas_end_of_cool_down": running_at_time(recorder, cool_end),
        "answers_per_checkpoint": {label: sorted(values) for label, values in texts.items()},
        # old answers to requests sent after the roll-out began: the old replicas kept serving
        "rollout_old_answers_after_start": sum(o.checkpoint == label_a for o in rollout if o.started >= rollout_start),
        "rollout_new_answers": sum(o.checkpoint == label_b for o in rollout),
        "rollout_old_answers_after_done": sum(o.checkpoint == label_a for o in rollout if o.started > rollout_done),
        "timeline": {"burst": [round(burst_start, 1), round(burst_end, 1)],
                     "cool_down": [round(cool_start, 1), round(cool_end, 1)],
                     "rollout": [round(rollout_start, 1), round(rollout_done, 1)]},
        "replica_samples": len(recorder.replicas),
    })
    if args.plot:
        plot(recorder, figures, args.plot)
        figures["plot"] = args.plot
    if args.details:
        Path(args.details).write_text(json.dumps({"replicas": recorder.replicas,
                                                  "outcomes": [asdict(o) for o in outcomes]}))
    return figures


def running_at_time(recorder: Recorder, t: float) -> int:
    before = [r for r in recorder.replicas if r["t"] <= t]
    return before[-1]["running"] if before else 0


def plot(recorder: Recorder, figures: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3))
    times = [r["t"] for r in recorder.replicas]
    axis.step(times, [r["total"] for r in recorder.replicas], where="post", label="replicas (all states)",
              color="tab:gray", alpha=0.6)
    axis.step(times, [r["running"] for r in recorder.replicas], where="post", label="running replicas",
              color="tab:blue")
    colors = {"burst": "tab:orange", "cool_down": "tab:green", "rollout": "tab:purple"}
    for phase, (start, end) in figures["timeline"].items():
        axis.axvspan(start, end, alpha=0.12, color=colors[phase], label=phase.replace("_", "-"))
    if figures.get("second_replica_first_answer_s") is not None:
        at = figures["timeline"]["burst"][0] + figures["second_replica_first_answer_s"]
        axis.axvline(at, color="tab:red", linestyle="--", linewidth=1, label="second replica's first answer")
    axis.set(xlabel="seconds", ylabel="sampler replicas", ylim=(0, 4.5),
             title="sampler replicas (Serve status): burst, cool-down, roll-out")
    axis.legend(fontsize=7, loc="upper right", ncol=2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients in the burst")
    parser.add_argument("--rollout-clients", type=int, default=3)
    parser.add_argument("--max-burst-s", type=float, default=90.0)
    parser.add_argument("--hold-s", type=float, default=5.0, help="burst time after the second replica answers")
    parser.add_argument("--max-cool-s", type=float, default=120.0)
    parser.add_argument("--quick", action="store_true", help="shorter autoscaling delays (the test)")
    parser.add_argument("--plot", help="PNG of the replica count over time")
    parser.add_argument("--details", help="JSON file of every replica sample and request outcome")
    args = parser.parse_args()
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
