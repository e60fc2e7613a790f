"""``llada serve`` (wired into llada/cli.py by ``add_serve_command``) and ``python -m serve``.

    llada serve --checkpoint ./runs/tiny-cpu/stages/sft/checkpoints/checkpoint_000800/hf   # http://127.0.0.1:8000/v1
    llada serve --checkpoint s3://BUCKET/RUN/stages/sft/checkpoints/checkpoint_NNNNNN/hf --config serve.yaml --port 8080
    llada serve --checkpoint s3://BUCKET/RUN/stages/sft/checkpoints/checkpoint_NNNNNN/hf --print-config > serve.yaml
    llada serve --checkpoint s3://BUCKET/RUN/.../checkpoint_MMMMMM/hf --ray-address HEAD:6379 --detach   # roll out

A checkpoint is the ``hf/`` folder of a stage's checkpoint (``llada status RECIPE`` names the one
each stage selected); the demo's SFT stage selects step 800.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import signal
import sys
import time
import urllib.request
from typing import Any, Callable, Sequence

from pydantic import ValidationError

from serve.config import AppArgs, ServeConfig, load_serve_config

# How long start-up may take before the server is called ready: the replicas copy the
# checkpoint (from S3 for a cluster) and load it, which takes minutes for a large model.
READY_TIMEOUT_S = 900.0
READY_POLL_S = 1.0


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
    parser.add_argument("--detach", action="store_true",
                        help="deploy on the Ray cluster at --ray-address / RAY_ADDRESS and return once it serves; "
                             "over a running server this rolls out the new checkpoint or config (no request lost)")


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
    if getattr(args, "detach", False):
        return deploy_detached(app_args, args.ray_address)
    return _serve_until_interrupted(app_args, args.ray_address)


def _checkpoint_problem(app_args: AppArgs) -> str | None:
    from pipelines import storage

    try:
        if not storage.exists(storage.join(app_args.checkpoint, "config.json"), app_args.s3):
            return f"{app_args.checkpoint} has no config.json; pass an exported checkpoint"
    except storage.StorageError as error:
        return str(error)
    return None


def deploy_detached(app_args: AppArgs, ray_address: str | None) -> int:
    """Deploy on a running Ray cluster and return once the app serves; Serve keeps it running.
    Over the app already running there, this is a roll-out: Serve's rolling update starts the
    new replicas (``rollout.max_surge_percent``) while the old ones serve, then stops the old
    ones once they finish what they hold; the API's ``X-LLaDA-Checkpoint`` header says which
    answered."""
    import ray
    from ray import serve

    from serve.app import APP_NAME, run
    from serve.checkpoint import checkpoint_label

    address = ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        print("llada serve: --detach needs a running Ray cluster (--ray-address or RAY_ADDRESS): a local Ray "
              "would stop with this command", file=sys.stderr)
        return 2
    if problem := _checkpoint_problem(app_args):
        print(f"llada serve: {problem}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as error:  # ConnectionError, RuntimeError, ValueError, ...: all say "no Ray there"
        print(f"llada serve: cannot reach Ray at {address}: {one_line(error)}", file=sys.stderr)
        return 1
    try:
        rolling = _app_running(serve, APP_NAME)
        label = checkpoint_label(app_args.checkpoint)
        if rolling:
            print(f"rolling out {label} over the running server (the old replicas serve until the new ones "
                  "are up) ...", flush=True)
        try:
            run(app_args)  # returns once the application is RUNNING: every replica on the new version
        except RuntimeError as error:
            print(f"llada serve: the application failed to {'roll out' if rolling else 'start'}: {error}",
                  file=sys.stderr)
            return 1
        if rolling:
            print(f"rolled out {label} in {time.perf_counter() - started:.1f} s; answers now carry "
                  f"X-LLaDA-Checkpoint: {label}", flush=True)
        else:
            _announce(app_args, started, detached=True)
        return 0
    finally:
        ray.shutdown()  # disconnect: Serve keeps serving on the cluster


def _app_running(serve: Any, name: str) -> bool:
    try:
        return name in serve.status().applications
    except Exception:  # no Serve on the cluster yet
        return False


def _serve_until_interrupted(app_args: AppArgs, ray_address: str | None) -> int:
    import ray

    if problem := _checkpoint_problem(app_args):
        print(f"llada serve: {problem}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    started_ray = not ray.is_initialized() and ray_address is None and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        try:
            ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
        except Exception as error:  # ConnectionError, RuntimeError, ValueError, ...: all say "no Ray there"
            print(f"llada serve: cannot start or reach Ray at {ray_target(ray_address)}: {one_line(error)}",
                  file=sys.stderr)
            return 1
    from serve.app import run

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where the shell ignored it
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            run(app_args)
        except RuntimeError as error:
            print(f"llada serve: the application failed to start: {error}", file=sys.stderr)
            return 1
        _announce(app_args, started)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return _stop(started_ray)


def _announce(app_args: AppArgs, started: float, detached: bool = False) -> None:
    """Wait until /ready answers (a sampler replica has loaded the model), then say where the
    server is and how long it took to be ready."""
    config = app_args.config
    base = f"http://{config.host}:{config.port}"
    print(f"deployed; waiting until {base}/ready answers (the replicas load the model) ...", flush=True)
    ready = wait_until_ready(http_probe(f"{probe_base(config)}/ready"), READY_TIMEOUT_S)
    took = f"{time.perf_counter() - started:.1f} s"
    state = f"ready in {took}" if ready else \
        f"deployed, but {base}/ready did not answer within {took}; the replicas may still be loading"
    scaling = config.autoscaling
    print(f"serving {app_args.checkpoint} as {config.model_name!r} at {base}/v1 ({state})")
    print(f"  replicas {scaling.min_replicas}..{scaling.max_replicas}, batch <= {config.batching.max_batch_size}, "
          f"a replica holds <= {config.replica.max_ongoing_requests}, timeout {config.request_timeout_s:g} s, "
          f"API key {'required' if config.api_key_env else 'off'}")
    print(f"  try: {try_command(config)}")
    if detached:
        print("Serve keeps serving on the cluster; `llada serve ... --detach` again rolls out another checkpoint.",
              flush=True)
    else:
        print("Ctrl-C (or SIGTERM) stops the server.", flush=True)


def try_command(config: ServeConfig) -> str:
    """A curl command that gets an answer from the server, with the API key when it needs one
    (named by its variable, so the shell fills it in and the key is never printed)."""
    auth = f' -H "Authorization: Bearer ${config.api_key_env}"' if config.api_key_env else ""
    body = f'{{"model": "{config.model_name}", "prompt": "Hello", "max_tokens": 16}}'
    return (f"curl http://{config.host}:{config.port}/v1/completions -H 'Content-Type: application/json'{auth} "
            f"-d '{body}'")


def probe_base(config: ServeConfig) -> str:
    """Where this machine reaches the proxy: a wildcard bind address is reached on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(config.host, config.host)
    return f"http://{host}:{config.port}"


