"""Tokenize-and-pack throughput: the Ray Data job on N CPUs versus the same work in one process.

Both sides run the same per-file function (read JSON lines, tokenize with the same tokenizer,
pack, write a parquet shard) over the same input files; the Ray side is ``run_pack_job`` on a
local Ray instance with ``--cpus`` CPUs (started and warmed up before timing, so cluster start is
not counted; task scheduling and result collection are). The single process is timed twice: with
the HF tokenizers library's own Rust thread pool on (its default) and off.

    .venv/bin/python benchmarks/tokenize_bench.py --record    # prints JSON, appends to benchmarks/RESULTS.md
"""

from __future__ import annotations

import os
import sys

# This file's name shadows the standard library's `tokenize` (which `inspect` imports) when run as
# a script from benchmarks/: take its folder off the path and put the repo root on it instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from pipelines import corpus as corpus_module  # noqa: E402
from pipelines.pack import PackConfig, process_unit, run_pack_job  # noqa: E402
from pipelines.sources import SourceSpec, expand_sources  # noqa: E402
from pipelines.tokenizer import load_tokenizer, special_token_ids, train_demo_tokenizer  # noqa: E402

BAR = 1.5


def _spin(_: int) -> float:
    started, total = time.perf_counter(), 0
    for number in range(20_000_000):
        total += number
    return time.perf_counter() - started


def cpu_parallel_speedup(cpus: int) -> float:
    """What the machine can give at all: `cpus` copies of a pure-Python loop run at once, against
    one copy alone (ideal: `cpus`). Virtual CPUs sharing a host core score near 1."""
    from multiprocessing import Pool

    alone = min(_spin(0) for _ in range(3))
    with Pool(cpus) as pool:
        pool.map(_spin, range(cpus))  # warm the pool up
        together = min(max(pool.map(_spin, range(cpus))) for _ in range(3))
    return round(cpus * alone / together, 2)


def single_process(units: list[dict], tokenizer_json: str, eos_id: int, output: str, seq_len: int) -> float:
    config = {"seq_len": seq_len, "rows_per_shard": 1 << 30, "eos_id": eos_id, "output_uri": output}
    started = time.perf_counter()
    for unit in units:
        row = process_unit(unit, config, tokenizer_json, None)
        assert not row["error"], row["error"]
    return time.perf_counter() - started


def run(scale: float, files: int, cpus: int, seq_len: int, repeats: int) -> dict:
    import ray

    work = tempfile.mkdtemp(prefix="llada-bench-tokenize-")
    spec = corpus_module.CorpusSpec(num_text_docs=round(4000 * scale), num_math_docs=round(3000 * scale),
                                    num_code_docs=round(2000 * scale), num_anneal_docs=10, num_sft_chats=10,
                                    num_eval_items=5, files_per_split=files)
    corpus_module.write_demo_corpus(f"{work}/corpus", spec)
    train_demo_tokenizer(f"{work}/corpus", f"{work}/tokenizer")
    tokenizer = load_tokenizer(f"{work}/tokenizer")
    sources = [SourceSpec(uri=f"{work}/corpus/pretrain/{d}/*.jsonl", domain=d) for d in corpus_module.PRETRAIN_DOMAINS]
    units = expand_sources(sources)
    tokenizer_json, eos_id = tokenizer.backend_tokenizer.to_str(), special_token_ids(tokenizer).eos

    # Best of `repeats` runs each, alternating, so neither side gets the warmer machine.
    single_default_s = single_one_thread_s = float("inf")
    for _ in range(repeats):
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
        single_default_s = min(single_default_s, single_process(units, tokenizer_json, eos_id, f"{work}/a", seq_len))
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        single_one_thread_s = min(single_one_thread_s, single_process(units, tokenizer_json, eos_id, f"{work}/b", seq_len))
    os.environ.pop("TOKENIZERS_PARALLELISM", None)

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    config = PackConfig(sources=sources, tokenizer_uri=f"{work}/tokenizer", output_uri=f"{work}/ray",
                        seq_len=seq_len, rows_per_shard=1 << 30, overwrite=True)
    run_pack_job(config.model_copy(update={"output_uri": f"{work}/warmup"}))  # start the workers
    ray_s = float("inf")
    for _ in range(repeats):
        shutil.rmtree(f"{work}/ray", ignore_errors=True)  # a finished output would be reused, not rebuilt
        started = time.perf_counter()
        manifest = run_pack_job(config)
        ray_s = min(ray_s, time.perf_counter() - started)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    tokens = sum(d["tokens"] for d in manifest["domains"].values())
    result = {
        "benchmark": "tokenize", "cpu_parallel_speedup": cpu_parallel_speedup(cpus),
        "load_average_1min": round(os.getloadavg()[0], 2), "files": len(units), "documents": sum(d["documents"] for d in manifest["domains"].values()),
        "tokens": tokens, "cpus": cpus, "seq_len": seq_len,
        "ray_tokens_per_s": round(tokens / ray_s), "ray_s": round(ray_s, 2),
        "single_tokens_per_s": round(tokens / single_default_s), "single_s": round(single_default_s, 2),
        "single_one_thread_tokens_per_s": round(tokens / single_one_thread_s),
        "ratio": round(single_default_s / ray_s, 2), "ratio_vs_one_thread": round(single_one_thread_s / ray_s, 2),
        "bar": BAR, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }
    result["passed"] = result["ratio"] >= BAR
    return result


