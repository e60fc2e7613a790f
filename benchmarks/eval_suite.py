"""The eval suite's cost per checkpoint, with and without the fast sampler options.

Run: .venv/bin/python benchmarks/eval_suite.py --checkpoint runs/tiny-cpu/stages/sft/checkpoints/checkpoint_000800/hf \
        --corpus runs/tiny-cpu/data/corpus [--rounds 2]

The demo's suite (jobs/evaluation/runner.py demo_eval_suite: reading by generation, two
multiple-choice tasks, held-out text and the lm-eval counting task) is scored on one checkpoint
as it ships (generation with the fast options: threshold 0.9, dual cache, early stop) and with
the reference sampler (every fast option off, one token committed per step) in alternating
rounds, so that load from other work hits both alike; compare the ratio. The likelihood tasks are
the same in both variants (the fast options are sampler options), so the ratio is that of the
whole suite a selection pays for, not of the sampler alone. The record's per-task seconds show
where the time goes. A generate_until lm-eval task (the demo's reading question through lm-eval,
in the chat template as the SFT checkpoint expects) runs in both variants too, with ``fast`` on
and off.

Ends with one JSON line: seconds per checkpoint of each variant, their ratio, and the scores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.evaluation.runner import demo_eval_suite, evaluate_checkpoint  # noqa: E402
from jobs.evaluation.tasks import EvalSuiteConfig  # noqa: E402
from pipelines import storage  # noqa: E402

REFERENCE = {"threshold": None, "cache": None, "early_stop": False}


def suites(corpus: str) -> dict[str, EvalSuiteConfig]:
    """The demo suite plus the lm-eval reading task, fast and reference."""
    base = demo_eval_suite(corpus).model_dump(mode="json")
    folder = storage.join(corpus, "eval", "lm_eval")
    reading = {"name": "lm_eval_reading", "kind": "lm_eval", "task": "llada_demo_reading", "metric": "exact_match,strip",
               "include_path": folder, "data_files": {"test": storage.join(folder, "llada_demo_reading.jsonl")},
               "max_items": 64, "block_length": 8, "batch_size": 64, "chat": True}
    fast = {**base, "tasks": [*base["tasks"], {**reading, "fast": True}]}
    reference = {**base, "tasks": [*base["tasks"], {**reading, "fast": False}]}
    for task in reference["tasks"]:
        if task["kind"] == "generation":
            task["sampling"] = {**task["sampling"], **REFERENCE, "steps": task["sampling"]["gen_length"]}
    return {"fast": EvalSuiteConfig.model_validate(fast), "reference": EvalSuiteConfig.model_validate(reference)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="an HF-layout checkpoint folder")
    parser.add_argument("--corpus", required=True, help="the demo corpus it was trained on (its eval sets)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    variants = suites(args.corpus)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    records: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for name, suite in variants.items():
            started = time.perf_counter()
            records[name] = evaluate_checkpoint(args.checkpoint, suite, device="cpu")
            seconds[name].append(time.perf_counter() - started)
            tasks = {task: f"{r['score']:.3f} ({r['seconds']:.1f} s)" for task, r in records[name]["tasks"].items()}
            print(f"round {round_ + 1} {name}: {seconds[name][-1]:.1f} s, average {records[name]['average']:.4f}, "
                  f"{tasks}", file=sys.stderr)
    fast_s, reference_s = statistics.median(seconds["fast"]), statistics.median(seconds["reference"])
    print(json.dumps({
        "checkpoint": args.checkpoint, "rounds": args.rounds,
        "seconds_per_checkpoint_fast": round(fast_s, 2), "seconds_per_checkpoint_reference": round(reference_s, 2),
        "reference_over_fast": round(reference_s / fast_s, 2),
        "task_seconds": {name: {t: r["seconds"] for t, r in records[name]["tasks"].items()} for name in records},
        "scores": {name: {t: round(r["score"], 4) for t, r in records[name]["tasks"].items()} for name in records},
        "average": {name: round(records[name]["average"], 4) for name in records},
    }))


if __name__ == "__main__":
    main()
