"""Serving under real traffic: uniform vs mixed answer lengths, and overload, on one replica.

Run: .venv/bin/python benchmarks/serve.py                       # the demo's SFT checkpoint, laptop config
     .venv/bin/python benchmarks/serve.py --checkpoint PATH/hf --config serve/configs/laptop.yaml
     .venv/bin/python benchmarks/serve.py --seconds 20 --rounds 1   # shorter
     .venv/bin/python benchmarks/serve.py --answers 10   # instead: the first 10 held-out reading
                                    # questions through the openai client at 32, 64 and 128 tokens

The whole stack runs on a local Ray (num_cpus=2): HTTP proxy, FastAPI ingress and one sampler
replica deployed from the shipped laptop serve config (only the port changed), and closed-loop
clients (each sends its next request when the last one is answered) over HTTP on 127.0.0.1.
Clients are polite: after a 503 they wait the Retry-After the server sends.

Phases, each ``--seconds`` long, alternated ``--rounds`` times so that other work on the
machine weighs on all alike:

- ``uniform-16``: 16 clients, every request max_tokens 32;
- ``mixed-16``: 16 clients, max_tokens drawn uniformly from {8, 16, 32, 64, 128};
- ``uniform-64``: 64 clients (4x the replica's 16 ongoing requests: overload), max_tokens 32.

Every request is a chat completion of a held-out demo question with ``ignore_eos`` and
``early_stop: false``, so it costs exactly its max_tokens (an early stop would make long requests
as cheap as short ones). Per phase: completion tokens/s and requests/s of the answered (200)
requests (goodput), 503s, p50/p99 latency per max_tokens, the sampler's mean rows per round and
model-busy share (its own counters), and where the CPU went (CPU seconds of the replica, the
ingress, the proxy, the other Ray processes and the clients, from psutil).

Bars (issue 19): mixed >= 0.8x uniform tokens/s; 8-token p50 under mixed traffic <= 0.5x the
128-token p50; goodput at 64 clients >= 0.8x goodput at 16. Ends with one JSON line of these.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil
import requests
import torch

# Run as a script, sys.path[0] is this folder: put the repo root there instead, so that the
# project's packages import and no file here can shadow a standard-library module.
sys.path[0] = str(Path(__file__).resolve().parents[1])

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN = ROOT / "runs" / "tiny-cpu"
MIXED_LENGTHS = (8, 16, 32, 64, 128)
UNIFORM_LENGTH = 32
QUESTIONS = ["where does the red fox sleep?", "what does the dog do?", "who sells shells?", "count to five.",
             "what colour is the sky?", "where is the cat?", "what does the bird eat?", "who reads the book?"]
PHASES = (("uniform-16", 16, False), ("mixed-16", 16, True), ("uniform-64", 64, False))


def demo_checkpoint(run: Path) -> str:
    """The hf/ folder of the checkpoint the demo's SFT stage selected."""
    record = run / "stages" / "sft" / "selection.json"
    if not record.exists():
        raise SystemExit(f"{record} does not exist: run `make demo` first, or pass --checkpoint")
    return json.loads(record.read_text())["checkpoint"]["hf_uri"]


def deploy(checkpoint: str, config_path: str, port: int) -> str:
    from serve.app import run
    from serve.config import AppArgs, load_serve_config

    config = load_serve_config(config_path, {"port": port})
    run(AppArgs(checkpoint=checkpoint, config=config))
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while requests.get(f"{base}/ready", timeout=30).status_code != 200:
        if time.time() > deadline:
            raise TimeoutError("the app did not become ready")
        time.sleep(0.5)
    return base


def ray_processes() -> dict[str, list[int]]:
    """PIDs of the serving actors by role (Ray titles its worker processes ``ray::<actor>``), and
    of the rest of Ray on this machine."""
    roles: dict[str, list[int]] = defaultdict(list)
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "LLaDASampler" in cmdline:
            roles["replica"].append(process.info["pid"])
        elif "OpenAIIngress" in cmdline:
            roles["ingress"].append(process.info["pid"])
        elif "ProxyActor" in cmdline:
            roles["proxy"].append(process.info["pid"])
        elif process.info["pid"] != os.getpid() and ("ray::" in cmdline or "gcs_server" in cmdline or "raylet" in cmdline
                                                      or "ray/_private" in cmdline or "ray/dashboard" in cmdline):
            roles["ray (other)"].append(process.info["pid"])
    roles["clients"] = [os.getpid()]
    return dict(roles)


