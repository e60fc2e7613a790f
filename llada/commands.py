"""`llada` commands around a recipe: run, train, status, eval, generate, submit, demo.

Each command is an ``add_*`` (arguments) / ``run_*`` (behaviour) pair registered in llada/cli.py.
A bad recipe exits non-zero with the field path; long commands print progress and end with a
summary table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from llada.console import Console, status_table

RECIPES_DIR = Path(__file__).resolve().parents[1] / "jobs" / "recipes"
DEMO_RECIPE = RECIPES_DIR / "tiny-cpu.yaml"


def _recipe_arguments(parser: argparse.ArgumentParser, recipe_optional: bool = False) -> None:
    parser.add_argument("recipe", nargs="?" if recipe_optional else None, help="recipe YAML (path or URI)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set stages.sft.num_steps=10 (repeatable)")
    parser.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    add_verbose_argument(parser)


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's, Ray Data's and DeepSpeed's own output here instead of in the log file")


def load(args: argparse.Namespace, default: Path | None = None) -> Any:
    """The validated recipe, or SystemExit(2) naming the field path."""
    from pydantic import ValidationError

    from llada.recipe import load_recipe

    path = args.recipe or (str(default) if default else None)
    if path is None:
        raise SystemExit("llada: a recipe is required")
    try:
        return load_recipe(path, args.set)
    except ValidationError as error:
        print(f"llada: invalid recipe {path}:", file=sys.stderr)
        for problem in error.errors():
            field = ".".join(str(part) for part in problem["loc"]) or "(top level)"
            print(f"  {field}: {problem['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as error:
        print(f"llada: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _start_ray(args: argparse.Namespace, held: contextlib.ExitStack) -> bool:
    """Connect to (or start) Ray unless it is up; returns whether this call did. With
    ``args.nodes`` (rehearse), a local cluster of that many nodes is started first (llada/cluster.py)
    and stopped when ``held`` closes."""
    import ray

    if ray.is_initialized():
        return False
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if getattr(args, "nodes", None):
        from llada.cluster import local_cluster

        address = held.enter_context(local_cluster(args.nodes, args.cpus_per_node))
    ray.init(address=address, include_dashboard=False, log_to_driver=True)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = bool(args.verbose and sys.stdout.isatty())
    return True


def log_location(run_uri: str, command: str) -> tuple[str, str | None]:
    """(local log file, where to copy it at the end or None): under ``{run}/logs/`` for a local
    run; for a run in s3://, a local temporary file that is uploaded there when the command ends."""
    from pipelines import storage

    name = f"llada-{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    if not storage.is_remote(run_uri):
        return os.path.join(storage.parse_uri(run_uri).path, "logs", name), None
    return os.path.join(tempfile.gettempdir(), "llada-logs", name), storage.join(run_uri, "logs", name)


@contextlib.contextmanager
def ray_session(args: argparse.Namespace, run_uri: str, lease: bool = False) -> Iterator[Console]:
    """The console with every other output routed to the run's log file, the run's driver lease
    when ``lease`` (jobs/lease.py: before any work), then Ray."""
    from jobs.lease import run_lease
    from pipelines import storage

    console: Console = args.console
    log_path, upload_uri = log_location(run_uri, args.command)
    try:
        with console.routed(log_path), contextlib.ExitStack() as held:
            if lease:
                held.enter_context(run_lease(run_uri, f"llada {args.command}", _s3(),
                                             break_lease=args.break_lease, say=console.say))
            if _start_ray(args, held):
                import ray

                # Disconnect while output is still routed: workers' last lines (a library's progress
                # bar flushed at exit) would otherwise reach the terminal after the command's end.
                held.callback(ray.shutdown)
            yield console
    finally:
        if upload_uri is not None and os.path.exists(log_path):
            with contextlib.suppress(Exception):  # the log is a convenience; never fail the command for it
                storage.write_bytes(upload_uri, Path(log_path).read_bytes(), _s3())


