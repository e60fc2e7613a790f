"""Fast diffusion sampling: tokens/s and exact match of the reference loop and of each fast option.

Run: .venv/bin/python benchmarks/sampler.py [--train-steps 2000] [--num-prompts 64] [--batch-size 16]
     [--checkpoint DIR [--prompts FILE.jsonl]] [--save DIR] [--threads 1] [--no-step-costs]

Legend: B batch, P prompt length, G gen length, L = P + G, K block length, V vocab.

Part 1, quality and speed (LLADA_SPEC section 6; issue 7's bar: the best combination >= 8x the
reference tokens/s with exact match within 2 points). Unless ``--checkpoint`` is given, a shrunk
``tiny`` model is trained for a few minutes with the SFT loss (paper Eq. 5: prompt kept clean,
answer and its EOS padding masked) on a synthetic task whose answers can be exact-matched:
copy a letter string, shift every letter by one, or add two numbers (digits least significant
first; half of the prompts). Every prompt has the same layout (task, a field of FIELD_WIDTH
tokens, SEP), so the answer sits at a fixed offset from its source; addition adds carries,
which the model learns only partly in this budget, so the reference is not at 100% and a
quality loss can show.
Every variant then decodes the same prompts at G = 256, K = 32, interleaved batch by batch
(reference, then each option alone, then combined), so that load from other work on a shared
machine hits all of them alike; compare the ratios, not the absolute figures, across runs.
tokens/s counts answer positions (B x G per batch) per second, EOS filled by early stop
included; every variant produces the same number of them.

Part 2, per-step cost: one forward of the ``small`` preset (random weights, batch 1) at
G = 512 after a 64-token prompt: full (the reference step: all L positions, all logits; and
with the block's logits only, as the cached sampler's block-start forward), prefix (block start
to the end, the block's logits; at blocks 0, 5, 10, 15 of 16, whose mean is the mean over all
blocks as the cost is linear in the span) and dual (the block only), interleaved.

Progress and the summary tables go to stderr; one JSON object goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from llada_core.config import LLaDAMoEConfig, preset
from llada_core.losses import forward_process, pad_sft_batch, sft_loss, total_loss
from llada_core.model import LLaDAMoEModelLM
from llada_core.sampling import generate

GEN_LENGTH, BLOCK_LENGTH = 256, 32

# Synthetic task vocabulary (64 ids). EOS = pad = 0 and MASK = 1 as in the tiny preset; 2-4 stay
# free for the role markers; then task ids, separators, digits and letters.
COPY, SHIFT, ADD, SEP, FILL = 5, 6, 7, 8, 9
DIGIT0, LETTER0, NUM_LETTERS, PLUS = 10, 20, 26, 46
TASKS = {COPY: "copy", SHIFT: "shift", ADD: "add"}
FIELD_WIDTH = 40  # prompt = [task] + field + [SEP]: P = 42 for every example
MIN_LETTERS, MAX_DIGITS = 6, 3
# Addition is drawn twice as often: it is the task the model learns last and least surely.
TASK_DRAW = (COPY, SHIFT, ADD, ADD)


def bench_config() -> LLaDAMoEConfig:
    """The ``tiny`` preset shrunk to train in minutes on 2 CPU cores (about 0.2 M parameters)."""
    return preset(
        "tiny", vocab_size=64, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=512,
    )


def reversed_digits(number: int) -> list[int]:
    return [DIGIT0 + int(c) for c in reversed(str(number))]


def make_example(rng: random.Random) -> tuple[list[int], list[int]]:
    """-> (prompt ids [P], answer ids). The answer's EOS padding is added by training / decoding."""
    task = rng.choice(TASK_DRAW)
    if task == ADD:
        a, b = (rng.randrange(10 ** rng.randint(1, MAX_DIGITS)) for _ in range(2))
        da, db = reversed_digits(a), reversed_digits(b)
        field = da + [FILL] * (MAX_DIGITS - len(da)) + [PLUS] + db + [FILL] * (MAX_DIGITS - len(db))
        answer = reversed_digits(a + b)
    else:
        letters = [LETTER0 + rng.randrange(NUM_LETTERS) for _ in range(rng.randint(MIN_LETTERS, FIELD_WIDTH))]
        field = letters
        answer = letters if task == COPY else [LETTER0 + (t - LETTER0 + 1) % NUM_LETTERS for t in letters]
    return [task] + field + [FILL] * (FIELD_WIDTH - len(field)) + [SEP], answer


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- training


