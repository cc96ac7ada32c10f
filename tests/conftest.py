"""One Ray cluster per test session (``ray start --head``), joined by address by every test,
subprocess driver and ``ray job submit``; tiny demo data built once and shared."""
from __future__ import annotations

import logging
import os
import time

import pytest

# Token authentication on, as Ray 2.59+ starts clusters by default; drivers, `ray job submit` and the
# kill tests read the token because they inherit RAY_AUTH_MODE=token (a client reads the token file
# only in this mode).
os.environ["RAY_AUTH_MODE"] = "token"


def _ensure_auth_token() -> None:
    """On a fresh machine there is no ~/.ray/auth_token yet. ``ray.init`` writes one when it starts a
    local cluster, but the multi-node test runs first and starts its nodes with
    ``ray.cluster_utils.Cluster``, whose GCS then aborts for want of a token (as `ray start` would without
    `ray get-auth-token --generate`). So the session makes the token before any cluster starts."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    if os.path.exists(path):
        return
    import secrets
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:                    # another process made it meanwhile
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))


_ensure_auth_token()
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
logging.getLogger("ray").setLevel(logging.WARNING)   # Ray Data logs whole stats dicts at DEBUG
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_SCALE = 0.5


@pytest.fixture(scope="session")
def ray_cluster():
    """A fresh head node (8 logical CPUs, dashboard for the Jobs API) owned by this session only.

    Subprocess drivers, ``ray job submit`` and kill tests join it by address; ``ray.shutdown``
    stops exactly this cluster (``ray stop`` would kill every cluster on the machine).
    """
    import ray
    # A cluster-wide API key, as a KubeRay Secret puts it in every node's environment (see test_reliability).
    os.environ["MIFUSE_CLUSTER_KEY"] = "sk-mifuse-reliability-SECRET-7171"
    from mifuse_ray.ray_utils import local_cluster_resources
    ctx = ray.init(address="local", **local_cluster_resources(8), include_dashboard=True, dashboard_host="127.0.0.1",
                   logging_level="WARNING", log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    os.environ["RAY_ADDRESS"] = address
    yield {"address": address, "dashboard": "http://" + ctx.dashboard_url}
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """Small versions of the demo domains (deterministic, generated once per session)."""
    from mifuse_ray.demo.domains import DEMO_DOMAINS, ensure_domain
    root = str(tmp_path_factory.mktemp("demo"))
    for name in DEMO_DOMAINS:
        ensure_domain(name, root, scale=TEST_SCALE)
    return root


@pytest.fixture(scope="session")
def source_model(ray_cluster, demo_root, tmp_path_factory):
    """A source CNN trained with Ray Train on the small acted_studio domain."""
    from mifuse_ray.config import MiFuseConfig
    from mifuse_ray.train.source import train_source
    cfg = MiFuseConfig()
    # twice the default learning rate for half the epochs: dev UAR 0.64 in 55 s here, against 0.77 in 92 s
    # for 20 epochs; test_demo_domains_are_a_real_shift checks it is still a source model worth adapting
    cfg.source_train.epochs, cfg.source_train.lr = 12, 4e-3
    out = str(tmp_path_factory.mktemp("source"))
    summary = train_source(cfg, os.path.join(demo_root, "acted_studio", "manifest.parquet"), out)
    return summary["checkpoint"]


def subset_manifest(demo_root: str, domain: str, out: str, per_split: int | None = None,
                    splits=("adapt", "dev", "test")) -> str:
    """A manifest of the first ``per_split`` clips of each of ``splits`` of a demo domain, with
    absolute paths, written to ``out``: jobs that prove plumbing (a job submission, faults, a
    killed driver) need a few dozen clips, not the domain."""
    import pandas as pd
    manifest = pd.read_parquet(os.path.join(demo_root, domain, "manifest.parquet"))
    parts = [manifest[manifest.split == split].head(per_split) for split in splits]
    subset = pd.concat(parts).reset_index(drop=True)
    subset["path"] = [p if os.path.isabs(p) else os.path.join(demo_root, domain, p) for p in subset.path]
    subset.to_parquet(out)
    return out


def wait_for(predicate, timeout=60.0, interval=0.2):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False


@pytest.fixture
def tiny_hf_dir(tmp_path):
    """A randomly initialised wav2vec2-style classifier saved like a real checkpoint."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, classifier_proj_size=16,
                         num_labels=4, hidden_dropout=0.1, activation_dropout=0.1, final_dropout=0.1,
                         mask_time_prob=0.5, layerdrop=0.5,
                         id2label={0: "neutral", 1: "happy", 2: "angry", 3: "sad"},
                         label2id={"neutral": 0, "happy": 1, "angry": 2, "sad": 3})
    import torch
    torch.manual_seed(0)
    Wav2Vec2ForSequenceClassification(cfg).save_pretrained(tmp_path / "hf")
    return str(tmp_path / "hf")


def pytest_collection_modifyitems(config, items):
    """Every test that needs the Ray cluster (directly or through a fixture) is `slow`:
    `pytest -m "not slow"` runs the pure and HTTP tests alone, in well under a minute.
    Tests that start a cluster of their own (`own_cluster`) run first, before the session cluster
    exists: two Ray clusters on one machine must never run at once."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("own_cluster") is None)   # stable: the rest keep their order
