"""Cluster deployment rendered from a recipe: KubeRay RayCluster, RayJob (a whole run or one
stage) and RayService (the sampler), and a ``ray up`` cluster-launcher config for AWS.

    llada infra render jobs/recipes/llada-moe-7b-a1b.yaml --kind rayjob > rayjob.yaml

Pure functions from a validated recipe (and, for the RayService, the serve config) to plain
dicts; ``render_yaml`` writes them. Every kind has the same cluster layout:

- head: runs the GCS, dashboard, autoscaler and job drivers, and no tasks (``num-cpus: 0``);
- ``cpu`` workers: Ray Data's read and tokenise tasks, the Serve ingress, CPU-only training;
- ``gpu`` workers (only where the recipe or serve config uses GPUs): Train workers and sampler
  replicas, scaling from zero (the driver asks the autoscaler for a stage's size, jobs/training/scale_up.py).

Nothing secret is written. S3 credentials come from the Secret ``llada-storage`` (envFrom: its
keys are the standard AWS variables), the Ray auth token from ``llada-ray-auth`` (key
``auth_token``; KubeRay >= 1.6 injects RAY_AUTH_MODE and RAY_AUTH_TOKEN from the Secret that
``authOptions.secretName`` names), the API key from ``llada-api-key`` (key ``api-key``), and the
training pods' MLflow settings from ``llada-mlflow`` when it exists (envFrom, optional: its keys are
MLflow's variables, MLFLOW_TRACKING_URI and MLFLOW_TRACKING_USERNAME / _PASSWORD or _TOKEN).
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from llada.recipe import Recipe
from jobs.training.scale_up import SCALE_UP_TIMEOUT_ENV
from jobs.stage_config import ScalingSpec
from jobs.submit import run_arguments
from pipelines import storage
from serve.config import AppArgs, ServeConfig, load_serve_config

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROJECT_DIR_IN_IMAGE = "/app"  # infra/Dockerfile copies the project here and installs it
SERVE_CONFIGS = PROJECT_ROOT / "serve" / "configs"
KUBERAY_API_VERSION = "ray.io/v1"
MAX_NAME_LENGTH = 47  # KubeRay: RayJob/RayService names <= 47 characters (53 for a RayCluster)
STORAGE_SECRET, RAY_AUTH_SECRET, API_KEY_SECRET, API_KEY_SECRET_KEY = (
    "llada-storage", "llada-ray-auth", "llada-api-key", "api-key")
TRACKING_SECRET = "llada-mlflow"  # optional: MLflow's environment variables for the drivers
SCALE_UP_TIMEOUT_S = 1800  # GPU nodes can take many minutes to provision
RAYJOB_BACKOFF_LIMIT = 2  # each retry is a new cluster; `llada run` skips finished stages and resumes
GPUS_PER_NODE = 8  # p4d/p5-class nodes; expert-parallel groups of up to 8 stay inside one node
GPU_NODE_MEMORY_GI_PER_GPU = 96
LABELS = {"app.kubernetes.io/part-of": "llada-platform"}


@dataclass(frozen=True)
class NodeShape:
    cpus: int
    memory: str  # a Kubernetes quantity
    gpus: int = 0


@dataclass(frozen=True)
class WorkerGroup:
    name: str
    shape: NodeShape
    min_replicas: int
    max_replicas: int


HEAD_NODE = NodeShape(cpus=8, memory="32Gi")
CPU_NODE = NodeShape(cpus=16, memory="64Gi")


def _gpu_node(gpus: int, cpus: int) -> NodeShape:
    return NodeShape(cpus=cpus, memory=f"{gpus * GPU_NODE_MEMORY_GI_PER_GPU}Gi", gpus=gpus)


def _cpu_group(cpus_needed: float) -> WorkerGroup:
    # At least one CPU node always: the Serve ingress, eval bookkeeping and small tasks run there.
    return WorkerGroup("cpu", CPU_NODE, min_replicas=1, max_replicas=max(1, math.ceil(cpus_needed / CPU_NODE.cpus)))


def training_groups(scalings: list[ScalingSpec]) -> list[WorkerGroup]:
    """Worker groups big enough for the largest of the stages' scalings (GPU workers fill whole
    nodes of ``GPUS_PER_NODE``; Ray Data's ``data_cpus`` and CPU-only training go to CPU nodes)."""
    gpu_scalings = [s for s in scalings if s.use_gpu]
    cpu_training = max((s.num_workers * (s.cpus_per_worker or 1.0) for s in scalings if not s.use_gpu), default=0.0)
    groups = [_cpu_group(cpu_training + max(s.data_cpus for s in scalings))]
    if gpu_scalings:
        num_gpu_workers = max(s.num_workers for s in gpu_scalings)
        gpus = min(GPUS_PER_NODE, num_gpu_workers)
        cpus_per_gpu = math.ceil(max(s.cpus_per_worker or 1.0 for s in gpu_scalings))
        groups.append(WorkerGroup("gpu", _gpu_node(gpus, gpus * cpus_per_gpu), 0,
                                  math.ceil(num_gpu_workers / gpus)))
    return groups