def _s3() -> Any:
    from pipelines.storage import S3Settings

    return S3Settings.from_env()


def add_run_command(subparsers: Any) -> None:
    run = subparsers.add_parser("run", help="run a recipe's stages in order (skips finished stages, resumes)")
    _recipe_arguments(run)
    run.add_argument("--stage", help="run only this stage (the stages it starts from must be done)")
    add_run_control_arguments(run)
    run.set_defaults(handler=run_run)
    train = subparsers.add_parser("train", help="train one stage of a recipe (same as run --stage NAME)")
    _recipe_arguments(train)
    train.add_argument("--stage", required=True, help="the stage to train")
    add_run_control_arguments(train)
    train.set_defaults(handler=run_run)


def add_run_control_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--restart-stage", action="append", default=[], metavar="NAME",
                        help="train this stage again from its start (repeatable); its folder, and those of the "
                             "stages that start from it, are archived, not deleted")
    parser.add_argument("--accept-changes", action="store_true",
                        help="resume stages whose recipe changed only in fields safe to change mid-stage "
                             "(checkpoint_every, keep_last, log_every, CPU use, retries)")
    parser.add_argument("--break-lease", action="store_true",
                        help="take the run from another driver's lease (only when that driver is known to be dead)")


def run_control(args: argparse.Namespace) -> list[str]:
    """The run-control flags as `llada run` arguments (for a submitted job)."""
    flags = [arg for name in args.restart_stage for arg in ("--restart-stage", name)]
    return flags + (["--accept-changes"] if args.accept_changes else []) + (["--break-lease"] if args.break_lease else [])


def run_run(args: argparse.Namespace) -> int:
    from jobs.dag import run_recipe, run_status

    recipe = load(args)
    s3 = _s3()
    with ray_session(args, recipe.run_uri, lease=True) as console:
        run_recipe(recipe, s3, only_stage=args.stage, progress=console.say, on_step=console.step,
                   restart_stages=args.restart_stage, accept_changes=args.accept_changes)
        console.say()
        console.say(status_table(run_status(recipe, s3)))
    return 0


def add_status_command(subparsers: Any) -> None:
    status = subparsers.add_parser("status", help="stages, checkpoints, scores and selections of a run")
    _recipe_arguments(status)
    status.add_argument("--json", action="store_true", help="print JSON (each stage's selected checkpoint URI)")
    status.set_defaults(handler=run_status_command)


def run_status_command(args: argparse.Namespace) -> int:
    from jobs.dag import run_status

    from jobs.tracking import read_record, resolve_uri

    recipe = load(args)
    s3 = _s3()
    rows = run_status(recipe, s3)
    tracking = read_record(recipe, s3) or {"uri": resolve_uri(recipe)[0], "run_id": None, "stages": {}}
    args.console.say(json.dumps({"run_uri": recipe.run_uri, "tracking": tracking, "stages": rows}, indent=2)
                     if args.json else status_table(rows))
    return 0


def add_eval_command(subparsers: Any) -> None:
    evaluate = subparsers.add_parser(
        "eval", help="score checkpoints with the recipe's eval suite (or ad hoc lm-eval tasks)",
        description="Scores every complete checkpoint of a stage and prints each task's score and the average. "
                    "With --lm-eval-tasks the named lm-evaluation-harness tasks run instead of the suite, and "
                    "nothing is recorded (the recipe suite's scores, which select checkpoints, stay as they are).")
    _recipe_arguments(evaluate)
    evaluate.add_argument("--stage", required=True, help="score every complete checkpoint of this stage")
    evaluate.add_argument("--lm-eval-tasks", metavar="TASK[=METRIC]", nargs="+",
                          help="lm-eval tasks to run ad hoc, e.g. arc_easy=acc_norm gsm8k=exact_match,flexible-extract "
                               "(metric: the first the task reports when left out)")
    evaluate.add_argument("--include-path", help="a folder of lm-eval task YAMLs for --lm-eval-tasks (path or s3://)")
    evaluate.add_argument("--limit", type=int, help="items per --lm-eval-tasks task (all when left out)")
    evaluate.set_defaults(handler=run_eval)


