"""One Ray cluster per test session (``ray start --head``), joined by address by every test,
subprocess driver and ``ray job submit``; tiny demo data built once and shared."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

os.environ["RAY_AUTH_MODE"] = "disabled"          # the same for the cluster, drivers and job submission
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
TEST_SCALE = 0.3


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """Address of a fresh local cluster with 8 logical CPUs (fractional asks never starve on 2 cores)."""
    temp = str(tmp_path_factory.mktemp("ray"))
    port = 6390 + os.getpid() % 500
    dash = 8300 + os.getpid() % 500
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=8", "--include-dashboard=true",
                    f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--temp-dir={temp}",
                    "--disable-usage-stats"], check=True, capture_output=True, timeout=180)
    address = f"127.0.0.1:{port}"
    os.environ["RAY_ADDRESS"] = address
    import ray
    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}"}
    ray.shutdown()
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """Small versions of the demo domains (deterministic, generated once per session)."""
    from mifuse_ray.demo.domains import DOMAINS, ensure_domain
    root = str(tmp_path_factory.mktemp("demo"))
    for name in DOMAINS:
        ensure_domain(name, root, scale=TEST_SCALE)
    return root


@pytest.fixture(scope="session")
def source_model(ray_cluster, demo_root, tmp_path_factory):
    """A source CNN trained with Ray Train on the small acted_studio domain."""
    from mifuse_ray.config import MiFuseConfig
    from mifuse_ray.train.source import train_source
    cfg = MiFuseConfig()
    cfg.source_train.epochs = 12
    out = str(tmp_path_factory.mktemp("source"))
    summary = train_source(cfg, os.path.join(demo_root, "acted_studio", "manifest.parquet"), out)
    return summary["checkpoint"]


def wait_for(predicate, timeout=60.0, interval=0.2):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False