def train(config: LLaDAMoEConfig, num_steps: int, batch_size: int, lr: float, seed: int) -> LLaDAMoEModelLM:
    """SFT (paper Eq. 5) on the synthetic task. Most batches pad the answers with a few EOS (cheap);
    a quarter pad to a random length up to G, so the model learns to write EOS to the end."""
    torch.manual_seed(seed)
    model = LLaDAMoEModelLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    start, warmup = time.perf_counter(), min(50, num_steps)
    for step in range(num_steps):
        # Linear warm-up, cosine decay to 10%.
        scale = min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / num_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        examples = [make_example(rng) for _ in range(batch_size)]
        longest_prompt = max(len(p) for p, _ in examples)
        longest_answer = max(len(a) for _, a in examples)
        padded_answer = rng.randint(longest_answer + 1, GEN_LENGTH) if rng.random() < 0.25 else longest_answer + rng.randint(1, 8)
        length = longest_prompt + padded_answer
        sequences = [p + a for p, a in examples]
        input_ids, response_mask = pad_sft_batch(sequences, [len(p) for p, _ in examples], config.eos_token_id, length)
        if input_ids.shape[1] < length:  # pad_sft_batch pads to the longest row; pad on to `length`
            extra = input_ids.new_full((batch_size, length - input_ids.shape[1]), config.eos_token_id)
            input_ids = torch.cat([input_ids, extra], dim=1)
            response_mask = torch.cat([response_mask, torch.ones_like(extra, dtype=torch.bool)], dim=1)
        batch = forward_process(input_ids, config.mask_token_id, maskable=response_mask, generator=generator)
        out = model(batch.noisy_ids)
        diffusion = sft_loss(out.logits, input_ids, batch, response_mask)
        loss = total_loss(diffusion, out.router_logits, config.num_experts_per_tok).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 200 == 0 or step == num_steps - 1:
            log(f"[train] step {step + 1}/{num_steps}  sft loss {diffusion.item():.4f}  {time.perf_counter() - start:.0f}s")
    return model.eval()


# --------------------------------------------------------------------------- decoding