def ad_hoc_suite(entries: list[str], include_path: str | None, limit: int | None) -> Any:
    """The EvalSuiteConfig of ``--lm-eval-tasks TASK[=METRIC] ...`` (ValueError naming a bad entry)."""
    from pydantic import ValidationError

    from jobs.evaluation.tasks import EvalSuiteConfig
    from llada_core.options import describe_error

    tasks = []
    for entry in filter(None, (part.strip() for part in entries)):
        task, _, metric = entry.partition("=")
        tasks.append({"name": task.replace("/", "_"), "kind": "lm_eval", "task": task, "metric": metric or None,
                      "include_path": include_path, "max_items": limit})
    try:
        return EvalSuiteConfig.model_validate({"tasks": tasks})
    except ValidationError as error:
        raise ValueError(f"--lm-eval-tasks: {describe_error(error)}") from None


def run_eval(args: argparse.Namespace) -> int:
    from jobs import checkpoints as ckpt
    from jobs.dag import corpus_uri, eval_suite
    from jobs.evaluation.runner import evaluate_checkpoints_ray
    from llada.console import scores_table

    recipe = load(args)
    s3 = _s3()
    suite, record = eval_suite(recipe), True
    if args.lm_eval_tasks:
        try:
            suite, record = ad_hoc_suite(args.lm_eval_tasks, args.include_path, args.limit), False
        except ValueError as error:
            args.console.error(f"llada eval: {error}")
            return 2
    infos = ckpt.list_checkpoints(recipe.stage_uri(recipe.stage(args.stage).name), s3)
    if not infos:
        args.console.error(f"llada eval: stage {args.stage!r} has no complete checkpoint")
        return 2
    with ray_session(args, recipe.run_uri) as console:
        records = evaluate_checkpoints_ray(infos, suite, corpus_uri(recipe), s3, progress=console.say, record=record)
        console.say(scores_table(records))
    return 0


def add_lm_eval_command(subparsers: Any) -> None:
    subparsers.add_parser(
        "lm-eval", add_help=False,
        help="lm-evaluation-harness's own command line with the `llada` model registered "
             "(llada lm-eval --model llada --model_args pretrained=DIR --tasks T)")


def run_lm_eval(argv: list[str]) -> int:
    """``llada lm-eval ARGS`` = ``lm_eval ARGS`` after registering our model (lm-eval finds no
    third-party model by itself: jobs/evaluation/lm_eval_model.py)."""
    import jobs.evaluation.lm_eval_model  # noqa: F401  (registers "llada")
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exit_:  # argparse's --help and errors end lm-eval this way
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        sys.argv = saved
    return 0


def add_generate_command(subparsers: Any) -> None:
    generate = subparsers.add_parser(
        "generate", help="sample answers from a checkpoint (an HF-layout folder, local or s3://)",
        description="Sample with the fast options the server uses (threshold 0.9, dual KV cache, early stop) "
                    "unless told otherwise; --reference runs the reference loop (one commit per step).")
    generate.add_argument("--checkpoint", required=True, help="HF-layout checkpoint folder (path or s3://)")
    generate.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    generate.add_argument("--raw", action="store_true", help="no chat template: continue the text as given")
    generate.add_argument("--gen-length", type=int, default=64, help="answer tokens (default 64)")
    generate.add_argument("--block-length", type=int, help="tokens per block (default 32, or gen-length if smaller)")
    generate.add_argument("--steps", type=int, help="sampling steps in total, without a threshold (default gen-length)")
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--seed", type=int, default=0, help="seed of the random draws (temperature > 0)")
    generate.add_argument("--threshold", type=float, help="confidence threshold (default 0.9)")
    generate.add_argument("--cache", choices=["prefix", "dual", "none"], help="KV cache (default dual)")
    generate.add_argument("--no-early-stop", action="store_true", help="sample every block even after EOS")
    generate.add_argument("--reference", action="store_true",
                          help="the reference loop: no threshold, no cache, no early stop")
    generate.set_defaults(handler=run_generate)


