"""Expert load under the two load-balancing conventions (mean over layers vs sum over layers).

Run: .venv/bin/python benchmarks/aux_loss.py [--steps 40] [--layers 4]     # ~3 minutes on 2 cores

The ``small`` preset's routing (64 experts, top-8) at a reduced width (hidden 256, expert FFN 128,
``--layers`` layers) is trained from the same initialisation on the same batches with the
pretraining objective plus 0.01 L_LB + 0.001 L_Z, once with L_LB averaged over layers (megablocks /
OLMoE, our default) and once summed (Switch / HF Mixtral), the runs' steps interleaved so drift
hits both alike. Data: Zipf-distributed token ids (a long-tailed vocabulary, as text has) in rows
of 256. Reported per convention: the expert load max/mean (routed slots of the busiest expert over
the mean, 1.0 = perfectly even), averaged over layers, at the start and over the last 10 steps,
and the diffusion loss over the last 10 steps. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llada_core import LLaDAMoEModelLM, preset  # noqa: E402
from llada_core.losses import expert_load, forward_process, pretrain_loss_from_hidden, total_loss  # noqa: E402


def max_over_mean(router_logits, top_k: int) -> float:
    loads = [expert_load(logits.detach(), top_k).float() for logits in router_logits]
    return statistics.mean(float(load.max() / load.mean()) for load in loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    config = preset("small", hidden_size=256, expert_intermediate_size=128, num_hidden_layers=args.layers,
                    num_attention_heads=4, num_key_value_heads=4)
    models, optimizers = {}, {}
    for layers_rule in ("mean", "sum"):
        torch.manual_seed(0)
        models[layers_rule] = LLaDAMoEModelLM(config).train()
        optimizers[layers_rule] = torch.optim.AdamW(models[layers_rule].parameters(), lr=1e-3, weight_decay=0.1)
    zipf = 1.0 / torch.arange(1, config.vocab_size - 1, dtype=torch.float64) ** 1.1
    data = torch.Generator().manual_seed(1)
    history = {rule: {"load": [], "loss": []} for rule in models}
    for step in range(args.steps):
        ids = torch.multinomial(zipf, args.batch * args.seq_len, replacement=True, generator=data)
        ids = (ids + 2).view(args.batch, args.seq_len)  # ids 0 and 1 are EOS and MASK
        for rule, model in models.items():
            batch = forward_process(ids, config.mask_token_id, generator=torch.Generator().manual_seed(1000 + step))
            out = model(batch.noisy_ids, hidden_only=True)
            diffusion = pretrain_loss_from_hidden(out.hidden_states, model.lm_head.weight, ids, batch)
            terms = total_loss(diffusion, out.router_logits, config.num_experts_per_tok, 0.01, 0.001,
                               load_balance_layers=rule)
            optimizers[rule].zero_grad(set_to_none=True)
            terms.total.backward()
            optimizers[rule].step()
            history[rule]["load"].append(max_over_mean(out.router_logits, config.num_experts_per_tok))
            history[rule]["loss"].append(float(diffusion.detach()))
        print(f"step {step + 1}: " + ", ".join(f"{rule} load {h['load'][-1]:.2f} loss {h['loss'][-1]:.3f}"
                                               for rule, h in history.items()), file=sys.stderr)
    summary = {rule: {"load_max_over_mean_start": round(h["load"][0], 2),
                      "load_max_over_mean_last10": round(statistics.mean(h["load"][-10:]), 2),
                      "diffusion_loss_last10": round(statistics.mean(h["loss"][-10:]), 3)}
               for rule, h in history.items()}
    print(json.dumps({"layers": args.layers, "steps": args.steps, "experts": config.num_experts,
                      "top_k": config.num_experts_per_tok, "conventions": summary}))


if __name__ == "__main__":
    main()
