"""Connecting to Ray the same way from every entry point."""
from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def local_cluster_resources(cpus: int) -> dict:
    """``ray.init`` arguments for a one-machine cluster declaring ``cpus`` logical CPUs.

    The raylet expects as many workers starting at once as there are cores and warns on the
    console ("8 PYTHON worker processes ... 4x the maximum expected startup concurrency") when the
    declared CPUs are used as intended (tasks and actors asking for fractions); expect that many
    instead. The test session's cluster starts the same way as a job's."""
    return {"num_cpus": cpus, "_system_config": {"worker_maximum_startup_concurrency": cpus}}


def init_ray(address: str = "", logical_cpus: int | None = None, verbose: bool = True) -> None:
    """Join the given cluster (or $RAY_ADDRESS, as under ``ray job submit``); else start a local one.

    A local cluster declares more logical CPUs than cores: on a 2-core machine, actors, Train
    workers and read tasks asking for whole CPUs would otherwise starve one another. Without
    ``verbose`` the workers' output and Ray Data's progress bars stay off the console (the
    workers' logs are in the Ray session's log folder, the driver's in the job's ``logs/ray.log``).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    quiet = dict(log_to_driver=verbose, logging_level=logging.WARNING, include_dashboard=False)
    if address:
        quiet.pop("include_dashboard")
        ray.init(address=address, **quiet)
    else:
        cpus = logical_cpus or max(8, 4 * (os.cpu_count() or 1))
        ray.init(address="local", **local_cluster_resources(cpus), **quiet)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