def generation_options(args: argparse.Namespace) -> Any:
    """The SamplingOptions of `llada generate`'s flags (ValueError naming a bad one)."""
    from llada_core.options import FAST_OPTIONS, SamplingOptions

    fields: dict[str, Any] = dict(FAST_OPTIONS) if not args.reference else {}
    fields.update(gen_length=args.gen_length, temperature=args.temperature,
                  block_length=args.block_length or min(32, args.gen_length))
    if args.steps is not None:
        fields["steps"] = args.steps
    if args.threshold is not None:
        fields["threshold"] = args.threshold
    if args.cache is not None:
        fields["cache"] = None if args.cache == "none" else args.cache
    if args.no_early_stop:
        fields["early_stop"] = False
    return SamplingOptions.checked(**fields)


def run_generate(args: argparse.Namespace) -> int:
    from llada.answers import sample_answers

    try:
        options = generation_options(args)
    except ValueError as error:
        print(f"llada generate: {error}", file=sys.stderr)
        return 2
    answers = sample_answers(args.checkpoint, args.prompt, options, chat=not args.raw,
                             temperature_seed=args.seed, s3=_s3())
    for prompt, answer in zip(args.prompt, answers):
        print(f"> {prompt}\n{answer}\n")
    return 0


def add_submit_command(subparsers: Any) -> None:
    submit = subparsers.add_parser("submit", help="submit a recipe (or one stage) to a Ray cluster as a Ray Job")
    submit.add_argument("recipe", help="recipe YAML inside the working directory")
    submit.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    submit.add_argument("--stage", help="submit only this stage")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    submit.add_argument("--working-dir", default=".", help="shipped as the job's runtime env (default: .)")
    submit.add_argument("--python", default=sys.executable,
                        help="interpreter on the cluster (default: this one; `python` may resolve elsewhere)")
    add_run_control_arguments(submit)
    submit.set_defaults(handler=run_submit)