def sampler_num_gpus(config: ServeConfig, recipe: Recipe) -> float:
    """GPUs per sampler replica; ``auto`` cannot see GPUs of a group that scales from zero."""
    num_gpus = config.replica.num_gpus
    if num_gpus != "auto":
        return float(num_gpus)
    if recipe.scaling.use_gpu:
        raise ValueError("serve config replica.num_gpus: 'auto' sees no GPUs while the GPU group is scaled to "
                         "zero; set it to the GPUs of one replica (e.g. 1)")
    return 0.0


def serving_groups(config: ServeConfig, num_gpus: float) -> list[WorkerGroup]:
    """One GPU node per sampler replica (up to ``autoscaling.max_replicas``), or CPU nodes for
    everything when the sampler runs on CPU."""
    replica, max_replicas = config.replica, config.autoscaling.max_replicas
    ingress_cpus = config.ingress.num_replicas * config.ingress.num_cpus
    if num_gpus <= 0:
        return [_cpu_group(ingress_cpus + max_replicas * replica.num_cpus)]
    gpus = math.ceil(num_gpus)
    node = _gpu_node(gpus, max(1, math.ceil(replica.num_cpus)))
    return [_cpu_group(ingress_cpus), WorkerGroup("gpu", node, 0, max_replicas)]


def k8s_name(*parts: str) -> str:
    """A DNS-1035 label KubeRay accepts for a RayJob or RayService (<= 47 characters)."""
    name = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
    if not name[:1].isalpha():
        name = f"llada-{name}"
    return name[:MAX_NAME_LENGTH].rstrip("-")


def recipe_in_image(recipe_path: str) -> str:
    """Where the job finds the recipe: its path inside the image (the image holds the project at
    ``/app``), or an s3:// URI as given (``llada run`` reads recipes from storage too)."""
    if recipe_path.startswith("s3://"):
        return recipe_path
    path = Path(recipe_path.removeprefix("file://")).resolve()
    if not path.is_relative_to(PROJECT_ROOT):
        raise ValueError(f"recipe {recipe_path}: outside the project, so the image does not contain it; put it "
                         "under jobs/recipes/ and rebuild the image, or upload it and pass its s3:// URI")
    return f"{PROJECT_DIR_IN_IMAGE}/{path.relative_to(PROJECT_ROOT).as_posix()}"


def run_command(recipe_ref: str, stage: str | None, overrides: list[str]) -> str:
    """The job's entrypoint: ``llada run`` (the image's own console script, so no other
    interpreter can be picked up) with the same overrides the manifest was rendered with."""
    return shlex.join(["llada", *run_arguments(recipe_ref, stage, overrides)])


def uses_s3(values: Any) -> bool:
    """Whether any string in a (recipe) document is an s3:// URI: then pods need the storage Secret."""
    if isinstance(values, dict):
        return any(uses_s3(value) for value in values.values())
    if isinstance(values, list):
        return any(uses_s3(value) for value in values)
    return isinstance(values, str) and values.startswith("s3://")


@dataclass(frozen=True)
class PodSettings:
    """What every Ray container gets besides its shape."""

    image: str
    storage_secret: bool  # envFrom the storage Secret
    api_key_env: str | None = None  # the serve config's api_key_env, from the API key Secret
    serve_port: int | None = None  # the Serve proxy's port (RayService)
    scale_up: bool = False  # let drivers wait for the autoscaler (training)
    tracking_secret: bool = False  # envFrom the MLflow Secret, if it exists (training)


