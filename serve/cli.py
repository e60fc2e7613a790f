"""``llada serve`` (wired into llada/cli.py by ``add_serve_command``) and ``python -m serve``.

    llada serve --checkpoint ./runs/tiny-cpu/stages/sft/checkpoints/checkpoint_000800/hf   # http://127.0.0.1:8000/v1
    llada serve --checkpoint s3://BUCKET/RUN/stages/sft/checkpoints/checkpoint_NNNNNN/hf --config serve.yaml --port 8080
    llada serve --checkpoint s3://BUCKET/RUN/stages/sft/checkpoints/checkpoint_NNNNNN/hf --print-config > serve.yaml

A checkpoint is the ``hf/`` folder of a stage's checkpoint (``llada status RECIPE`` names the one
each stage selected); the demo's SFT stage selects step 800.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any, Sequence

from pydantic import ValidationError

from serve.config import AppArgs, ServeConfig, load_serve_config


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="URI", help="exported checkpoint: a path, file:// or s3:// URI")
    parser.add_argument("--config", metavar="FILE", help="serve config YAML, path or URI (serve/config.py: ServeConfig)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--model-name", help="model id clients send (default llada-moe)")
    parser.add_argument("--api-key-env", metavar="VAR",
                        help="require `Authorization: Bearer $VAR` on /v1/* (the key is read from VAR)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the Serve config YAML (for `serve deploy` or a KubeRay RayService) and exit")
    parser.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def add_serve_command(subparsers: Any) -> None:
    """Add ``serve`` to a command's subparsers."""
    parser = subparsers.add_parser("serve", help="serve a checkpoint behind an OpenAI-compatible API (Ray Serve)")
    add_serve_arguments(parser)
    parser.set_defaults(handler=run_serve)
    return parser


def app_args_from_cli(args: argparse.Namespace, base: ServeConfig | None = None) -> AppArgs:
    """AppArgs from the flags over ``base`` (a config already loaded, e.g. a recipe's serve
    block) or ``--config``; raises ValueError / ValidationError naming the problem."""
    if base is not None and args.config:
        raise ValueError("give either RECIPE or --config, not both")
    overrides = {field: getattr(args, flag) for flag, field in (
        ("host", "host"), ("port", "port"), ("model_name", "model_name"), ("api_key_env", "api_key_env"))
        if getattr(args, flag) is not None}
    if base is not None:
        config = ServeConfig.model_validate({**base.model_dump(), **overrides})
    elif args.config:
        config = load_serve_config(args.config, overrides)
    else:
        config = ServeConfig.model_validate(overrides)
    if not args.checkpoint:
        raise ValueError("--checkpoint: required (the hf/ folder of an exported checkpoint; `llada serve RECIPE` "
                         "finds the one the recipe's last stage selected)")
    return AppArgs(checkpoint=args.checkpoint, config=config)


def run_serve(args: argparse.Namespace, base: ServeConfig | None = None) -> int:
    try:
        app_args = app_args_from_cli(args, base)
    except (ValidationError, ValueError) as error:
        print(f"llada serve: invalid configuration: {error}", file=sys.stderr)
        return 2
    from serve.app import serve_config_yaml

    if args.print_config:
        print(serve_config_yaml(app_args), end="")
        return 0
    return _serve_until_interrupted(app_args, args.ray_address)


def _serve_until_interrupted(app_args: AppArgs, ray_address: str | None) -> int:
    import ray
    from ray import serve

    from pipelines import storage
    from serve.app import run

    config = app_args.config
    try:
        if not storage.exists(storage.join(app_args.checkpoint, "config.json"), app_args.s3):
            print(f"llada serve: {app_args.checkpoint} has no config.json; pass an exported checkpoint",
                  file=sys.stderr)
            return 1
    except storage.StorageError as error:
        print(f"llada serve: {error}", file=sys.stderr)
        return 1
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    try:
        run(app_args)
    except RuntimeError as error:
        print(f"llada serve: the application failed to start: {error}", file=sys.stderr)
        return 1
    base = f"http://{config.host}:{config.port}"
    scaling = config.autoscaling
    print(f"serving {app_args.checkpoint} as {config.model_name!r} at {base}/v1 "
          f"(ready in {time.perf_counter() - started:.1f} s)")
    print(f"  replicas {scaling.min_replicas}..{scaling.max_replicas}, batch <= {config.batching.max_batch_size}, "
          f"queue <= {config.replica.max_queued_requests}, timeout {config.request_timeout_s:g} s, "
          f"API key {'required' if config.api_key_env else 'off'}")
    print(f"  try: curl {base}/v1/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{config.model_name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'")
    print("Ctrl-C (or SIGTERM) stops the server.", flush=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where the shell ignored it
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
        serve.shutdown()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
