"""What the user of the `llada` command sees.

Each platform line is printed once; a progress bar per training stage shows step, loss,
tokens/s and the time left; a summary table ends long commands. Everything else that this
process writes (Ray's and Ray Data's logs, DeepSpeed's, the output Ray forwards from its
workers, stray C++ logs) goes to a log file under the run folder, whose path is printed once.
``--verbose`` leaves all of it on the terminal.

How: the process's stdout and stderr file descriptors are pointed at the log file for the
duration of the command, and the console keeps duplicates of the original ones for its own
lines. That catches every writer, Python or not, with no knowledge of any library's loggers.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import traceback
from typing import Any, Iterator, TextIO

# A stage's progress is printed as a plain line at most this often where there is no terminal
# to redraw a bar on (CI logs, Ray Job logs, --verbose).
PLAIN_PROGRESS_EVERY_S = 30.0


class Console:
    """The `llada` command's output: ``say`` (a platform line), ``error``, ``step`` (a training
    row: the stage's progress bar), and ``routed(log_path)`` for everything else."""

    def __init__(self, verbose: bool = False, out: TextIO | None = None, err: TextIO | None = None,
                 user_errors: tuple[type[BaseException], ...] = ()) -> None:
        self.verbose = verbose
        self.user_errors = user_errors  # raised on to the caller, who names them in one line
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.log_path: str | None = None
        self._bar: Any = None
        self._bar_stage: str | None = None
        self._last_plain = 0.0

    # ------------------------------------------------------------ platform lines

    def say(self, text: str = "") -> None:
        self._close_bar_if_done()
        self._write(self.out, text)

    def error(self, text: str) -> None:
        self._write(self.err, text)

    def _write(self, stream: TextIO, text: str) -> None:
        if self._bar is not None:
            self._bar.clear()
        stream.write(text + "\n")
        stream.flush()
        if self._bar is not None:
            self._bar.refresh()

    # ------------------------------------------------------------ training progress

    def step(self, row: dict[str, Any]) -> None:
        """One optimizer step of a stage: ``{"stage", "step", "num_steps", "loss", "tokens_per_s"}``,
        or a line a worker has to say: ``{"note": text}``."""
        if "note" in row:
            self._write(self.out, row["note"])
            return
        if self._bar_stage != row["stage"]:
            self._finish_bar()
            self._start_bar(row)
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {row['loss']:.4f}, {row['tokens_per_s']:.0f} tok/s", refresh=False)
            self._bar.update(row["step"] - self._bar.n)
        else:
            now = time.monotonic()
            if row["step"] == row["num_steps"] or now - self._last_plain >= PLAIN_PROGRESS_EVERY_S:
                self._last_plain = now
                self._write(self.out, f"[{row['stage']}] step {row['step']}/{row['num_steps']} loss {row['loss']:.4f} "
                                      f"{row['tokens_per_s']:.0f} tok/s")
        if row["step"] >= row["num_steps"]:
            self._finish_bar()

    def _start_bar(self, row: dict[str, Any]) -> None:
        self._bar_stage = row["stage"]
        self._last_plain = 0.0
        if self.verbose or not self.out.isatty():
            return
        from tqdm import tqdm

        self._bar = tqdm(total=row["num_steps"], initial=row["step"] - 1, desc=row["stage"], unit="step",
                         file=self.out, dynamic_ncols=True, leave=True)

    def _finish_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._bar_stage = None, None

    def _close_bar_if_done(self) -> None:
        if self._bar is not None and self._bar.n >= (self._bar.total or 0):
            self._finish_bar()

    # ------------------------------------------------------------ everything else

    @contextlib.contextmanager
    def routed(self, log_path: str) -> Iterator[None]:
        """Send this process's stdout/stderr to ``log_path`` while the block runs (not with
        ``verbose``, nor where they are not real files, as under pytest's capsys). An exception
        that escapes is written there with its traceback and named on the terminal."""
        if self.verbose or not _has_fds():
            yield
            return
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        saved_out, saved_err = os.dup(1), os.dup(2)
        terminal_out = os.fdopen(saved_out, "w", buffering=1, encoding="utf-8", errors="replace")
        terminal_err = os.fdopen(saved_err, "w", buffering=1, encoding="utf-8", errors="replace")
        previous = (self.out, self.err)
        self.out, self.err, self.log_path = terminal_out, terminal_err, log_path
        with open(log_path, "a", encoding="utf-8") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            self.say(f"logs: {log_path} (Ray, Ray Data and DeepSpeed output; --verbose shows it here)")
            try:
                yield
            except self.user_errors:
                raise
            except Exception as error:
                traceback.print_exc()
                self.error(f"llada: {type(error).__name__}: {error}\n  (traceback in {log_path})")
                raise SystemExit(1) from None
            finally:
                self._finish_bar()
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(terminal_out.fileno(), 1)
                os.dup2(terminal_err.fileno(), 2)
                self.out, self.err = previous
                terminal_out.close()
                terminal_err.close()


def _has_fds() -> bool:
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False


def status_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'stage':<12} {'state':<12} {'checkpoints (step: eval average)':<52} selected"]
    for row in rows:
        scored = ", ".join(f"{c['step']}: {c['eval_average']:.3f}" if c["eval_average"] is not None
                           else f"{c['step']}: -" for c in row["checkpoints"]) or "-"
        selected = f"step {row['selected']['step']}" if row["selected"] else "-"
        lines.append(f"{row['stage']:<12} {row['state']:<12} {scored:<52} {selected} ({row['selection_rule']})")
    return "\n".join(lines)


def scores_table(records: list[dict[str, Any]]) -> str:
    """Score records (jobs/evaluation/runner.py) as a table: one row per checkpoint, a column of
    normalised scores per task, then the average."""
    if not records:
        return "no score records"
    tasks = list(dict.fromkeys(name for record in records for name in record["tasks"]))
    width = max(10, *(len(name) for name in tasks))
    header = f"{'checkpoint':<12}" + "".join(f" {name:>{width}}" for name in tasks) + f" {'average':>{width}}"
    lines = [header]
    for record in records:
        step = (record.get("checkpoint") or {}).get("step", "-")
        cells = "".join(f" {record['tasks'][name]['score']:>{width}.4f}" if name in record["tasks"]
                        else f" {'-':>{width}}" for name in tasks)
        lines.append(f"{'step ' + str(step):<12}{cells} {record['average']:>{width}.4f}")
    metrics = ", ".join(f"{name}: {records[0]['tasks'][name]['metric']}" for name in tasks if name in records[0]["tasks"])
    lines.append(f"(scores in [0, 1], higher is better; metrics: {metrics})")
    return "\n".join(lines)