def run_submit(args: argparse.Namespace) -> int:
    from jobs.submit import follow_job, submission_problem, submit_recipe

    load(argparse.Namespace(recipe=args.recipe, set=args.set))  # validate before shipping anything
    try:
        job_id = submit_recipe(args.address, args.recipe, stage=args.stage, overrides=args.set,
                               working_dir=args.working_dir, python=args.python, control=run_control(args))
    except Exception as error:  # Ray's client raises plain exceptions for refused connections and auth
        print(f"llada submit: could not submit to {args.address}: {submission_problem(error)}", file=sys.stderr)
        return 1
    print(f"submitted job {job_id} to {args.address}", flush=True)
    if args.follow:
        status = follow_job(args.address, job_id)
        print(f"job {job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    return 0


def add_demo_command(subparsers: Any) -> None:
    demo = subparsers.add_parser("demo", help="the whole pipeline on the tiny model, locally, in minutes")
    _recipe_arguments(demo, recipe_optional=True)
    demo.add_argument("--output", help="storage folder (default: the recipe's, ./runs)")
    add_run_control_arguments(demo)
    demo.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from llada.demo import run_demo_pipeline

    if args.output:
        args.set = [f"storage_uri={args.output}", *args.set]
    recipe = load(args, default=DEMO_RECIPE)
    with ray_session(args, recipe.run_uri, lease=True) as console:
        run_demo_pipeline(recipe, _s3(), console, restart_stages=args.restart_stage,
                          accept_changes=args.accept_changes)
    return 0


def add_plan_command(subparsers: Any) -> None:
    plan = subparsers.add_parser("plan", help="what each stage will do, on what, for how long; every problem, "
                                              "before anything trains")
    _recipe_arguments(plan)
    plan.add_argument("--gpus", type=int, metavar="N", help="check the layout against a cluster of N GPUs (default: "
                                                             "the Ray cluster at --ray-address / RAY_ADDRESS, if any)")
    plan.add_argument("--mfu", type=float, default=None, metavar="X",
                      help="model FLOPs utilisation the GPU-hours assume (default 0.35)")
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.set_defaults(handler=run_plan_command)


def run_plan_command(args: argparse.Namespace) -> int:
    """Exit 0 when nothing would stop the recipe, 1 naming every problem (2: the recipe itself is
    invalid, from load)."""
    from llada.plan import DEFAULT_MFU, connected_gpus, plan_recipe, render

    recipe = load(args)
    gpus, gpus_from = args.gpus, "--gpus"
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if gpus is None and address:
        try:
            gpus, gpus_from = connected_gpus(address), "the connected cluster"
        except Exception as error:  # Ray raises plain exceptions for refused connections and auth
            print(f"llada plan: cannot reach the Ray cluster at {address} ({' '.join(str(error).split())[:200]}); "
                  "give --gpus N to plan without it", file=sys.stderr)
            return 2
    try:
        plan = plan_recipe(recipe, _s3(), gpus=gpus, mfu=DEFAULT_MFU if args.mfu is None else args.mfu,
                           gpus_from=gpus_from)
    except ValueError as error:
        print(f"llada plan: {error}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_json(), indent=2) if args.json else render(plan))
    return 1 if plan.problems else 0


def add_rehearse_command(subparsers: Any) -> None:
    from llada.rehearse import DEFAULT_STEPS

    rehearse = subparsers.add_parser(
        "rehearse", help="run the recipe's structure end to end, small, on this cluster: every stage, selection, "
                         "eval and a served answer",
        description="Shrinks the model, budgets, workers and evals, stands in synthetic data, tokenizer and eval "
                    "items wherever the recipe's own are unreachable, runs every stage under its own run id (never "
                    "the real run's), serves the final selection and sends it one chat request.")
    _recipe_arguments(rehearse)
    rehearse.add_argument("--storage", metavar="URI",
                          help="where the rehearsal writes (default: the recipe's storage_uri), under its own run id")
    rehearse.add_argument("--run-id", help="the rehearsal's run id (default: RUN_ID-rehearsal-UTCTIME); "
                                           "an existing one resumes")
    rehearse.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                          help=f"optimizer steps per stage (default {DEFAULT_STEPS}; more where a rule compares "
                               "checkpoints)")
    rehearse.add_argument("--nodes", type=int, metavar="N",
                          help="start a local Ray cluster of N nodes on this machine for the rehearsal "
                               "(default: RAY_ADDRESS, --ray-address, else a one-node local Ray)")
    rehearse.add_argument("--cpus-per-node", type=float, default=3.0, metavar="CPUS",
                          help="logical CPUs of each --nodes node (default 3: a Train worker takes two, Ray Data "
                               "and the evals one)")
    rehearse.add_argument("--json", action="store_true", help="end with the rehearsal record as one JSON line")
    rehearse.set_defaults(handler=run_rehearse_command, break_lease=False)


def run_rehearse_command(args: argparse.Namespace) -> int:
    from jobs.dag import run_status
    from llada.rehearse import ClusterShape, outcome_table, plan_rehearsal, rehearsal_run_id, run_rehearsal
    from pipelines import storage

    recipe = load(args)
    if args.nodes is not None and (args.ray_address or os.environ.get("RAY_ADDRESS")):
        args.console.error("llada rehearse: give either --nodes (a local cluster) or a Ray address, not both")
        return 2
    if args.nodes is not None and args.nodes < 1 or args.steps < 1 or args.cpus_per_node < 1:
        args.console.error("llada rehearse: --nodes, --steps and --cpus-per-node must be at least 1")
        return 2
    s3 = _s3()
    run_id = args.run_id or rehearsal_run_id(recipe)
    run_uri = storage.join(storage.absolute(args.storage or recipe.storage_uri), run_id)
    with ray_session(args, run_uri, lease=True) as console:
        try:
            rehearsal = plan_rehearsal(recipe, ClusterShape.of_ray(), args.storage, run_id, args.steps, s3)
        except ValueError as error:
            console.error(f"llada rehearse: {error}")
            return 2
        console.say(rehearsal.describe())
        console.say()
        record = run_rehearsal(rehearsal, s3, console.say, on_step=console.step)
        console.say()
        console.say(status_table(run_status(rehearsal.recipe, s3)))
        console.say()
        console.say(outcome_table(record))
        served = record["served"]
        console.say(f"\nserved answer ({served['model']}, {served['completion_tokens']} tokens, "
                    f"{served['seconds']} s): > {served['question']}\n  {served['answer']!r}")
        console.say(f"\nrehearsal finished in {record['seconds'] / 60:.1f} min; record: "
                    f"{storage.join(record['run_uri'], 'rehearsal.json')}")
        if args.json:
            console.say(json.dumps(record))
    return 0


COMMANDS = (add_run_command, add_plan_command, add_rehearse_command, add_status_command, add_eval_command,
            add_lm_eval_command, add_generate_command, add_submit_command, add_demo_command)


def add_serve_command(subparsers: Any) -> None:
    """`llada serve RECIPE | --checkpoint URI`: with a recipe (path or URI), its ``serve:`` block
    (or the shipped config for its hardware) and, without --checkpoint, the checkpoint its last
    stage selected."""
    from serve.cli import add_serve_command as add_serve_parser

    parser = add_serve_parser(subparsers)
    parser.add_argument("recipe", nargs="?", metavar="RECIPE",
                        help="recipe whose serve: block gives the settings and whose last stage's selected "
                             "checkpoint is served (unless --checkpoint or --model)")
    parser.add_argument("--model", metavar="models:/NAME@ALIAS",
                        help="serve the checkpoint a registered model version points to (MLflow registry: "
                             "models:/NAME@champion or models:/NAME/VERSION)")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="the MLflow registry for --model (default: MLFLOW_TRACKING_URI, else the RECIPE's)")
    parser.set_defaults(handler=run_serve_command)


