"""`llada infra render`: cluster manifests from a recipe (registered in llada/cli.py).

    llada infra render jobs/recipes/llada-moe-7b-a1b.yaml --kind raycluster > raycluster.yaml
    llada infra render jobs/recipes/llada-moe-7b-a1b.yaml --kind rayjob --stage sft --output sft.yaml
    llada infra render jobs/recipes/llada-moe-7b-a1b.yaml --kind rayservice --checkpoint s3://b/run/.../hf
    llada infra render jobs/recipes/llada-moe-7b-a1b.yaml --kind cluster-launcher > cluster.yaml
"""

from __future__ import annotations

import argparse
import shlex
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

from llada.commands import load

KINDS = ("raycluster", "rayjob", "rayservice", "cluster-launcher")
IMAGE_REPOSITORY = "YOUR-REGISTRY/llada-platform"


def add_infra_command(subparsers: Any) -> None:
    infra_parser = subparsers.add_parser("infra", help="cluster deployment: KubeRay manifests, `ray up` config")
    infra_commands = infra_parser.add_subparsers(dest="infra_command", required=True, metavar="SUBCOMMAND")
    render = infra_commands.add_parser(
        "render", help="write a RayCluster, RayJob, RayService or `ray up` config from a recipe",
        description="Render a cluster manifest from a recipe (README: Deploying to a cluster).")
    render.add_argument("recipe", help="recipe YAML inside the project (the image holds it), or an s3:// URI")
    render.add_argument("--kind", required=True, choices=KINDS, help="what to write")
    render.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field (repeatable); a RayJob passes them on to `llada run`")
    render.add_argument("--image", help=f"container image (default {IMAGE_REPOSITORY}:VERSION-cuda, or -cpu for "
                                        "recipes without GPUs)")
    render.add_argument("--stage", help="rayjob: run only this stage (default: the whole recipe)")
    render.add_argument("--checkpoint", metavar="URI", help="rayservice (this or --model): the exported checkpoint to serve")
    render.add_argument("--model", metavar="models:/NAME@ALIAS",
                        help="rayservice: serve the checkpoint this registered model version points to (resolved "
                             "now, from MLflow at --tracking-uri, MLFLOW_TRACKING_URI or the recipe's tracking store)")
    render.add_argument("--tracking-uri", metavar="URI", help="the MLflow registry for --model")
    render.add_argument("--serve-config", metavar="FILE",
                        help="rayservice: serve config YAML (default: the recipe's `serve:` block, else "
                             "serve/configs/gpu-cluster.yaml, or laptop.yaml for a CPU recipe)")
    render.add_argument("--output", metavar="FILE", help="write here instead of stdout")
    render.set_defaults(handler=run_infra_render)


def command_line(args: argparse.Namespace) -> str:
    """The command that renders this manifest again (the first line of every rendered file)."""
    argv = ["llada", "infra", "render", args.recipe, "--kind", args.kind]
    for flag in ("stage", "checkpoint", "model", "tracking_uri", "serve_config", "image"):
        if getattr(args, flag):
            argv += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    for override in args.set:
        argv += ["--set", override]
    return shlex.join(argv)


def _check_flags(args: argparse.Namespace) -> None:
    if args.kind == "rayservice" and bool(args.checkpoint) == bool(args.model):
        raise ValueError("--kind rayservice: give --checkpoint URI (the exported checkpoint to serve, e.g. the `hf` "
                         "folder of the run's selected SFT checkpoint) or --model models:/NAME@ALIAS, one of them")
    for flag, kind in (("checkpoint", "rayservice"), ("model", "rayservice"), ("serve_config", "rayservice"),
                       ("stage", "rayjob")):
        if getattr(args, flag) and args.kind != kind:
            raise ValueError(f"--{flag.replace('_', '-')}: only for --kind {kind}")


def manifest(args: argparse.Namespace, recipe: Any) -> dict[str, Any]:
    from llada.infra import launcher as cluster_launcher, render as infra

    variant = "cuda" if recipe.scaling.use_gpu else "cpu"
    image = args.image or f"{IMAGE_REPOSITORY}:{version('llada-platform')}-{variant}"
    if args.kind == "raycluster":
        return infra.raycluster(recipe, image)
    if args.kind == "rayjob":
        if args.stage:
            recipe.stage(args.stage)  # a clear error for an unknown stage
        return infra.rayjob(recipe, infra.recipe_in_image(args.recipe), image, args.stage, args.set)
    if args.kind == "rayservice":
        checkpoint = args.checkpoint
        if args.model:
            from llada.commands import registered_checkpoint

            checkpoint = registered_checkpoint(args.model, args.tracking_uri, recipe)
        return infra.rayservice(recipe, infra.serve_app_args(recipe, checkpoint, args.serve_config), image)
    return cluster_launcher.cluster_launcher(recipe, image)


def run_infra_render(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from llada.infra import render as infra
    from pipelines import storage

    recipe = load(args)
    try:
        _check_flags(args)
        document = manifest(args, recipe)
    except (ValidationError, ValueError) as error:
        print(f"llada infra render: {error}", file=sys.stderr)
        return 2
    if args.kind != "rayservice" and not storage.is_remote(recipe.storage_uri):
        print(f"llada infra render: warning: storage_uri {recipe.storage_uri} is local to each node; a cluster "
              "needs shared storage (--set storage_uri=s3://BUCKET/PREFIX)", file=sys.stderr)
    if args.kind == "cluster-launcher":
        needs = "~/.ray/auth_token (ray get-auth-token --generate) and ~/.llada/cluster.env on this machine"
    else:
        secrets = infra.referenced_secrets(document)
        needs = f"KubeRay >= 1.6.0 and the Secret{'s' if len(secrets) > 1 else ''} {', '.join(secrets)}"
    header = [command_line(args),
              "Rendered from the recipe: change the recipe or the flags and render again instead of editing this file.",
              f"Needs {needs} (README: Deploying to a cluster)."]
    text = infra.render_yaml(document, header)
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text, end="")
    return 0