def record(result: dict, path: Path) -> None:
    """Write this run under the '## Tokenize' heading: replaces that section only, or appends it;
    every other section of the file is kept as it is."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if "\n## Tokenize\n" in text:
        before, _, after = text.partition("\n## Tokenize\n")
        following = after.find("\n## ")
        text = before + (after[following:] if following >= 0 else "")
    # The default process's time as a share of the one-thread process's (the tokenizers' threads).
    threaded_share = result["single_s"] / (result["tokens"] / result["single_one_thread_tokens_per_s"])
    lines = [
        "", "## Tokenize", "",
        f"`benchmarks/tokenize_bench.py` on {result['machine']}: {result['files']} JSON-lines files, "
        f"{result['documents']} documents, {result['tokens']} tokens (demo corpus, demo BPE), seq_len {result['seq_len']}.",
        "",
        "| path | tokens/s | seconds |", "|---|---|---|",
        f"| Ray Data job, {result['cpus']} CPUs | {result['ray_tokens_per_s']} | {result['ray_s']} |",
        f"| one process (tokenizers' Rust threads on, default) | {result['single_tokens_per_s']} | {result['single_s']} |",
        f"| one process, TOKENIZERS_PARALLELISM=false | {result['single_one_thread_tokens_per_s']} | |",
        "",
        f"Ratio Ray / one process: **{result['ratio']}x** (bar {result['bar']}x: "
        f"{'met' if result['passed'] else 'NOT met'}); against the one-thread process {result['ratio_vs_one_thread']}x.",
        f"The machine's own parallel speedup for {result['cpus']} processes (pure-Python loop, ideal "
        f"{result['cpus']}.0): {result['cpu_parallel_speedup']}x. Ray cannot scale past it; where it is "
        f"near 1 the 2 virtual CPUs share one core's worth of time and the bar cannot be judged on this machine. "
        f"Load average (1 min) at the end of the run: {result['load_average_1min']} (other work on the machine "
        f"skews every figure above; compare runs only at similar load).",
        "",
        f"Ceiling on this machine: the one-thread process spends about 75% of its time in `encode_batch` "
        f"(cProfile), and the default process already runs that part on both cores through the tokenizers "
        f"library's threads (here it takes {threaded_share:.2f} of the one-thread time). A Ray job on 2 CPUs "
        f"can at best halve the one-thread time, so against the default process it tops out near "
        f"{threaded_share * 2:.2f}x "
        f"with zero overhead: the 1.5x bar needs more CPUs than the tokenizer's own threads can use, or a "
        f"one-thread baseline.",
        "",
    ]
    path.write_text(text.rstrip("\n") + "\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=6.0, help="demo corpus size multiple (1.0 = 0.57 M tokens)")
    parser.add_argument("--files", type=int, default=8, help="files per domain")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timed runs per path")
    parser.add_argument("--record", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    args = parser.parse_args()
    result = run(args.scale, args.files, args.cpus, args.seq_len, args.repeats)
    print(json.dumps(result))
    if args.record:
        record(result, Path(__file__).resolve().parent / "RESULTS.md")


if __name__ == "__main__":
    main()