def variants(thresholds: list[float]) -> dict[str, dict]:
    """Sampler options per variant; ``steps`` = G throughout (used only without a threshold)."""
    tau = 0.9
    out = {
        "reference": {},
        f"threshold {tau}": dict(threshold=tau),
        "prefix cache": dict(cache="prefix"),
        "dual cache": dict(cache="dual"),
        "early stop": dict(early_stop=True),
        f"threshold {tau} + prefix": dict(threshold=tau, cache="prefix"),
        f"threshold {tau} + dual": dict(threshold=tau, cache="dual"),
        f"threshold {tau} + prefix + early stop": dict(threshold=tau, cache="prefix", early_stop=True),
    }
    for other in sorted(set(thresholds) | {tau}):
        out[f"threshold {other} + dual + early stop"] = dict(threshold=other, cache="dual", early_stop=True)
    return out


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids_BP = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask_BP = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids_BP[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask_BP[row, width - len(prompt):] = 1
    return ids_BP, mask_BP


def answer_of(row_ids: list[int], eos_id: int) -> list[int]:
    return row_ids[: row_ids.index(eos_id)] if eos_id in row_ids else row_ids


@torch.no_grad()
def evaluate(model: LLaDAMoEModelLM, examples: list[tuple[list[int], list[int]]], batch_size: int,
             options_by_name: dict[str, dict]) -> dict[str, dict]:
    """Decode every batch with every variant in turn; -> per variant: seconds, forwards, answers."""
    config = model.config
    num_forwards = [0]
    model.register_forward_pre_hook(lambda module, args: num_forwards.__setitem__(0, num_forwards[0] + 1))
    stats = {name: {"seconds": 0.0, "forwards": 0, "num_batches": 0, "answers": []} for name in options_by_name}
    num_batches = math.ceil(len(examples) / batch_size)
    for index in range(num_batches):
        chunk = examples[index * batch_size:(index + 1) * batch_size]
        prompt_BP, mask_BP = left_pad([p for p, _ in chunk], config.pad_token_id)
        timings = []
        for name, options in options_by_name.items():
            num_forwards[0] = 0
            start = time.perf_counter()
            out_BL = generate(model, prompt_BP, attention_mask=mask_BP, steps=GEN_LENGTH, gen_length=GEN_LENGTH,
                              block_length=BLOCK_LENGTH, **options)
            seconds = time.perf_counter() - start
            stats[name]["seconds"] += seconds
            stats[name]["forwards"] += num_forwards[0]
            stats[name]["num_batches"] += 1
            stats[name]["answers"] += [answer_of(row, config.eos_token_id) for row in out_BL[:, prompt_BP.shape[1]:].tolist()]
            timings.append(f"{name} {seconds:.1f}s")
        log(f"[decode] batch {index + 1}/{num_batches}: " + ", ".join(timings))
    return stats


def task_name(prompt: list[int], synthetic: bool) -> str:
    return TASKS[prompt[0]] if synthetic else "all"


def summarize(stats: dict[str, dict], examples: list[tuple[list[int], list[int]]], synthetic: bool) -> dict[str, dict]:
    reference = stats["reference"]
    num_positions = len(examples) * GEN_LENGTH
    summary = {}
    for name, s in stats.items():
        correct = [got == answer for got, (_, answer) in zip(s["answers"], examples)]
        by_task: dict[str, list[bool]] = {}
        for ok, (prompt, _) in zip(correct, examples):
            by_task.setdefault(task_name(prompt, synthetic), []).append(ok)
        summary[name] = {
            "tokens_per_s": round(num_positions / s["seconds"], 1),
            "speedup": round(reference["seconds"] / s["seconds"], 2),
            "exact_match": round(100 * sum(correct) / len(correct), 2),
            "exact_match_by_task": {task: round(100 * sum(v) / len(v), 1) for task, v in sorted(by_task.items())},
            "same_answer_as_reference": round(
                100 * sum(a == b for a, b in zip(s["answers"], reference["answers"])) / len(examples), 2),
            "forwards": s["forwards"],
            "forwards_per_batch": round(s["forwards"] / s["num_batches"], 1),
            "seconds": round(s["seconds"], 2),
        }
    return summary


# --------------------------------------------------------------------------- per-step cost


@torch.no_grad()
def step_costs(prompt_length: int = 64, gen_length: int = 512, block_length: int = 32, rounds: int = 3) -> dict:
    """Seconds of one sampling step's forward, ``small`` preset, batch 1: full / prefix / dual."""
    torch.manual_seed(0)
    model = LLaDAMoEModelLM(preset("small")).eval()
    config = model.config
    length = prompt_length + gen_length
    x_BL = torch.randint(5, config.vocab_size, (1, length))
    block_starts = list(range(prompt_length, length, block_length))
    middle = block_starts[len(block_starts) // 2]
    cache = model(x_BL, use_cache=True, logits_slice=slice(middle, middle + block_length)).past_key_values
    logits_of_block = slice(0, block_length)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    measured_starts = block_starts[:: max(1, (len(block_starts) - 1) // 3)][:4]
    measured_starts[-1] = block_starts[-1]
    full, full_block, dual, prefix = [], [], [], {start: [] for start in measured_starts}
    for _ in range(rounds):  # interleaved, so drift hits every variant alike
        full.append(timed(lambda: model(x_BL)))
        full_block.append(timed(lambda: model(x_BL, logits_slice=slice(middle, middle + block_length))))
        dual.append(timed(lambda: model(x_BL[:, middle:middle + block_length], past_key_values=cache,
                                         cache_start=middle, logits_slice=logits_of_block)))
        for start in measured_starts:
            prefix[start].append(timed(lambda start=start: model(
                x_BL[:, start:], past_key_values=cache, cache_start=start, logits_slice=logits_of_block)))
        log(f"[step cost] round done: full {full[-1]:.3f}s, dual {dual[-1]:.3f}s")
    full_s, dual_s = statistics.median(full), statistics.median(dual)
    prefix_s = {start: statistics.median(t) for start, t in prefix.items()}
    prefix_mean = statistics.mean(prefix_s.values())  # every block has the same number of steps
    return {
        "preset": "small", "batch": 1, "prompt_length": prompt_length, "gen_length": gen_length,
        "block_length": block_length,
        "full_s": round(full_s, 4),
        "full_block_logits_s": round(statistics.median(full_block), 4),
        "prefix_mean_s": round(prefix_mean, 4),
        "prefix_first_block_s": round(prefix_s[block_starts[0]], 4),
        "prefix_last_block_s": round(prefix_s[block_starts[-1]], 4),
        "dual_s": round(dual_s, 4),
        "full_over_prefix": round(full_s / prefix_mean, 2),
        "full_over_dual": round(full_s / dual_s, 2),
    }


# --------------------------------------------------------------------------- main


def load_examples(args: argparse.Namespace) -> list[tuple[list[int], list[int]]]:
    if args.prompts:
        rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        return [(row["prompt"], row["answer"]) for row in rows][: args.num_prompts]
    rng = random.Random(args.seed + 1)  # not the training stream
    return [make_example(rng) for _ in range(args.num_prompts)]


def print_tables(summary: dict[str, dict], costs: dict | None) -> None:
    log(f"\n{'variant':44s} {'tokens/s':>9s} {'speedup':>8s} {'exact %':>8s} {'same %':>7s} {'fwd/batch':>9s}")
    for name, s in summary.items():
        log(f"{name:44s} {s['tokens_per_s']:9.1f} {s['speedup']:7.2f}x {s['exact_match']:8.2f} "
            f"{s['same_answer_as_reference']:7.1f} {s['forwards_per_batch']:9.1f}")
    if costs:
        log(f"\nper-step forward, small preset, G {costs['gen_length']}: full {costs['full_s']:.3f}s "
            f"({costs['full_block_logits_s']:.3f}s with the block's logits only), "
            f"prefix {costs['prefix_mean_s']:.3f}s (mean over blocks; {costs['prefix_first_block_s']:.3f}s first, "
            f"{costs['prefix_last_block_s']:.3f}s last), dual {costs['dual_s']:.3f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--train-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="decode batch size")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.7, 0.8, 0.95],
                        help="extra thresholds for the threshold + dual + early stop sweep (0.9 always runs)")
    parser.add_argument("--checkpoint", help="load this checkpoint (llada_core.checkpoint) instead of training")
    parser.add_argument("--prompts", help="JSON lines {\"prompt\": [ids], \"answer\": [ids]}; default: the synthetic task")
    parser.add_argument("--save", help="save the trained model here (reuse it with --checkpoint)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; 1 is fastest for these sizes on a small shared CPU")
    parser.add_argument("--no-step-costs", action="store_true", help="skip part 2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    if args.checkpoint:
        from llada_core.checkpoint import load_model

        model = load_model(args.checkpoint).eval()
        trained = {"checkpoint": args.checkpoint}
    else:
        train_start = time.perf_counter()
        model = train(bench_config(), args.train_steps, args.train_batch_size, args.lr, args.seed)
        trained = {"train_steps": args.train_steps, "train_seconds": round(time.perf_counter() - train_start, 1)}
        if args.save:
            from llada_core.checkpoint import save_model

            save_model(model, args.save)
    examples = load_examples(args)
    stats = evaluate(model, examples, args.batch_size, variants(args.thresholds))
    summary = summarize(stats, examples, synthetic=not args.prompts)
    costs = None if args.no_step_costs else step_costs()
    print_tables(summary, costs)
    best = max((n for n in summary if n != "reference"), key=lambda n: summary[n]["speedup"])
    within = [n for n in summary if summary["reference"]["exact_match"] - summary[n]["exact_match"] <= 2.0]
    best_within = max(within, key=lambda n: summary[n]["speedup"])
    result = {
        "benchmark": "sampler",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}",
        "model": trained,
        "num_prompts": len(examples), "decode_batch_size": args.batch_size,
        "gen_length": GEN_LENGTH, "block_length": BLOCK_LENGTH,
        "variants": summary,
        "fastest": best,
        "fastest_within_2_points": best_within,
        "bar_met": summary[best_within]["speedup"] >= 8.0,
        "step_costs": costs,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    log(f"\nfastest within 2 points of the reference: {best_within} "
        f"({summary[best_within]['speedup']}x, bar 8x {'met' if result['bar_met'] else 'NOT met'}); "
        f"total {result['total_seconds']}s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