def http_probe(url: str, timeout_s: float = 15.0) -> Callable[[], bool]:
    """``probe() -> bool``: whether GET ``url`` answers 200 (proxies bypassed: it is local)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def probe() -> bool:
        try:
            with opener.open(url, timeout=timeout_s) as response:
                return response.status == 200
        except (OSError, http.client.HTTPException):  # not up yet, or 503 (HTTPError is an OSError)
            return False

    return probe


def wait_until_ready(probe: Callable[[], bool], timeout_s: float, poll_s: float = READY_POLL_S,
                     clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep) -> bool:
    """Call ``probe`` every ``poll_s`` until it says True (-> True) or ``timeout_s`` passed (-> False)."""
    deadline = clock() + timeout_s
    while not probe():
        if clock() + poll_s > deadline:
            return False
        sleep(poll_s)
    return True


def ray_target(ray_address: str | None) -> str:
    """The Ray that ``ray.init(address=ray_address)`` goes to, in words."""
    return ray_address or os.environ.get("RAY_ADDRESS") or "this machine (a new local Ray)"


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _stop(started_ray: bool) -> int:
    """Delete the application (its replicas drain what they hold, up to their
    ``graceful_shutdown_timeout_s``, serve/app.py), then stop the local Ray this command started;
    on a cluster it was pointed at, Serve and any other applications keep running. Quiet:
    Serve's warnings about replicas it stops are no news to whoever pressed Ctrl-C (and
    ``serve.shutdown()`` printed a failed-task warning from the controller it kills). A second
    Ctrl-C stops without waiting."""
    import ray
    from ray import serve

    from serve.app import APP_NAME

    print("stopping ...", flush=True)
    for name in ("ray", "ray.serve"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        serve.delete(APP_NAME)
        if started_ray:
            ray.shutdown()
    except KeyboardInterrupt:
        print("stopped without waiting for the replicas to drain", file=sys.stderr)
        return 130
    except Exception as error:  # the cluster went away first: nothing is left to stop
        print(f"llada serve: while stopping: {one_line(error)}", file=sys.stderr)
    print("stopped", flush=True)
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
