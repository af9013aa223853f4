"""The embedded Ray that tests running the job in their own process start."""

from __future__ import annotations


def start_local_ray() -> None:
    """The job's own embedded Ray (`jobs.ray_resources.start_embedded_ray`) with the CI machine's 2 CPUs: its
    settings (worker priority, idle workers kept for the writes) and its second try when a node misses Ray's fixed
    startup wait on a busy machine. A Ray already started in this process is kept."""
    from jobs.ray_resources import start_embedded_ray

    start_embedded_ray(2, ignore_reinit_error=True, log_to_driver=False)
