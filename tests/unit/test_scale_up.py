"""jobs/training/scale_up.py: a stage on an autoscaling cluster asks for its size, waits for it, withdraws
the request afterwards; without LLADA_SCALE_UP_TIMEOUT_S nothing changes (no Ray needed here)."""

from __future__ import annotations

import pytest

from jobs.training.scale_up import SCALE_UP_TIMEOUT_ENV, fits, scaled_up, stage_bundles, timeout_from_env
from jobs.stage_config import ScalingSpec
from pipelines.reader import DataError

GPU_STAGE = ScalingSpec(num_workers=16, expert_parallel_size=8, use_gpu=True, cpus_per_worker=8, data_cpus=4)


class FakeCluster:
    """Resources that grow by one 8-GPU node per poll, and a log of autoscaler requests."""

    def __init__(self, nodes: int = 0, grows: bool = True) -> None:
        self.nodes, self.grows, self.requests, self.now = nodes, grows, [], 0.0

    def resources(self) -> dict[str, float]:
        return {"CPU": 16.0 + 64.0 * self.nodes, "GPU": 8.0 * self.nodes}

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.nodes += self.grows

    def scaled_up(self, scaling: ScalingSpec, timeout_s: float | None):
        return scaled_up(scaling, timeout_s, cluster_resources=self.resources, request=self.requests.append,
                         sleep=self.sleep, clock=lambda: self.now)


def test_a_stage_s_bundles_are_its_workers_and_its_data_cpus():
    bundles = stage_bundles(GPU_STAGE)
    assert bundles[:16] == [{"CPU": 8.0, "GPU": 1.0}] * 16 and bundles[16:] == [{"CPU": 1.0}] * 4
    assert stage_bundles(ScalingSpec(num_workers=2, data_cpus=1.5)) == [{"CPU": 1.0}] * 4
    assert fits(bundles, {"CPU": 132.0, "GPU": 16.0}) and not fits(bundles, {"CPU": 131.0, "GPU": 16.0})


def test_the_cluster_grows_to_the_stage_and_the_request_is_withdrawn():
    cluster = FakeCluster()
    with cluster.scaled_up(GPU_STAGE, timeout_s=600) as resources:
        assert resources["GPU"] == 16.0 and cluster.requests == [stage_bundles(GPU_STAGE)]
    assert cluster.requests[-1] == []  # the cluster may shrink after the stage


def test_the_request_is_withdrawn_when_the_stage_fails():
    cluster = FakeCluster()
    with pytest.raises(RuntimeError, match="train loop"), cluster.scaled_up(GPU_STAGE, timeout_s=600):
        raise RuntimeError("train loop crashed")
    assert cluster.requests[-1] == []


def test_a_cluster_that_does_not_grow_fails_with_a_clear_message():
    cluster = FakeCluster(grows=False)
    expected = r"did not grow to 16 Train workers.*maxReplicas.*LLADA_SCALE_UP_TIMEOUT_S"
    with pytest.raises(DataError, match=expected), cluster.scaled_up(GPU_STAGE, timeout_s=60):
        pass
    assert cluster.requests == [stage_bundles(GPU_STAGE), []]


@pytest.mark.parametrize("nodes,timeout_s", [(2, 600), (0, None)])
def test_no_request_when_the_cluster_is_big_enough_or_no_wait_is_set(nodes, timeout_s):
    cluster = FakeCluster(nodes=nodes)
    with cluster.scaled_up(GPU_STAGE, timeout_s) as resources:
        assert resources == cluster.resources()
    assert cluster.requests == []


def test_the_wait_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(SCALE_UP_TIMEOUT_ENV, raising=False)
    assert timeout_from_env() is None
    monkeypatch.setenv(SCALE_UP_TIMEOUT_ENV, "1800")
    assert timeout_from_env() == 1800.0
    monkeypatch.setenv(SCALE_UP_TIMEOUT_ENV, "soon")
    with pytest.raises(DataError, match="expected seconds"):
        timeout_from_env()
