"""Training throughput and MFU through the real stage runner (Ray Train + DeepSpeed, CPU).

Run: .venv/bin/python benchmarks/train.py [--presets tiny small] [--workers 1 2] [--steps 8]

MFU = model FLOPs (6 x active parameters + bidirectional attention, per token, forward+backward)
per second over the fp32 matmul peak each worker measures in the same run. Steps 1-2 (warm-up,
first DeepSpeed/gloo traffic) are left out of the medians. Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import ray
import torch

from jobs.stage_config import StageConfig
from jobs.training.stage import read_history, run_stage
from pipelines.demo.corpus import CorpusSpec
from pipelines.mixture import MixtureSpec
from pipelines.prepare import PrepareConfig, prepare

SEQ_LEN = 256


def stage_data(root: str) -> dict:
    corpus = CorpusSpec(num_text_docs=600, num_math_docs=400, num_code_docs=300, num_anneal_docs=10,
                        num_sft_chats=10, num_eval_items=5, files_per_split=2)
    summary = prepare(PrepareConfig(output_uri=root, corpus=corpus, seq_len=SEQ_LEN, sft_seq_len=64,
                                    stages={"bench": MixtureSpec(weights={"text": 1, "math": 1, "code": 1},
                                                                 token_budget=SEQ_LEN * 512)}),
                      progress=lambda line: None)
    return {"tokenizer_uri": summary["tokenizer_uri"], "stage_uri": f"{root}/stages/bench"}


def measure(data: dict, preset: str, workers: int, steps: int, micro_batch: int, root: str,
            grad_accum: int = 1) -> dict:
    output = f"{root}/{preset}-{workers}-{grad_accum}"
    config = StageConfig.model_validate(dict(
        name=f"bench-{preset}-{workers}", kind="pretrain", model={"preset": preset}, data_uri=data["stage_uri"],
        output_uri=output, num_steps=steps, micro_batch_size=micro_batch, grad_accumulation_steps=grad_accum,
        checkpoint_every=10**6,
        optimizer={"lr": 1e-3}, schedule={"kind": "constant"}, scaling={"num_workers": workers},
        variable_length_prob=0.0,
    ))
    started = time.perf_counter()
    run_stage(config)
    rows = [r for r in read_history(output) if "loss" in r][2:]
    return {
        "benchmark": "train_stage", "preset": preset, "workers": workers, "micro_batch": micro_batch,
        "grad_accumulation": grad_accum, "tokens_per_step": micro_batch * grad_accum * workers * SEQ_LEN,
        "seq_len": SEQ_LEN, "steps_measured": len(rows),
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows), 1),
        "mfu": round(statistics.median(r["mfu"] for r in rows), 4),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {ray.cluster_resources().get('CPU')} CPUs, torch {torch.__version__}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="micro-batches per optimizer step (amortises the optimizer update)")
    args = parser.parse_args()
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as root:
        data = stage_data(root)
        for preset in args.presets:
            for workers in args.workers:
                print(json.dumps(measure(data, preset, workers, args.steps, args.micro_batch, root, args.grad_accum)),
                      flush=True)


if __name__ == "__main__":
    main()