def _env(settings: PodSettings) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if settings.scale_up:
        env.append({"name": SCALE_UP_TIMEOUT_ENV, "value": str(SCALE_UP_TIMEOUT_S)})
    if settings.api_key_env:
        env.append({"name": settings.api_key_env,
                    "valueFrom": {"secretKeyRef": {"name": API_KEY_SECRET, "key": API_KEY_SECRET_KEY}}})
    return env


def pod_template(role: str, shape: NodeShape, settings: PodSettings, ports: list[dict[str, Any]]) -> dict[str, Any]:
    """The pod of one Ray node: one container (KubeRay's Ray container is the first), requests
    equal to limits (Ray counts the limits), shared memory for the object store and NCCL."""
    resources = {"cpu": str(shape.cpus), "memory": shape.memory}
    if shape.gpus:
        resources["nvidia.com/gpu"] = str(shape.gpus)
    container: dict[str, Any] = {
        "name": f"ray-{role}", "image": settings.image, "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": resources, "limits": dict(resources)},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if env := _env(settings):
        container["env"] = env
    env_from = [{"secretRef": {"name": STORAGE_SECRET}}] if settings.storage_secret else []
    if settings.tracking_secret:
        env_from.append({"secretRef": {"name": TRACKING_SECRET, "optional": True}})
    if env_from:
        container["envFrom"] = env_from
    if settings.serve_port is not None:
        ports = [*ports, {"name": "serve", "containerPort": settings.serve_port}]
    if ports:
        container["ports"] = ports
    spec: dict[str, Any] = {"containers": [container], "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]}
    if shape.gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": dict(LABELS)}, "spec": spec}


HEAD_PORTS = [{"name": "gcs-server", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
              {"name": "client", "containerPort": 10001}]


def ray_cluster_spec(groups: list[WorkerGroup], settings: PodSettings) -> dict[str, Any]:
    """A RayClusterSpec: token auth from the Ray auth Secret, in-tree autoscaler v2, a head that
    runs no tasks, and the worker groups (``replicas`` starts at ``minReplicas``)."""
    return {
        "rayVersion": version("ray"),
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"version": "v2", "upscalingMode": "Default", "idleTimeoutSeconds": 600},
        "authOptions": {"mode": "token", "secretName": RAY_AUTH_SECRET},
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            "rayStartParams": {"num-cpus": "0"},
            "template": pod_template("head", HEAD_NODE, settings, HEAD_PORTS),
        },
        "workerGroupSpecs": [{
            "groupName": group.name, "replicas": group.min_replicas, "minReplicas": group.min_replicas,
            "maxReplicas": group.max_replicas, "rayStartParams": {},
            "template": pod_template("worker", group.shape, settings, []),
        } for group in groups],
    }


def _manifest(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": KUBERAY_API_VERSION, "kind": kind,
            "metadata": {"name": name, "labels": {**LABELS, "app.kubernetes.io/name": name}}, "spec": spec}


def _training_settings(recipe: Recipe, image: str) -> PodSettings:
    return PodSettings(image=image, storage_secret=uses_s3(recipe.model_dump(mode="json")), scale_up=True,
                       tracking_secret=recipe.tracking.enabled)


def stage_scalings(recipe: Recipe, stage: str | None = None) -> list[ScalingSpec]:
    """The scaling of each stage (or of ``stage`` alone): its own, else the recipe's."""
    stages = [recipe.stage(stage)] if stage else recipe.stages
    return [s.scaling or recipe.scaling for s in stages]


def raycluster(recipe: Recipe, image: str) -> dict[str, Any]:
    """A long-lived cluster for the whole recipe: submit runs to it with ``llada submit``."""
    spec = ray_cluster_spec(training_groups(stage_scalings(recipe)), _training_settings(recipe, image))
    return _manifest("RayCluster", k8s_name(recipe.run_id), spec)


