"""One training step at LLaDA-MoE-7B-A1B's shapes on a GPU: memory, tokens/s and MFU, with and
without activation checkpointing, grouped GEMM against the padded expert path.

Run (on the GPU machine, under 8 minutes on one H100/H200):
    python benchmarks/gpu_train_step.py                       # 2 layers, bf16, rows of 4096 and 8192
    python benchmarks/gpu_train_step.py --device cpu --layers 1 --seq-lens 256 --hidden 256 --vocab 4096
        # a smoke run of the same code on the CPU (shrunk shapes; not a measurement)

A model with the released shapes (hidden 2048, 16 heads, 64 experts of width 1024, top-8,
vocabulary 157,184) cut to ``--layers`` decoder layers, bf16 weights, batch 1, the pretraining
loss as training computes it (lm_head at masked positions only, t = 0.5), AdamW-free: forward +
backward only, timed over ``--repeats`` steps after one warm-up. Variants: activation
checkpointing off/on, and the experts through ``torch._grouped_mm`` (the default where it runs)
or the padded batched matmul (``use_grouped_mm=False``). Reported per variant: peak memory
(``torch.cuda.max_memory_allocated``, reset before the step), tokens/s, and MFU = 6 x active
parameters x tokens/s (+ attention) over the device's bf16 dense peak (``--peak-tflops``, default
989 for H100/H200 SXM). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llada_core import LLaDAMoEModelLM, preset  # noqa: E402
from llada_core.losses import MaskedBatch, pretrain_loss_from_hidden  # noqa: E402


def active_parameters(config) -> int:  # type: ignore[no-untyped-def]
    """Parameters whose matmuls a token goes through: attention, its top-k experts, router, lm_head."""
    d, layers = config.hidden_size, config.num_hidden_layers
    attention = 4 * d * d
    experts = config.num_experts_per_tok * 3 * d * config.expert_intermediate_size
    router = d * config.num_experts
    return layers * (attention + experts + router) + config.vocab_size * d


def step(model: LLaDAMoEModelLM, ids: torch.Tensor, batch: MaskedBatch) -> None:
    hidden = model(batch.noisy_ids, hidden_only=True).hidden_states
    pretrain_loss_from_hidden(hidden, model.lm_head.weight, ids, batch).backward()
    model.zero_grad(set_to_none=True)


def measure(model: LLaDAMoEModelLM, seq_len: int, device: torch.device, repeats: int, peak_tflops: float) -> dict:
    config = model.config
    ids = torch.randint(2, config.vocab_size - 1, (1, seq_len), device=device)
    masked = torch.rand(1, seq_len, device=device) < 0.5
    batch = MaskedBatch(torch.where(masked, config.mask_token_id, ids), masked, torch.full((1,), 0.5, device=device))
    step(model, ids, batch)  # warm-up (and the grouped GEMM's first-call set-up)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        step(model, ids, batch)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    tokens_per_s = seq_len / statistics.median(seconds)
    attention_flops = 12 * config.num_hidden_layers * config.hidden_size * seq_len  # per token, fwd + bwd
    flops_per_token = 6 * active_parameters(config) + attention_flops
    return {"seq_len": seq_len, "tokens_per_s": round(tokens_per_s, 1),
            "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20) if cuda else None,
            "mfu": round(flops_per_token * tokens_per_s / (peak_tflops * 1e12), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the device")
    parser.add_argument("--hidden", type=int, help="shrink for a smoke run (default: the released 2048)")
    parser.add_argument("--vocab", type=int, help="shrink for a smoke run (default: the released 157,184)")
    args = parser.parse_args()
    device = torch.device(args.device)
    overrides = {"num_hidden_layers": args.layers}
    if args.hidden:
        overrides.update(hidden_size=args.hidden, num_attention_heads=max(1, args.hidden // 128),
                         num_key_value_heads=max(1, args.hidden // 128), expert_intermediate_size=args.hidden // 2)
    if args.vocab:
        overrides.update(vocab_size=args.vocab, mask_token_id=1, eos_token_id=0, pad_token_id=0)
    config = preset("llada-moe-7b-a1b", **overrides)
    torch.manual_seed(0)
    model = LLaDAMoEModelLM(config).to(device=device, dtype=torch.bfloat16).train()
    rows = []
    for grouped in (True, False):
        for layer in model.model.layers:
            layer.mlp.experts.use_grouped_mm = None if grouped else False
        for checkpointing in (False, True):
            model.activation_checkpointing = checkpointing
            for seq_len in args.seq_lens:
                try:
                    row = measure(model, seq_len, device, args.repeats, args.peak_tflops)
                except torch.OutOfMemoryError as error:
                    row = {"seq_len": seq_len, "error": f"out of memory: {error}"[:200]}
                    torch.cuda.empty_cache()
                row.update(experts="grouped_mm" if grouped else "padded", activation_checkpointing=checkpointing)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"device": name, "layers": args.layers, "dtype": "bfloat16", "torch": torch.__version__,
                      "rows": rows}))


if __name__ == "__main__":
    main()
