"""Reports a cluster configuration with a GPU node group to a Ray cluster's GCS, as Ray's autoscaler (v2, as KubeRay
runs it) does for its node groups; a test stands in for the autoscaler by starting the GPU node itself.

    python tests/report_gpu_group.py ADDRESS MAX_GPU_NODES
"""

from __future__ import annotations

import sys

import ray
from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
from ray.core.generated import autoscaler_pb2
from ray.experimental.internal_kv import _internal_kv_put


def main(address: str, max_gpu_nodes: int) -> None:
    ray.init(address=address, log_to_driver=False)
    config = autoscaler_pb2.ClusterConfig()
    cpu = config.node_group_configs.add(name="cpu", min_count=0, max_count=0)
    cpu.resources["CPU"] = 2
    gpu = config.node_group_configs.add(name="gpu", min_count=0, max_count=max_gpu_nodes)
    gpu.resources["CPU"] = 1
    gpu.resources["GPU"] = 1
    _internal_kv_put(
        GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, config.SerializeToString(), namespace=GCS_AUTOSCALER_STATE_NAMESPACE
    )
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