def deletion_rules() -> list[dict[str, Any]]:
    """After success the GPUs go at once and the RayJob a day later; after a failure the cluster
    stays an hour for its logs. (KubeRay refuses ``shutdownAfterJobFinishes`` and
    ``ttlSecondsAfterFinished`` beside deletion rules: the DeleteCluster rules shut it down.)"""
    def rule(policy: str, ttl_s: int, **condition: str) -> dict[str, Any]:
        return {"policy": policy, "condition": {**condition, "ttlSeconds": ttl_s}}

    return [rule("DeleteCluster", 0, jobStatus="SUCCEEDED"), rule("DeleteSelf", 86400, jobStatus="SUCCEEDED"),
            rule("DeleteCluster", 3600, jobStatus="FAILED"), rule("DeleteSelf", 7 * 86400, jobStatus="FAILED"),
            rule("DeleteCluster", 3600, jobDeploymentStatus="Failed")]


def rayjob(recipe: Recipe, recipe_ref: str, image: str, stage: str | None = None,
           overrides: list[str] | None = None) -> dict[str, Any]:
    """A RayJob that creates its own cluster, runs ``llada run`` (all stages, or ``stage``) from
    the submitter pod (K8sJobMode), retries on a new cluster, and cleans up after itself."""
    groups = training_groups(stage_scalings(recipe, stage))
    spec = {
        "entrypoint": run_command(recipe_ref, stage, overrides or []),
        "metadata": {"llada.recipe": recipe_ref, "llada.stage": stage or "all"},
        "submissionMode": "K8sJobMode",
        "backoffLimit": RAYJOB_BACKOFF_LIMIT,
        "deletionStrategy": {"deletionRules": deletion_rules()},
        "rayClusterSpec": ray_cluster_spec(groups, _training_settings(recipe, image)),
    }
    return _manifest("RayJob", k8s_name(recipe.run_id, *([stage] if stage else [])), spec)


def default_serve_config(recipe: Recipe) -> ServeConfig:
    """The recipe's ``serve:`` block, else the shipped config for its hardware."""
    if recipe.serve is not None:
        return recipe.serve
    return load_serve_config(str(SERVE_CONFIGS / ("gpu-cluster.yaml" if recipe.scaling.use_gpu else "laptop.yaml")))


def serve_app_args(recipe: Recipe, checkpoint: str, serve_config: str | None = None) -> AppArgs:
    """The sampler app: ``serve_config`` (a file), else the recipe's ``serve:`` block, else the
    shipped config for the recipe's hardware. The proxy binds 0.0.0.0 (``--host 0.0.0.0``):
    KubeRay's Serve Service reaches it on the pod's address."""
    cluster = {"host": "0.0.0.0"}
    if serve_config is not None:
        config = load_serve_config(serve_config, cluster)
    else:
        config = ServeConfig.model_validate({**default_serve_config(recipe).model_dump(), **cluster})
    return AppArgs(checkpoint=checkpoint, config=config)


def rayservice(recipe: Recipe, app_args: AppArgs, image: str) -> dict[str, Any]:
    """A RayService whose serveConfigV2 is exactly what ``llada serve --print-config`` prints
    for the same checkpoint and config."""
    from serve.app import serve_config_yaml

    config = app_args.config
    num_gpus = sampler_num_gpus(config, recipe)
    settings = PodSettings(image=image, storage_secret=storage.is_remote(app_args.checkpoint),
                           api_key_env=config.api_key_env, serve_port=config.port)
    spec = {
        "serveConfigV2": serve_config_yaml(app_args),
        "upgradeStrategy": {"type": "NewCluster"},
        "rayClusterConfig": ray_cluster_spec(serving_groups(config, num_gpus), settings),
    }
    return _manifest("RayService", k8s_name(recipe.run_id, "sampler"), spec)


class _ManifestDumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as literal blocks, so the embedded YAML stays readable."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _represent_str)


def render_yaml(document: dict[str, Any], header: list[str]) -> str:
    """The document as YAML under a comment header (its first line: the command that made it)."""
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header)
    return comments + yaml.dump(document, Dumper=_ManifestDumper, sort_keys=False, width=4096)


def referenced_secrets(document: Any) -> list[str]:
    """The Kubernetes Secrets a manifest reads (envFrom, secretKeyRef, authOptions.secretName)."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("secretRef", "secretKeyRef") and isinstance(value, dict):
                    names.add(value["name"])
                elif key == "authOptions" and isinstance(value, dict) and value.get("secretName"):
                    names.add(value["secretName"])
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(document)
    return sorted(names)
