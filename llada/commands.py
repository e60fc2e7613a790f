"""`llada` commands around a recipe: run, train, status, eval, generate, submit, demo.

Each command is an ``add_*`` (arguments) / ``run_*`` (behaviour) pair registered in llada/cli.py.
A bad recipe exits non-zero with the field path; long commands print progress and end with a
summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from llada.console import status_table

RECIPES_DIR = Path(__file__).resolve().parents[1] / "jobs" / "recipes"
DEMO_RECIPE = RECIPES_DIR / "tiny-cpu.yaml"


def _recipe_arguments(parser: argparse.ArgumentParser, recipe_optional: bool = False) -> None:
    parser.add_argument("recipe", nargs="?" if recipe_optional else None, help="recipe YAML (path or URI)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set stages.sft.num_steps=10 (repeatable)")
    parser.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def load(args: argparse.Namespace, default: Path | None = None) -> Any:
    """The validated recipe, or SystemExit(2) naming the field path."""
    from pydantic import ValidationError

    from jobs.recipe import load_recipe

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


def _start_ray(args: argparse.Namespace) -> None:
    import ray

    if not ray.is_initialized():
        address = args.ray_address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()


def _s3() -> Any:
    from pipelines.storage import S3Settings

    return S3Settings.from_env()


def add_run_command(subparsers: Any) -> None:
    run = subparsers.add_parser("run", help="run a recipe's stages in order (skips finished stages, resumes)")
    _recipe_arguments(run)
    run.add_argument("--stage", help="run only this stage (the stages it starts from must be done)")
    run.set_defaults(handler=run_run)
    train = subparsers.add_parser("train", help="train one stage of a recipe (same as run --stage NAME)")
    _recipe_arguments(train)
    train.add_argument("--stage", required=True, help="the stage to train")
    train.set_defaults(handler=run_run)


def run_run(args: argparse.Namespace) -> int:
    from jobs.dag import run_recipe, run_status
    from pipelines.storage import StorageError

    recipe = load(args)
    _start_ray(args)
    s3 = _s3()
    try:
        run_recipe(recipe, s3, only_stage=args.stage, progress=lambda line: print(line, flush=True))
    except (ValueError, StorageError) as error:
        print(f"llada {args.command}: {error}", file=sys.stderr)
        return 1
    print()
    print(status_table(run_status(recipe, s3)))
    return 0


def add_status_command(subparsers: Any) -> None:
    status = subparsers.add_parser("status", help="stages, checkpoints, scores and selections of a run")
    _recipe_arguments(status)
    status.add_argument("--json", action="store_true", help="print JSON (each stage's selected checkpoint URI)")
    status.set_defaults(handler=run_status_command)


def run_status_command(args: argparse.Namespace) -> int:
    from jobs.dag import run_status

    recipe = load(args)
    rows = run_status(recipe, _s3())
    print(json.dumps({"run_uri": recipe.run_uri, "stages": rows}, indent=2) if args.json else status_table(rows))
    return 0


def add_eval_command(subparsers: Any) -> None:
    evaluate = subparsers.add_parser("eval", help="score checkpoints with the recipe's eval suite")
    _recipe_arguments(evaluate)
    evaluate.add_argument("--stage", required=True, help="score every complete checkpoint of this stage")
    evaluate.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from jobs import checkpoints as ckpt
    from jobs.dag import corpus_uri, eval_suite
    from jobs.evaluation.runner import evaluate_checkpoints_ray

    recipe = load(args)
    _start_ray(args)
    s3 = _s3()
    infos = ckpt.list_checkpoints(recipe.stage_uri(recipe.stage(args.stage).name), s3)
    if not infos:
        print(f"llada eval: stage {args.stage!r} has no complete checkpoint", file=sys.stderr)
        return 1
    for record in evaluate_checkpoints_ray(infos, eval_suite(recipe), corpus_uri(recipe), s3):
        print(f"{record['checkpoint_uri']}: average {record['average']:.4f}")
    return 0


def add_generate_command(subparsers: Any) -> None:
    generate = subparsers.add_parser("generate", help="sample from a checkpoint (HF-layout folder or a run's SFT)")
    generate.add_argument("--checkpoint", required=True, help="HF-layout checkpoint folder (path or s3://)")
    generate.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    generate.add_argument("--raw", action="store_true", help="no chat template: continue the text as given")
    generate.add_argument("--gen-length", type=int, default=32)
    generate.add_argument("--block-length", type=int, default=32)
    generate.add_argument("--steps", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from llada.demo import sample_answers

    answers = sample_answers(args.checkpoint, args.prompt, chat=not args.raw, gen_length=args.gen_length,
                             block_length=args.block_length, steps=args.steps, temperature=args.temperature,
                             s3=_s3())
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
    submit.set_defaults(handler=run_submit)


def run_submit(args: argparse.Namespace) -> int:
    from jobs.submit import follow_job, submission_problem, submit_recipe

    load(argparse.Namespace(recipe=args.recipe, set=args.set))  # validate before shipping anything
    try:
        job_id = submit_recipe(args.address, args.recipe, stage=args.stage, overrides=args.set,
                               working_dir=args.working_dir, python=args.python)
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
    demo.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from llada.demo import run_demo_pipeline

    if args.output:
        args.set = [f"storage_uri={args.output}", *args.set]
    recipe = load(args, default=DEMO_RECIPE)
    _start_ray(args)
    run_demo_pipeline(recipe, _s3())
    return 0


COMMANDS = (add_run_command, add_status_command, add_eval_command, add_generate_command, add_submit_command,
            add_demo_command)


def add_serve_command(subparsers: Any) -> None:
    """`llada serve RECIPE | --checkpoint URI`: with a recipe and no checkpoint, serve the run's
    selected checkpoint of its last stage (the SFT model)."""
    from serve.cli import add_serve_command as add_serve_parser

    add_serve_parser(subparsers)
    subparsers.choices["serve"].set_defaults(handler=run_serve_command)


def run_serve_command(args: argparse.Namespace) -> int:
    from jobs.dag import read_selection
    from pipelines.storage import join
    from serve.cli import run_serve

    if args.recipe and not args.checkpoint:
        recipe = load(argparse.Namespace(recipe=args.recipe, set=[]))
        final = recipe.stages[-1].name
        try:
            args.checkpoint = join(read_selection(recipe, final, _s3())["checkpoint_uri"], "hf")
        except ValueError as error:
            print(f"llada serve: {error}", file=sys.stderr)
            return 2
        print(f"serving {args.checkpoint} (selected checkpoint of stage {final!r})", flush=True)
    return run_serve(args)


COMMANDS = (*COMMANDS, add_serve_command)
