"""What the user of the `llada` command sees: tables and progress of the platform."""

from __future__ import annotations

from typing import Any


def status_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'stage':<12} {'state':<12} {'checkpoints (step: eval average)':<52} selected"]
    for row in rows:
        scored = ", ".join(f"{c['step']}: {c['eval_average']:.3f}" if c["eval_average"] is not None
                           else f"{c['step']}: -" for c in row["checkpoints"]) or "-"
        selected = row["selected_checkpoint_uri"].rsplit("/", 1)[-1] if row["selected_checkpoint_uri"] else "-"
        lines.append(f"{row['stage']:<12} {row['state']:<12} {scored:<52} {selected} ({row['selection_rule']})")
    return "\n".join(lines)
