"""A local Ray cluster of several nodes on one machine (`llada rehearse --nodes N`): a head and
N-1 worker nodes, each a raylet of its own on 127.0.0.1, so Ray places work across nodes (Train
workers, their gloo all-to-alls, Ray Data, Serve replicas) as it does on a real cluster.

Ray's ``ray.cluster_utils.Cluster`` starts the nodes; it is the tool Ray's own multi-node tests
use. Node CPUs are logical: they say how Ray may place work, not how many cores there are.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Iterator

NODE_OBJECT_STORE_BYTES = 512 * 2**20  # per node: the rehearsal's blocks are small


@contextlib.contextmanager
def local_cluster(nodes: int, cpus_per_node: float) -> Iterator[str]:
    """Start the nodes, yield the head's address, and stop them all at the end."""
    if nodes < 1:
        raise ValueError(f"--nodes: must be >= 1, got {nodes}")
    from ray.cluster_utils import Cluster

    node_args = {"num_cpus": cpus_per_node, "object_store_memory": NODE_OBJECT_STORE_BYTES}
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False},
                      shutdown_at_exit=True)
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a server started next)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
