"""The Ray Serve application: a FastAPI ingress (serve/api.py) in front of autoscaled sampler
replicas (serve/sampler.py), built from :class:`serve.config.AppArgs`.

    serve run serve.app:build_app checkpoint=./runs/tiny-cpu/stages/sft/checkpoints/checkpoint_000800/hf
    llada serve --checkpoint s3://BUCKET/RUN/stages/sft/checkpoints/checkpoint_NNNNNN/hf --print-config > serve.yaml
    serve deploy serve.yaml                                             # or a RayService's serveConfigV2

``build_app`` is the ``import_path`` of the config YAML; it applies every deployment option
from the serve config, so ``serve.run(build_app(args))`` and ``serve deploy`` of the printed
YAML give the same application.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, AsyncIterator

import ray
import yaml
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from serve.api import OpenAIServer, Overloaded, create_app
from serve.batching import BlockUpdate, SampleFailure, SampleRequest
from serve.checkpoint import load_metadata
from serve.config import AppArgs, ServeConfig
from serve.sampler import Sampler

logger = logging.getLogger(__name__)

APP_NAME = "llada"
IMPORT_PATH = "serve.app:build_app"
SAMPLER_NAME = "LLaDASampler"
INGRESS_NAME = "OpenAIIngress"
ROUTER_HEADROOM = 2
# The proxy's own timeout is a backstop (it answers 408); the ingress answers 504 first.
PROXY_TIMEOUT_MARGIN_S = 10.0


class HandleBackend:
    """The API's sampler backend over a Serve deployment handle.

    A request that streams its blocks is a streaming call; one that wants its answer at once is
    a plain call (one message back instead of a generator's, which the ingress also had to
    close with a cancel message). A stream whose last block arrived is over: it is not cancelled.
    """

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def stream(self, request: SampleRequest) -> AsyncIterator[BlockUpdate | SampleFailure]:
        response: Any = None
        finished = False
        try:
            if not request.stream_blocks:
                response = self.handle.answer.remote(request)
                item = await response
                finished = True
                yield item
                return
            response = self.handle.options(stream=True).stream.remote(request)
            async for item in response:
                finished = isinstance(item, SampleFailure) or item.final
                yield item
                if finished:
                    return
            finished = True
        except BackPressureError as error:
            raise Overloaded(f"sampler queue full: {error.message}") from None
        except (DeploymentUnavailableError, ReplicaUnavailableError, ActorUnavailableError, RayActorError) as error:
            raise Overloaded(f"sampler replica unavailable: {type(error).__name__}") from None
        finally:
            if response is not None and not finished:
                # The client left or the answer ended early (a stop token): free the replica's
                # slot. cancel() re-raises a routing error, which was handled above.
                with contextlib.suppress(Exception):
                    response.cancel()

    async def ready(self) -> dict[str, Any]:
        return await self.handle.ready.remote()


@serve.ingress()
class OpenAIIngress:
    """Tokenises and validates requests, fans them out to the sampler, streams text back."""

    def __init__(self, sampler: DeploymentHandle, args: dict[str, Any]) -> None:
        app_args = AppArgs.model_validate(args)
        config = app_args.config
        api_key = None
        if config.api_key_env is not None:
            api_key = os.environ.get(config.api_key_env)
            if not api_key:
                raise ValueError(f"api_key_env: the environment variable {config.api_key_env} is not set on the "
                                 "ingress replica; set it there (e.g. from a secret) or remove api_key_env")
        tokenizer, model_info = load_metadata(app_args.checkpoint, app_args.s3)
        self.server = OpenAIServer(HandleBackend(sampler), tokenizer, model_info, config, api_key=api_key,
                                   max_in_flight=ingress_admission_limit(config))

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.server)


def ingress_admission_limit(config: ServeConfig) -> int:
    """Sampling requests one ingress replica lets in at once: its share of what the sampler
    replicas hold at most (max_replicas x replica.max_ongoing_requests; serve/api.py: Guard).
    With fewer replicas up, the replicas refuse the rest themselves; while none is up (starting,
    or scaling from zero) Serve's router holds up to replica.max_queued_requests of them."""
    held = config.autoscaling.max_replicas * config.replica.max_ongoing_requests
    return max(1, math.ceil(held / config.ingress.num_replicas))


def resolved_num_gpus(config: ServeConfig) -> float:
    """``num_gpus: auto`` -> 1 when the Ray cluster has GPUs, else 0."""
    if config.replica.num_gpus != "auto":
        return float(config.replica.num_gpus)
    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def sampler_options(config: ServeConfig, num_gpus: float | None) -> dict[str, Any]:
    """Deployment options of the sampler from the serve config (the ``deployments:`` entry of
    the Serve YAML; ``num_gpus=None`` leaves ``ray_actor_options`` to the builder)."""
    replica = config.replica
    options: dict[str, Any] = {
        "name": SAMPLER_NAME,
        "autoscaling_config": config.autoscaling.to_ray(),
        # The replica's batcher holds its queue and refuses past replica.max_ongoing_requests
        # (serve/batching.py); Serve's limit is twice that so that the router hands the refusals
        # to the replica (a millisecond each) instead of queueing them and probing the replicas.
        "max_ongoing_requests": ROUTER_HEADROOM * replica.max_ongoing_requests,
        "max_queued_requests": replica.max_queued_requests,
        "health_check_period_s": replica.health_check_period_s,
        "health_check_timeout_s": replica.health_check_timeout_s,
        **drain_options(config),
    }
    if num_gpus is not None:
        options["ray_actor_options"] = {"num_cpus": replica.num_cpus, "num_gpus": num_gpus}
    return options


