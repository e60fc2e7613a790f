"""Submit a recipe (or one stage) to a Ray cluster as a Ray Job, and follow its logs.

The cluster's auth token (Ray 2.60 turns token auth on by default) is honoured by Ray's own
client, which reads ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import time

# Never shipped to the cluster: environments, run outputs, VCS data.
WORKING_DIR_EXCLUDES = [".venv", "runs", ".git", "*.egg-info", "__pycache__", ".pytest_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 60  # how long a submission waits for a freshly started head's job agent


def run_arguments(recipe: str, stage: str | None, overrides: list[str], control: list[str] | None = None) -> list[str]:
    """``run RECIPE [--stage NAME] [--set KEY=VALUE ...] [CONTROL ...]``: the `llada` arguments of a
    job; ``control`` carries `llada run` flags such as --restart-stage NAME or --accept-changes."""
    argv = ["run", recipe, *(["--stage", stage] if stage else [])]
    for override in overrides:
        argv += ["--set", override]
    return argv + list(control or [])


def entrypoint(recipe: str, stage: str | None, overrides: list[str], python: str,
               control: list[str] | None = None) -> str:
    """The job's command: this project's CLI under an explicit interpreter (plain `python` may
    resolve to another interpreter on the cluster)."""
    return shlex.join([python, "-m", "llada", *run_arguments(recipe, stage, overrides, control)])


def submit_recipe(address: str, recipe: str, stage: str | None = None, overrides: list[str] | None = None,
                  working_dir: str = ".", python: str = sys.executable, control: list[str] | None = None) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint(recipe, stage, overrides or [], python, control),
                runtime_env={"working_dir": working_dir, "excludes": WORKING_DIR_EXCLUDES},
                entrypoint_num_cpus=0,  # the driver must not take a CPU the trainers need
                metadata={"llada.recipe": recipe, "llada.stage": stage or "all"},
            )
        except RuntimeError as error:
            # A head that has just started serves its dashboard before its job agent is up.
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def submission_problem(error: Exception) -> str:
    """One line saying what went wrong talking to the cluster, with the fix for a missing token."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "authentication" in str(error).lower() or "token" in str(error).lower():
        return (f"{text} (the cluster uses token auth: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, or "
                f"RAY_AUTH_TOKEN_PATH, to the cluster's token)")
    return text


def follow_job(address: str, job_id: str, timeout_s: float | None = None) -> str:
    """Stream the job's logs to stdout until it ends; returns its final status."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout_s))
    except asyncio.TimeoutError:
        pass
    deadline = time.monotonic() + 30
    status = str(client.get_job_status(job_id))
    while status.split(".")[-1] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id))
    return status.split(".")[-1]
