"""`llada demo`: the paper's five stages on the tiny model with local Ray and local storage,
then generations from the selected SFT checkpoint, a score table and a small report."""

from __future__ import annotations

import io
import json
import time
from typing import Any

from jobs.dag import corpus_uri, run_recipe, run_status
from jobs.tracking import Tracker
from jobs.training.stage import read_history
from llada.answers import sample_answers
from llada.console import Console, status_table
from llada.recipe import Recipe
from llada_core.options import SamplingOptions
from pipelines import storage

# The demo's samples: the laptop serve config's defaults (answers up to 64 tokens in blocks of 32,
# the fast options), so they show what `llada serve` answers.
DEMO_SAMPLING = SamplingOptions.fast(gen_length=64, block_length=32)


def demo_prompts(recipe: Recipe, per_task: int = 2, s3: storage.S3Settings | None = None) -> list[dict[str, str]]:
    """A few held-out questions with their answers, from the demo eval sets: reading (what the
    tiny model learns in the demo's budget) and arithmetic and counting (what it does not)."""
    rows = []
    for task in ("gen_reading", "gen_arithmetic", "gen_counting"):
        uri = storage.join(corpus_uri(recipe), "eval", f"{task}.jsonl")
        items = [json.loads(line) for line in storage.read_text(uri, s3).splitlines()[:per_task]]
        rows += [{"question": item["messages"][-1]["content"], "expected": item["chat_answer"]} for item in items]
    return rows


def write_report(recipe: Recipe, rows: list[dict[str, Any]], samples: list[dict[str, str]],
                 seconds: float, s3: storage.S3Settings | None) -> str:
    """report/report.md with the stage table and samples, plus two PNG plots."""
    report_uri = storage.join(recipe.run_uri, "report")
    storage.write_bytes(storage.join(report_uri, "loss_per_stage.png"), _loss_plot(recipe, s3), s3)
    storage.write_bytes(storage.join(report_uri, "eval_average.png"), _eval_plot(rows), s3)
    lines = [f"# {recipe.run_id}", "", f"Finished in {seconds / 60:.1f} minutes.", "",
             "| stage | checkpoint step | eval average | selected |", "|---|---|---|---|"]
    for row in rows:
        for c in row["checkpoints"]:
            chosen = "yes" if row["selected"] and row["selected"]["uri"] == c["uri"] else ""
            average = f"{c['eval_average']:.4f}" if c["eval_average"] is not None else "-"
            lines.append(f"| {row['stage']} | {c['step']} | {average} | {chosen} |")
    lines += ["", "## Samples from the selected SFT checkpoint", ""]
    lines += [f"- **{s['question']}** -> `{s['answer']}` (expected `{s['expected']}`)" for s in samples]
    lines += ["", "![loss](loss_per_stage.png)", "![eval](eval_average.png)", ""]
    storage.write_text(storage.join(report_uri, "report.md"), "\n".join(lines), s3)
    return report_uri


def _png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def _loss_plot(recipe: Recipe, s3: storage.S3Settings | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3.5))
    offset = 0
    for stage in recipe.stages:
        rows = [r for r in read_history(recipe.stage_uri(stage.name), s3) if "loss" in r]
        axis.plot([offset + r["step"] for r in rows], [r["loss"] for r in rows], label=stage.name)
        offset += rows[-1]["step"] if rows else 0
    axis.set(xlabel="optimizer step (stages back to back)", ylabel="training loss", title="loss per stage")
    axis.legend()
    return _png(figure)


def _eval_plot(rows: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3.5))
    labels, values = [], []
    for row in rows:
        for c in row["checkpoints"]:
            if c["eval_average"] is not None:
                labels.append(f"{row['stage']}\n{c['step']}")
                values.append(c["eval_average"])
    axis.bar(range(len(values)), values)
    axis.set_xticks(range(len(values)), labels, fontsize=7)
    axis.set(ylabel="eval average", title="eval average per checkpoint")
    return _png(figure)


def run_demo_pipeline(recipe: Recipe, s3: storage.S3Settings | None = None, console: Console | None = None,
                      restart_stages: list[str] | None = None, accept_changes: bool = False) -> dict[str, Any]:
    console = console or Console()
    started = time.perf_counter()
    run_recipe(recipe, s3, progress=console.say, on_step=console.step, restart_stages=restart_stages,
               accept_changes=accept_changes)
    rows = run_status(recipe, s3)
    final = rows[-1]["selected"]
    prompts = demo_prompts(recipe, s3=s3)
    answers = sample_answers(final["hf_uri"], [p["question"] for p in prompts], DEMO_SAMPLING, s3=s3)
    samples = [{**p, "answer": a} for p, a in zip(prompts, answers)]
    seconds = time.perf_counter() - started
    report_uri = write_report(recipe, rows, samples, seconds, s3)
    console.say()
    console.say(status_table(rows))
    console.say()
    for sample in samples:
        console.say(f"> {sample['question']}\n  {sample['answer']}   (expected: {sample['expected']})")
    console.say(f"\ndemo finished in {seconds / 60:.1f} min; report: {storage.join(report_uri, 'report.md')}")
    tracker = Tracker(recipe, s3, console.say)
    if tracker.attach():
        tracker.log_artifacts(report_uri, "report")
        if tracker.on and (hint := tracker.ui_hint()):
            console.say(f"runs, metrics and the registered model in MLflow: {hint}")
    return {"rows": rows, "samples": samples, "seconds": seconds, "report_uri": report_uri}