def drain_options(config: ServeConfig) -> dict[str, Any]:
    """How replicas are replaced and stop. A roll-out (a new checkpoint or config) starts
    ``rollout.max_surge_percent`` extra replicas before old ones stop (serve/config.py:
    RolloutSettings). A stopping replica (roll-out, scale-down, Ctrl-C) finishes the requests it
    holds, up to the request timeout, checking every half second, so that an idle replica stops
    at once (Ray's defaults, 20 s and every 2 s, cut long answers and made Ctrl-C take 22-28 s)."""
    return {"graceful_shutdown_timeout_s": config.request_timeout_s, "graceful_shutdown_wait_loop_s": 0.5,
            "max_surge_percent": config.rollout.max_surge_percent}


def ingress_options(config: ServeConfig, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    ingress = config.ingress
    actor_options: dict[str, Any] = {"num_cpus": ingress.num_cpus}
    if env_vars:
        actor_options["runtime_env"] = {"env_vars": dict(env_vars)}
    return {
        "name": INGRESS_NAME,
        "num_replicas": ingress.num_replicas,
        "max_ongoing_requests": ingress.max_ongoing_requests,
        "ray_actor_options": actor_options,
        **drain_options(config),
    }


def build_app(args: dict[str, Any], ingress_env: dict[str, str] | None = None) -> serve.Application:
    """The application builder (``import_path: serve.app:build_app``); ``args`` is an AppArgs.

    ``ingress_env`` (in-process use only, never written to a config file) sets environment
    variables of the ingress replicas, e.g. the API key for a local ``llada serve``.
    """
    app_args = AppArgs.model_validate(args)
    config = app_args.config
    plain_args = app_args.model_dump(mode="json", exclude_none=True)
    sampler = serve.deployment(Sampler).options(**sampler_options(config, resolved_num_gpus(config)))
    ingress = serve.deployment(OpenAIIngress).options(**ingress_options(config, ingress_env))
    return ingress.bind(
        sampler.bind(app_args.checkpoint, plain_args["config"], plain_args.get("s3")),
        plain_args,
    )


def http_options(config: ServeConfig) -> dict[str, Any]:
    return {"host": config.host, "port": config.port,
            "request_timeout_s": config.request_timeout_s + PROXY_TIMEOUT_MARGIN_S}


def serve_config_document(app_args: AppArgs) -> dict[str, Any]:
    """The Serve config (what ``serve deploy`` and a KubeRay RayService's serveConfigV2 take)."""
    config = app_args.config
    num_gpus = None if config.replica.num_gpus == "auto" else float(config.replica.num_gpus)
    return {
        "proxy_location": "EveryNode",
        "http_options": http_options(config),
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": app_args.model_dump(mode="json", exclude_none=True),
            "deployments": [sampler_options(config, num_gpus), ingress_options(config)],
        }],
    }


def serve_config_yaml(app_args: AppArgs) -> str:
    header = ("# Ray Serve config for LLaDA-MoE: `serve deploy` this file, or paste it under a RayService's\n"
              "# spec.serveConfigV2. Made by `llada serve --print-config`; the sampler's num_gpus is left to\n"
              "# the builder when the serve config says `num_gpus: auto`.\n")
    return header + yaml.safe_dump(serve_config_document(app_args), sort_keys=False)


def run(app_args: AppArgs, name: str = APP_NAME, route_prefix: str = "/") -> DeploymentHandle:
    """Start Serve's proxy on the config's host/port and deploy the app (Ray must be up). The
    API key, when the config names its variable, is copied from this process's environment to
    the ingress replicas. The proxies are Serve's default (one on every node), except where nodes
    share an address (a local multi-node cluster, llada/cluster.py): every proxy would bind the
    same port there, so one proxy runs, on the head."""
    proxy_location = "HeadOnly" if _nodes_share_an_address() else None
    config = app_args.config
    ingress_env = None
    if config.api_key_env is not None and os.environ.get(config.api_key_env):
        ingress_env = {config.api_key_env: os.environ[config.api_key_env]}
    serve.start(http_options=http_options(config), proxy_location=proxy_location)
    return serve.run(build_app(app_args.model_dump(mode="json", exclude_none=True), ingress_env),
                     name=name, route_prefix=route_prefix)


def _nodes_share_an_address() -> bool:
    import ray

    addresses = [node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")]
    return len(addresses) > len(set(addresses))
