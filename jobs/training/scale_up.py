"""Growing an autoscaling cluster to a stage's size before the stage sizes its workers.

The clusters ``llada infra render`` writes start their GPU workers at zero, and
``jobs.training.stage.worker_resources`` fails fast when the cluster is smaller than the stage. Where
``LLADA_SCALE_UP_TIMEOUT_S`` is set (the rendered manifests set it on every node), the driver
first asks Ray's autoscaler for the stage's resource bundles
(``ray.autoscaler.sdk.request_resources``), waits until the cluster has them, and withdraws the
request when the stage ends so idle nodes can go. Unset (a laptop), nothing changes.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Callable, Iterator

from jobs.stage_config import ScalingSpec
from pipelines.reader import DataError

SCALE_UP_TIMEOUT_ENV = "LLADA_SCALE_UP_TIMEOUT_S"
POLL_S = 5.0

Resources = dict[str, float]


def timeout_from_env() -> float | None:
    """Seconds to wait for the autoscaler, or None (do not ask it) when the variable is unset."""
    text = os.environ.get(SCALE_UP_TIMEOUT_ENV, "").strip()
    if not text:
        return None
    try:
        timeout_s = float(text)
    except ValueError:
        raise DataError(f"{SCALE_UP_TIMEOUT_ENV}: expected seconds, got {text!r}") from None
    return timeout_s if timeout_s > 0 else None


def stage_bundles(scaling: ScalingSpec) -> list[Resources]:
    """One bundle per Train worker (its CPUs, and a GPU), and one CPU per Ray Data read task."""
    worker = {"CPU": scaling.cpus_per_worker or 1.0, **({"GPU": 1.0} if scaling.use_gpu else {})}
    return [dict(worker) for _ in range(scaling.num_workers)] + [{"CPU": 1.0}] * math.ceil(scaling.data_cpus)


def fits(bundles: list[Resources], cluster: Resources) -> bool:
    """Whether the cluster's totals cover the bundles' (placement is Ray's business)."""
    needed: Resources = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            needed[name] = needed.get(name, 0.0) + amount
    return all(cluster.get(name, 0.0) >= amount for name, amount in needed.items())


def _ray_cluster_resources() -> Resources:
    import ray

    return ray.cluster_resources()


def _ray_request(bundles: list[Resources]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


@contextlib.contextmanager
def scaled_up(scaling: ScalingSpec, timeout_s: float | None,
              cluster_resources: Callable[[], Resources] = _ray_cluster_resources,
              request: Callable[[list[Resources]], None] = _ray_request,
              sleep: Callable[[float], None] = time.sleep,
              clock: Callable[[], float] = time.monotonic) -> Iterator[Resources]:
    """Yields the cluster's resources, after growing it to the stage's bundles when
    ``timeout_s`` is given and it is smaller; the request is withdrawn on exit."""
    cluster = cluster_resources()
    bundles = stage_bundles(scaling)
    if timeout_s is None or fits(bundles, cluster):
        yield cluster
        return
    request(bundles)
    try:
        deadline = clock() + timeout_s
        while not fits(bundles, cluster):
            if clock() >= deadline:
                raise DataError(
                    f"scaling: the cluster did not grow to {scaling.num_workers} Train workers "
                    f"({'1 GPU and ' if scaling.use_gpu else ''}{scaling.cpus_per_worker or 1:g} CPU each) plus "
                    f"{scaling.data_cpus:g} CPUs for Ray Data within {timeout_s:g} s (it has {cluster}); check the "
                    f"worker groups' maxReplicas and the autoscaler's log, or raise {SCALE_UP_TIMEOUT_ENV}")
            sleep(POLL_S)
            cluster = cluster_resources()
        yield cluster
    finally:
        request([])
