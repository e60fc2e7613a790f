"""The ``ray up`` cluster-launcher config for an AWS GPU cluster, rendered from a recipe.

    llada infra render jobs/recipes/llada-moe-7b-a1b.yaml --kind cluster-launcher > cluster.yaml
    ray up cluster.yaml

Same layout as the KubeRay manifests (llada/infra/render.py): a head that runs no tasks, CPU workers
for Ray Data and the Serve ingress, GPU workers from zero. Every node runs the project's image
(Ray's launcher adds the NVIDIA runtime itself where the host has it). Two local files are
copied to every node and never written into the config: the Ray auth token
(``~/.ray/auth_token``, made by ``ray get-auth-token --generate``) and ``~/.llada/cluster.env``
(``KEY=VALUE`` lines, exported before ``ray start``: S3/MinIO credentials and endpoint, the API
key; it may be empty where the nodes' instance profile grants S3).
"""

from __future__ import annotations

from typing import Any

from llada.infra.render import CPU_NODE, HEAD_NODE, SCALE_UP_TIMEOUT_S, WorkerGroup, k8s_name, stage_scalings, training_groups
from llada.recipe import Recipe
from jobs.training.scale_up import SCALE_UP_TIMEOUT_ENV

AWS_REGION = "us-west-2"
AUTH_TOKEN_FILE = "~/.ray/auth_token"
CLUSTER_ENV_FILE = "~/.llada/cluster.env"
# (instance type, vCPUs, GPUs): m5 types match HEAD_NODE and CPU_NODE; p4d.24xlarge is 8 x A100 40 GB.
HEAD_INSTANCE = ("m5.2xlarge", HEAD_NODE.cpus, 0)
CPU_INSTANCE = ("m5.4xlarge", CPU_NODE.cpus, 0)
GPU_INSTANCE = ("p4d.24xlarge", 96, 8)
ROOT_VOLUME_GB = {"head": 200, "cpu": 200, "gpu": 1000}  # the image (CUDA, torch) and checkpoint downloads
ENV_PREFIX = (f"set -a && . {CLUSTER_ENV_FILE} && set +a && export RAY_AUTH_MODE=token "
              f"{SCALE_UP_TIMEOUT_ENV}={SCALE_UP_TIMEOUT_S} && ")


def _node_type(name: str, instance: tuple[str, int, int], min_workers: int, max_workers: int) -> dict[str, Any]:
    instance_type, cpus, gpus = instance
    resources = {"CPU": 0 if name == "head" else cpus, **({"GPU": gpus} if gpus else {})}
    return {
        "min_workers": min_workers, "max_workers": max_workers, "resources": resources,
        "node_config": {"InstanceType": instance_type, "BlockDeviceMappings": [
            {"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": ROOT_VOLUME_GB[name], "VolumeType": "gp3"}}]},
    }


def _worker_types(groups: list[WorkerGroup]) -> dict[str, Any]:
    # A GPU group of KubeRay pods with up to 8 GPUs each needs as many 8-GPU instances.
    instances = {"cpu": CPU_INSTANCE, "gpu": GPU_INSTANCE}
    return {group.name: _node_type(group.name, instances[group.name], group.min_replicas, group.max_replicas)
            for group in groups}


def cluster_launcher(recipe: Recipe, image: str) -> dict[str, Any]:
    """The ``ray up`` config (validated against Ray's own ray-schema.json by the tests)."""
    groups = training_groups(stage_scalings(recipe))
    return {
        "cluster_name": k8s_name(recipe.run_id),
        "max_workers": sum(group.max_replicas for group in groups),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "provider": {"type": "aws", "region": AWS_REGION, "cache_stopped_nodes": False},
        "auth": {"ssh_user": "ubuntu"},
        "docker": {"image": image, "container_name": "llada", "pull_before_run": True,
                   "run_options": ["--ulimit nofile=65536:65536"]},
        "file_mounts": {AUTH_TOKEN_FILE: AUTH_TOKEN_FILE, CLUSTER_ENV_FILE: CLUSTER_ENV_FILE},
        # Nothing to install on top of the image (Ray's AWS defaults would pip-install Ray where it is missing).
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_node_type": "head",
        "available_node_types": {"head": _node_type("head", HEAD_INSTANCE, 0, 0), **_worker_types(groups)},
        "head_start_ray_commands": [
            "ray stop",
            ENV_PREFIX + "ray start --head --port=6379 --num-cpus=0 --dashboard-host=0.0.0.0 "
                         "--object-manager-port=8076 --autoscaling-config=~/ray_bootstrap_config.yaml",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            ENV_PREFIX + "ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076",
        ],
    }
