"""Serving throughput and latency: completion tokens/s and p50/p99 request latency at 1, 4 and
16 concurrent clients, with dynamic batching (max_batch_size 16) and without (1), in one run.

Run: .venv/bin/python benchmarks/serve.py [--model micro|tiny] [--max-tokens 64] [--requests 48]
     .venv/bin/python benchmarks/serve.py --cache dual   # the sampler's KV cache, as the shipped
                                                        # serve configs deploy it (both modes)
     .venv/bin/python benchmarks/serve.py --generate-only   # no Serve: generate() by batch size,
                                                           # and batched == alone, on CUDA if present

The whole stack runs on a local Ray (num_cpus=2): HTTP proxy, FastAPI ingress, one sampler
replica (1 torch thread), and closed-loop clients (each sends its next request when the last
one is answered) over HTTP on 127.0.0.1. Both modes serve the same random checkpoint with the
same config except ``batching.max_batch_size``. Every request asks for exactly ``max_tokens``
tokens (``ignore_eos``), greedy, one commit per step. Prints one JSON object per measurement
and a summary table (mean batch: requests per generate call; model busy: the share of the wall
time the replica spent in generate); the bar is batching >= 3x the tokens/s of no batching at
16 clients.

Models: ``micro`` (hidden 32, 2 layers, 4 experts, vocab 320) is dominated by per-operation
overhead at batch 1, the regime of a GPU replica at small batch; ``tiny`` (the project's demo
preset, hidden 128) is already compute-bound at batch 1 on a CPU, because a diffusion step
runs the whole sequence, so batching there can only recover that overhead.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

# Run as a script, sys.path[0] is this folder: put the repo root there instead, so that the
# project's packages import and no file here can shadow a standard-library module.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from llada_core import LLaDAMoEModelLM, preset, save_model  # noqa: E402
from pipelines.tokenizer import save_tokenizer, train_bpe  # noqa: E402

MODELS = {
    "micro": dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2, max_position_embeddings=512),
    "tiny": dict(vocab_size=320, max_position_embeddings=512),
}
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "one two three four five six seven eight",
         "she sells sea shells by the sea shore"] * 10
PROMPTS = ["the cat sat on the mat and then", "a dog", "one two three four", "she sells sea shells by the"]


def build_checkpoint(directory: Path, model_name: str) -> str:
    tokenizer = train_bpe(TEXTS, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = LLaDAMoEModelLM(preset("tiny", **MODELS[model_name])).eval()
    save_model(model, directory)
    save_tokenizer(tokenizer, str(directory))
    return str(directory)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def deploy(checkpoint: str, port: int, name: str, max_batch_size: int, batch_wait_s: float,
           cache: str | None = None) -> str:
    """Deploy one app under /{name}; returns its base URL."""
    from serve.app import run
    from serve.config import AppArgs

    run(AppArgs.model_validate({"checkpoint": checkpoint, "config": {
        "model_name": "bench", "port": port, "request_timeout_s": 600,
        "sampling": {"cache": cache, "threshold": None, "early_stop": False},  # one commit per step, as recorded
        "batching": {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_s},
        "replica": {"num_cpus": 0.5, "torch_threads": 1, "max_ongoing_requests": 32, "max_queued_requests": -1},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1}}}), name=name, route_prefix=f"/{name}")
    base = f"http://127.0.0.1:{port}/{name}"
    deadline = time.time() + 120
    while requests.get(f"{base}/ready", timeout=10).status_code != 200:
        if time.time() > deadline:
            raise TimeoutError("the app did not become ready")
        time.sleep(0.5)
    return base


def measure(base: str, clients: int, num_requests: int, max_tokens: int, block_length: int) -> dict:
    """Closed loop: ``clients`` threads share ``num_requests`` requests."""
    url = f"{base}/v1/completions"
    per_client = max(1, num_requests // clients)

    def client(index: int) -> list[tuple[float, int]]:
        session, results = requests.Session(), []
        for number in range(per_client):
            body = {"model": "bench", "prompt": PROMPTS[(index + number) % len(PROMPTS)], "max_tokens": max_tokens,
                    "block_length": block_length, "ignore_eos": True}
            started = time.perf_counter()
            response = session.post(url, json=body, timeout=600)
            response.raise_for_status()
            results.append((time.perf_counter() - started, response.json()["usage"]["completion_tokens"]))
        return results

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [item for batch in pool.map(client, range(clients)) for item in batch]
    wall = time.perf_counter() - started
    latencies = sorted(latency for latency, _ in results)
    tokens = sum(count for _, count in results)
    return {"clients": clients, "requests": len(results), "completion_tokens": tokens, "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "p50_s": round(statistics.median(latencies), 3),
            "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3)}


def generate_only() -> None:
    """generate() tokens/s by batch size, and whether a left-padded batch equals each request
    alone (greedy), for the tiny and small presets in float32 and bfloat16 (no Ray, no Serve)."""
    from llada_core import SamplingOptions, generate
    from serve.batching import SampleRequest, sample_group

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("tiny", "small"):
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            model = LLaDAMoEModelLM(preset(name)).to(device, dtype).eval()
            generator = torch.Generator().manual_seed(1)
            requests_ = [SampleRequest(str(i), tuple(torch.randint(5, model.config.vocab_size, (length,),
                                                                   generator=generator).tolist()),
                                       max_tokens, SamplingOptions(gen_length=32, steps=32, block_length=16))
                         for i, (length, max_tokens) in enumerate([(3, 20), (17, 32), (9, 25), (30, 32), (1, 18),
                                                                    (12, 30), (25, 21), (7, 32)])]
            batched = sample_group(model, requests_)
            equal = sum(row == sample_group(model, [single])[0] for row, single in zip(batched, requests_, strict=True))
            print(json.dumps({"model": name, "dtype": str(dtype), "device": str(device),
                              "rows_equal_alone": equal, "rows": len(requests_)}), flush=True)
            for batch in (1, 4, 16, 64):
                prompt = torch.randint(5, model.config.vocab_size, (batch, 32), device=device)
                generate(model, prompt, steps=16, gen_length=128, block_length=32)  # warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                generate(model, prompt, steps=128, gen_length=128, block_length=32)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - started
                print(json.dumps({"model": name, "dtype": str(dtype), "batch": batch,
                                  "tokens_per_s": round(batch * 128 / seconds, 1)}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="micro")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request (one commit per step)")
    parser.add_argument("--block-length", type=int, default=8, help="tokens per semi-autoregressive block")
    parser.add_argument("--requests", type=int, default=48, help="requests per measurement")
    parser.add_argument("--batch-wait", type=float, default=0.05, help="batching.batch_wait_timeout_s")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--cache", choices=["prefix", "dual"],
                        help="the sampler's KV cache for both modes (serve config sampling.cache; default none)")
    parser.add_argument("--generate-only", action="store_true", help="measure generate() alone (see above)")
    args = parser.parse_args()
    if args.generate_only:
        generate_only()
        return 0

    import ray
    from ray import serve

    from serve.app import SAMPLER_NAME

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="llada-serve-bench-") as directory:
        checkpoint = build_checkpoint(Path(directory), args.model)
        port = free_port()
        # Both apps are up at once (one replica each) and measured alternately, so that the
        # other work on a shared machine weighs on both modes alike.
        bases = {mode: deploy(checkpoint, port, name, max_batch_size, args.batch_wait, args.cache)
                 for mode, name, max_batch_size in (("batching", "batched", 16), ("no batching", "unbatched", 1))}
        for base in bases.values():
            measure(base, 4, 8, args.max_tokens, args.block_length)  # warm-up
        samplers = {mode: serve.get_deployment_handle(SAMPLER_NAME, app_name=name)
                     for mode, name in (("batching", "batched"), ("no batching", "unbatched"))}
        for clients in args.concurrency:
            for mode, base in bases.items():
                num_requests = max(args.requests if clients > 1 else args.requests // 4, clients)
                seen = len(samplers[mode].batch_sizes.remote().result())
                row = {"mode": mode, "model": args.model, "max_tokens": args.max_tokens, "cache": args.cache,
                       "block_length": args.block_length,
                       **measure(base, clients, num_requests, args.max_tokens, args.block_length)}
                sizes = samplers[mode].batch_sizes.remote().result()[seen:]
                seconds = samplers[mode].batch_seconds.remote().result()[seen:]
                row["mean_batch"] = round(statistics.mean(sizes), 2)
                row["batch_sizes"] = sizes
                row["model_share"] = round(sum(seconds) / row["seconds"], 2)  # replica busy in generate()
                print(json.dumps(row), flush=True)
                rows.append(row)
        serve.shutdown()
    ray.shutdown()
    print_summary(rows, args)
    return 0


def print_summary(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.2f}; model {args.model}, {args.max_tokens} tokens/request, "
          f"block_length {args.block_length}, cache {args.cache or 'none'}")
    print("| mode | clients | requests | tokens/s | p50 latency s | p99 latency s | mean batch | model busy |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['clients']} | {row['requests']} | {row['tokens_per_s']} | "
              f"{row['p50_s']} | {row['p99_s']} | {row['mean_batch']} | {row['model_share']:.0%} |")
    by_mode = {(row["mode"], row["clients"]): row["tokens_per_s"] for row in rows}
    for clients in args.concurrency:
        ratio = by_mode[("batching", clients)] / by_mode[("no batching", clients)]
        bar = f" (bar 3x: {'met' if ratio >= 3 else 'NOT met'})" if clients == 16 else ""
        print(f"{clients} clients: batching / no batching = {ratio:.2f}x{bar}")


if __name__ == "__main__":
    sys.exit(main())
