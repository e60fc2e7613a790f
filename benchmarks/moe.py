"""MoE layer forward+backward throughput: grouped experts vs a per-expert loop vs a dense FFN.

``grouped_mm`` is the same layer through ``torch._grouped_mm`` (the experts' default wherever it
runs), ``grouped`` the padded batched matmul / per-expert paths used where it does not.

Run: .venv/bin/python benchmarks/moe.py [--tokens 2048 --hidden 512 --ffn 256 --experts 64 --top-k 8]

Legend: T tokens, D hidden, F expert FFN, E experts, K top-k.
All variants run interleaved in the same process on the same input, so the figures are
comparable as ratios. The per-expert loop is written the way the released modeling code
does it (``torch.where`` per expert, gather, SwiGLU, weighted ``index_add``). The dense FFN has
the same active FLOPs per token (FFN size K*F). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from llada_core.config import preset
from llada_core.model import MoE, route


class LoopMoE(nn.Module):
    """Reference: loop over experts, each on the tokens routed to it (shares the MoE's weights)."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BLD.reshape(-1, x_BLD.shape[-1])
        logits_TE = F.linear(x_TD.float(), self.moe.gate.weight.float())
        weights_TK, idx_TK = route(logits_TE, self.moe.top_k, normalize=False)
        experts = self.moe.experts
        out_TD = torch.zeros_like(x_TD)
        for e in range(experts.gate_proj.shape[0]):
            token, slot = torch.where(idx_TK == e)
            if token.numel() == 0:
                continue
            x_e = x_TD[token]
            y_e = (F.silu(x_e @ experts.gate_proj[e].T) * (x_e @ experts.up_proj[e].T)) @ experts.down_proj[e].T
            out_TD = out_TD.index_add(0, token, y_e * weights_TK[token, slot, None])
        return out_TD.view_as(x_BLD)


class DenseSwiGLU(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def step_seconds(module: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().pow(2).mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = preset(
        "small", hidden_size=args.hidden, expert_intermediate_size=args.ffn, num_experts=args.experts,
        num_experts_per_tok=args.top_k, num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
    )
    moe = MoE(config)
    for p in moe.parameters():
        nn.init.normal_(p, std=0.02)
    grouped_mm = copy.deepcopy(moe)  # the same weights through torch._grouped_mm (the default where it runs)
    moe.experts.use_grouped_mm = False  # "grouped": the padded / per-expert paths, as before
    grouped_mm.experts.use_grouped_mm = True
    variants = {
        "grouped": moe,
        "grouped_mm": grouped_mm,
        "loop": LoopMoE(moe),
        "dense": DenseSwiGLU(args.hidden, args.top_k * args.ffn),
    }
    x = torch.randn(1, args.tokens, args.hidden, requires_grad=True)
    for module in variants.values():  # warm-up
        step_seconds(module, x)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):  # interleaved, so drift hits every variant alike
        for name, module in variants.items():
            module.zero_grad(set_to_none=True)
            times[name].append(step_seconds(module, x))
    tokens_per_s = {name: args.tokens / statistics.median(t) for name, t in times.items()}
    active_flops = 6 * args.tokens * 3 * args.hidden * args.ffn * args.top_k  # fwd + bwd
    peak = matmul_gflops()
    result = {
        "benchmark": "moe_layer_fwd_bwd",
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "shape": vars(args),
        "tokens_per_s": {k: round(v, 1) for k, v in tokens_per_s.items()},
        "grouped_over_loop": round(tokens_per_s["grouped"] / tokens_per_s["loop"], 2),
        "grouped_over_dense": round(tokens_per_s["grouped"] / tokens_per_s["dense"], 2),
        "grouped_mm_over_grouped": round(tokens_per_s["grouped_mm"] / tokens_per_s["grouped"], 2),
        "grouped_gflops": round(active_flops / statistics.median(times["grouped"]) / 1e9, 1),
        "matmul_gflops": round(peak, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