def cpu_seconds(roles: dict[str, list[int]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for role, pids in roles.items():
        total = 0.0
        for pid in pids:
            try:
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        totals[role] = total
    return totals


def run_phase(base: str, name: str, clients: int, mixed: bool, seconds: float, seed: int) -> dict[str, Any]:
    """Closed-loop clients for ``seconds``; -> the answered requests and the rejections."""
    url = f"{base}/v1/chat/completions"
    stop_at = time.perf_counter() + seconds
    lock = threading.Lock()
    answered: list[tuple[int, float, int]] = []  # (max_tokens, latency, completion tokens)
    rejected: list[float] = []
    errors: list[str] = []

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        session = requests.Session()
        while time.perf_counter() < stop_at:
            max_tokens = rng.choice(MIXED_LENGTHS) if mixed else UNIFORM_LENGTH
            body = {"model": "llada-moe", "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
                    "max_tokens": max_tokens, "ignore_eos": True, "early_stop": False}
            started = time.perf_counter()
            try:
                response = session.post(url, json=body, timeout=600)
            except requests.RequestException as error:
                with lock:
                    errors.append(type(error).__name__)
                continue
            latency = time.perf_counter() - started
            if response.status_code == 200:
                tokens = response.json()["usage"]["completion_tokens"]
                with lock:
                    answered.append((max_tokens, latency, tokens))
            elif response.status_code == 503:
                with lock:
                    rejected.append(latency)
                time.sleep(float(response.headers.get("Retry-After", "1")))
            else:
                with lock:
                    errors.append(f"{response.status_code}: {response.text[:200]}")

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    return {"phase": name, "clients": clients, "wall": wall, "answered": answered, "rejected": rejected,
            "errors": errors}


def served_answers(base: str, count: int) -> int:
    """Ask the first ``count`` held-out reading questions of the demo's eval set through the
    official openai client, plain and streamed, at 32, 64 and 128 tokens (the server's other
    defaults); print each setting's exact matches."""
    import openai

    path = DEFAULT_RUN / "data" / "corpus" / "eval" / "gen_reading.jsonl"
    items = [json.loads(line) for line in path.read_text().splitlines()[:count]]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    results = {}
    for max_tokens in (32, 64, 128):
        for stream in (False, True):
            exact = 0
            for item in items:
                if stream:
                    chunks = client.chat.completions.create(model="llada-moe", messages=item["messages"],
                                                            max_tokens=max_tokens, stream=True)
                    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
                else:
                    text = client.chat.completions.create(model="llada-moe", messages=item["messages"],
                                                          max_tokens=max_tokens).choices[0].message.content
                exact += text.strip() == item["chat_answer"]
            results[f"{max_tokens}{'_stream' if stream else ''}"] = exact
            print(f"max_tokens {max_tokens}{' streamed' if stream else ''}: {exact} of {len(items)} exact "
                  f"(last answer {text!r})", flush=True)
    print(json.dumps({"questions": len(items), "exact": results}))
    return 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarize(result: dict[str, Any], stats_delta: dict[str, float], cpu: dict[str, float]) -> dict[str, Any]:
    wall, answered = result["wall"], result["answered"]
    tokens = sum(count for _, _, count in answered)
    by_length: dict[int, list[float]] = defaultdict(list)
    for max_tokens, latency, _ in answered:
        by_length[max_tokens].append(latency)
    rounds = stats_delta["rounds"]
    return {
        "phase": result["phase"], "clients": result["clients"], "seconds": round(wall, 1),
        "answered": len(answered), "rejected_503": len(result["rejected"]), "errors": len(result["errors"]),
        "error_samples": result["errors"][:3],
        "tokens_per_s": round(tokens / wall, 1), "requests_per_s": round(len(answered) / wall, 2),
        "p50_s": round(statistics.median([lat for _, lat, _ in answered]), 3) if answered else None,
        "p50_s_by_length": {n: round(statistics.median(v), 3) for n, v in sorted(by_length.items())},
        "p99_s_by_length": {n: round(percentile(v, 0.99), 3) for n, v in sorted(by_length.items())},
        "p50_503_s": round(statistics.median(result["rejected"]), 3) if result["rejected"] else None,
        "mean_rows": round(stats_delta["row_rounds"] / rounds, 2) if rounds else 0.0,
        "model_busy": round(stats_delta["model_seconds"] / wall, 2),
        "cpu_s": {role: round(value, 1) for role, value in cpu.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="hf/ folder to serve (default: the demo's selected SFT checkpoint)")
    parser.add_argument("--config", default=str(ROOT / "serve" / "configs" / "laptop.yaml"), help="serve config")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=2, help="times the three phases are alternated")
    parser.add_argument("--answers", type=int, metavar="N", help="ask N held-out reading questions instead")
    parser.add_argument("--phases", nargs="+", choices=[name for name, _, _ in PHASES],
                        default=[name for name, _, _ in PHASES], help="run only these phases (no bars then)")
    args = parser.parse_args()
    checkpoint = args.checkpoint or demo_checkpoint(DEFAULT_RUN)

    import ray
    from ray import serve

    from llada.cluster import free_port
    from serve.app import SAMPLER_NAME, APP_NAME

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    base = deploy(checkpoint, args.config, free_port())
    if args.answers:
        code = served_answers(base, args.answers)
        serve.shutdown()
        ray.shutdown()
        return code
    sampler = serve.get_deployment_handle(SAMPLER_NAME, app_name=APP_NAME)
    roles = ray_processes()
    run_phase(base, "warm-up", 4, True, 5.0, seed=0)
    rows: list[dict[str, Any]] = []
    for round_index in range(args.rounds):
        for name, clients, mixed in (phase for phase in PHASES if phase[0] in args.phases):
            before, cpu_before = sampler.stats.remote().result(), cpu_seconds(roles)
            result = run_phase(base, name, clients, mixed, args.seconds, seed=round_index + 1)
            after, cpu_after = sampler.stats.remote().result(), cpu_seconds(roles)
            delta = {key: after[key] - before[key] for key in ("rounds", "row_rounds", "model_seconds")}
            row = summarize(result, delta, {role: cpu_after[role] - cpu_before[role] for role in roles})
            print(json.dumps(row), flush=True)
            rows.append(row)
    serve.shutdown()
    ray.shutdown()
    return report(rows, args, checkpoint)


def report(rows: list[dict[str, Any]], args: argparse.Namespace, checkpoint: str) -> int:
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.2f} at the end; checkpoint {checkpoint}; config {args.config}; "
          f"{args.rounds} x {args.seconds:g} s per phase")
    roles = sorted({role for row in rows for role in row["cpu_s"]})
    print("| phase | clients | tokens/s | requests/s | 503s | p50 s | mean rows | model busy | "
          + " | ".join(f"CPU-s {role}" for role in roles) + " |")
    print("|---" * (8 + len(roles)) + "|")
    for row in rows:
        print(f"| {row['phase']} | {row['clients']} | {row['tokens_per_s']} | {row['requests_per_s']} | "
              f"{row['rejected_503']} | {row['p50_s']} | {row['mean_rows']} | {row['model_busy']:.0%} | "
              + " | ".join(str(row["cpu_s"].get(role, 0.0)) for role in roles) + " |")

    if set(args.phases) != {name for name, _, _ in PHASES}:
        return 0

    def mean_of(phase: str, key: str) -> float:
        return statistics.mean(row[key] for row in rows if row["phase"] == phase)

    mixed_p50: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        if row["phase"] == "mixed-16":
            for length, value in row["p50_s_by_length"].items():
                mixed_p50[int(length)].append(value)
    print("mixed-16 p50 / p99 s by max_tokens: " + ", ".join(
        f"{length}: {statistics.mean(values):.2f} / "
        f"{statistics.mean(r['p99_s_by_length'][length] for r in rows if r['phase'] == 'mixed-16'):.2f}"
        for length, values in sorted(mixed_p50.items())))
    figures = {
        "mixed_vs_uniform_tokens_per_s": round(mean_of("mixed-16", "tokens_per_s") / mean_of("uniform-16", "tokens_per_s"), 3),
        "p50_8_vs_128_mixed": round(statistics.mean(mixed_p50[8]) / statistics.mean(mixed_p50[128]), 3),
        "goodput_64_vs_16": round(mean_of("uniform-64", "tokens_per_s") / mean_of("uniform-16", "tokens_per_s"), 3),
        "uniform_16_tokens_per_s": round(mean_of("uniform-16", "tokens_per_s"), 1),
        "mixed_16_tokens_per_s": round(mean_of("mixed-16", "tokens_per_s"), 1),
        "uniform_64_tokens_per_s": round(mean_of("uniform-64", "tokens_per_s"), 1),
        "errors": sum(row["errors"] for row in rows),
    }
    bars = {"mixed_vs_uniform_tokens_per_s": figures["mixed_vs_uniform_tokens_per_s"] >= 0.8,
            "p50_8_vs_128_mixed": figures["p50_8_vs_128_mixed"] <= 0.5,
            "goodput_64_vs_16": figures["goodput_64_vs_16"] >= 0.8}
    print("bars: " + ", ".join(f"{name} {'met' if met else 'NOT met'}" for name, met in bars.items()))
    print(json.dumps({**figures, "bars_met": all(bars.values())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