def run_serve_command(args: argparse.Namespace) -> int:
    from serve.cli import run_serve

    if args.recipe and args.config:
        print("llada serve: give either RECIPE or --config, not both", file=sys.stderr)
        return 2
    recipe = load(argparse.Namespace(recipe=args.recipe, set=[])) if args.recipe else None
    if args.model:
        if args.checkpoint:
            print("llada serve: give either --model or --checkpoint, not both", file=sys.stderr)
            return 2
        try:
            args.checkpoint = registered_checkpoint(args.model, args.tracking_uri, recipe)
        except ValueError as error:
            print(f"llada serve: {error}", file=sys.stderr)
            return 2
    if recipe is None:
        return run_serve(args)
    from jobs.dag import selected_checkpoint
    from llada.infra.render import default_serve_config

    if not args.checkpoint:
        final = recipe.stages[-1].name
        try:
            args.checkpoint = selected_checkpoint(recipe, final, _s3()).hf_uri
        except ValueError as error:
            print(f"llada serve: {error}", file=sys.stderr)
            return 2
        print(f"serving {args.checkpoint} (the checkpoint stage {final!r} selected)", flush=True)
    return run_serve(args, base=recipe.serve or default_serve_config(recipe))


def registered_checkpoint(model_uri: str, tracking_uri: str | None, recipe: Any | None) -> str:
    """The storage URI of the checkpoint ``models:/NAME@ALIAS`` names in the registry at
    ``tracking_uri``, else MLFLOW_TRACKING_URI, else the given recipe's tracking store."""
    from jobs.tracking import resolve_model, resolve_uri

    registry = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or (resolve_uri(recipe)[0] if recipe is not None else None))
    checkpoint, version = resolve_model(model_uri, registry)
    print(f"serving {checkpoint} ({model_uri}: {version})", flush=True)
    return checkpoint


COMMANDS = (*COMMANDS, add_serve_command)
