"""Training observability: per-step metrics reduced over workers, MFU against the measured
matmul peak, progress lines, and the end-of-stage plot.

Legend: T tokens, E experts, L length, D hidden, N layers.
"""

from __future__ import annotations

import io
import time
from typing import Any

import torch
import torch.distributed as dist

from llada_core.config import LLaDAMoEConfig, count_parameters
from llada_core.losses import expert_load
from pipelines import storage


# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from NVIDIA's datasheets (SXM parts): the
# MFU denominator on these GPUs, and `llada plan`'s GPU-hours.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """The MFU denominator of the device a worker trains on -> (FLOP/s, where it came from): a
    known GPU's datasheet peak for bf16 (by name), else a timed matmul on that device in that
    dtype (the CPU's, a GPU's not in the table or in another dtype)."""
    device = torch.device(device)
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for gpu, peak in GPU_PEAK_FLOPS.items():
            if gpu in name.upper():
                return peak, f"{name} bf16 datasheet peak"
    return measured_matmul_flops(device=device, dtype=dtype), f"timed {dtype} matmul on {device}"


def measured_matmul_flops(size: int = 1024, repeats: int = 8, device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32) -> float:
    """Matmul FLOP/s on ``device`` in ``dtype`` (a measured peak where no datasheet one applies)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def model_flops_per_token(config: LLaDAMoEConfig) -> tuple[float, float]:
    """(FLOPs per token independent of length, FLOPs per token per unit of length) for one
    forward+backward: 6 x active matmul parameters (lm_head included; the embedding is a lookup),
    plus bidirectional attention scores and values: 12 x N x D per position attended."""
    return 6.0 * count_parameters(config)["active"], 12.0 * config.num_hidden_layers * config.hidden_size


class StepMetrics:
    """Reduces one optimizer step's micro-batch results over all workers into a metrics row."""

    def __init__(self, flops_per_token: tuple[float, float], peak_flops: float, world_size: int) -> None:
        self.flops_per_token, self.peak_flops, self.world_size = flops_per_token, peak_flops, world_size

    def summarise(self, results: list[dict[str, Any]], seconds: float, step: int, lr: float, top_k: int) -> dict[str, Any]:
        losses = torch.tensor([[r["terms"].total.item(), r["terms"].diffusion.item(), r["terms"].load_balance.item(),
                                r["terms"].z_loss.item()] for r in results]).mean(0)
        tokens = sum(r["num_tokens"] for r in results)
        flops = sum(r["num_tokens"] * (self.flops_per_token[0] + self.flops_per_token[1] * r["seq_len"]) for r in results)
        loads_NE = torch.stack([
            torch.stack([expert_load(layer_TE, top_k) for layer_TE in r["router_logits"]]) for r in results
        ]).sum(0).float()
        packed = torch.cat([losses, torch.tensor([tokens, flops, seconds]), loads_NE.flatten()])
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(packed)
        losses = packed[:4] / self.world_size
        tokens, flops, seconds = int(packed[4]), float(packed[5]), float(packed[6]) / self.world_size
        loads_NE = packed[7:].view_as(loads_NE)
        load_ratio_N = loads_NE.max(-1).values / loads_NE.mean(-1).clamp(min=1e-9)
        return {
            # seq_len: this worker's longest row this step (SFT batches are cut to their longest row)
            "step": step, "seq_len": max(r["seq_len"] for r in results), "loss": losses[0].item(),
            "diffusion_loss": losses[1].item(),
            "load_balance_loss": losses[2].item(), "z_loss": losses[3].item(), "lr": lr, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "mfu": flops / seconds / (self.peak_flops * self.world_size),
            "expert_load_ratio": load_ratio_N.mean().item(),
            "expert_load_ratio_per_layer": [round(x, 3) for x in load_ratio_N.tolist()],
        }

    @staticmethod
    def progress_line(row: dict[str, Any], num_steps: int, stage: str) -> str:
        return (f"[{stage}] step {row['step']}/{num_steps} loss {row['loss']:.4f} "
                f"(diffusion {row['diffusion_loss']:.4f}, lb {row['load_balance_loss']:.3f}, z {row['z_loss']:.3f}) "
                f"lr {row['lr']:.2e} {row['tokens_per_s']:.0f} tok/s mfu {100 * row['mfu']:.1f}% "
                f"expert load max/mean {row['expert_load_ratio']:.2f}")


def write_training_plot(stage_uri: str, history: list[dict[str, Any]], s3: storage.S3Settings | None = None) -> str:
    """PNG of loss and expert load ratio per step, written to ``{stage_uri}/training.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in history if "loss" in row]
    steps = [row["step"] for row in rows]
    figure, (loss_axis, load_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss_axis.plot(steps, [row["loss"] for row in rows], label="total")
    loss_axis.plot(steps, [row["diffusion_loss"] for row in rows], label="diffusion")
    loss_axis.set(xlabel="step", ylabel="loss", title="loss")
    loss_axis.legend()
    load_axis.plot(steps, [row["expert_load_ratio"] for row in rows])
    load_axis.set(xlabel="step", ylabel="max / mean", title="expert load (mean over layers)")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    uri = storage.join(stage_uri, "training.png")
    storage.write_bytes(uri, buffer.getvalue(), s3)
    return uri
