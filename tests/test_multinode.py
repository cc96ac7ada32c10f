"""A three-node Ray cluster on one machine (``ray.cluster_utils.Cluster``): a head that runs no work
and two worker nodes. Labelling runs across them and one worker node is killed mid-way; then a
two-worker DDP student trains with its workers on different nodes.

What a real cluster needs is what this test gives it: the target, the LALM cache, the labels and
Ray Train's storage on one path every node sees (here the machine's disk; on a cluster a shared
mount or an s3:// / gs:// URI). The test owns its cluster, so it runs first, before the session
cluster exists (conftest orders it): two clusters on one machine must never run at once.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from conftest import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.own_cluster]


def _untrained_source(path: str) -> str:
    """A source CNN checkpoint with random weights: the teachers' quality does not matter here."""
    import torch
    from mifuse_ray.models.cnn import LogMelCNN
    torch.manual_seed(0)
    LogMelCNN().save(path)
    return path


def _kill_node_when(cluster, node, server, requests: int, timeout_s: float, record: dict) -> threading.Thread:
    """Kill ``node`` (no graceful shutdown: a lost machine) once the endpoint has seen ``requests``."""
    def watch():
        end = time.time() + timeout_s
        while time.time() < end and server.stats["requests"] < requests:
            time.sleep(0.05)
        record["requests_at_kill"] = server.stats["requests"]
        cluster.remove_node(node, allow_graceful=False)
        record["killed_at"] = time.time()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_lost_node_costs_no_clip_and_no_answer_twice_then_ddp_across_nodes(demo_root, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from mifuse_ray.audio import list_inputs
    from mifuse_ray.config import MiFuseConfig
    from mifuse_ray.labeling import label_target
    from mifuse_ray.demo.lalm_server import BackgroundServer, ServerConfig
    from mifuse_ray.train.student import train_student

    assert not ray.is_initialized(), "the multi-node test must run before the session cluster starts"
    shared = str(tmp_path)                         # what every node sees
    # the head runs no work; a lost node is declared dead after ~3 s of missed health checks instead
    # of Ray's default ~15 s (a test setting: the recovery is the same, only sooner)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 3
        checkpoint = _untrained_source(os.path.join(shared, "source"))
        clips = list_inputs(os.path.join(demo_root, "call_centre", "manifest.parquet"), split="adapt")
        cfg = MiFuseConfig()
        cfg.source.passes_per_clip, cfg.source.batch_size, cfg.source.num_actors = 4, 8, 2
        cfg.lalm.batch_size, cfg.lalm.num_actors, cfg.lalm.concurrency = 8, 2, 4
        cfg.lalm.cache_dir = os.path.join(shared, "lalm_cache")
        cfg.lalm.qps = 500.0          # not binding; the limiter actor must sit on the head and outlive the lost node
        cfg.shard_rows = 16           # ten shards: some are written before the node is lost, some after
        record: dict = {}
        # latency makes labelling last long enough (~8 s) to lose the node in the middle of it
        with BackgroundServer(ServerConfig(labels=tuple(cfg.labels), latency_s=0.4)) as server:
            watcher = _kill_node_when(cluster, workers[0], server, len(clips) // 3, 120, record)
            result = label_target(cfg, clips, os.path.join(shared, "labels"), checkpoint, server.url)
            watcher.join(timeout=60)
            requests = server.stats["requests"]
        table = result.table
        assert "killed_at" in record and record["requests_at_kill"] < len(clips), record   # lost mid-labelling
        # the labels were written by the cluster: the head runs no work, so every writer sat on a worker node
        assert result.summary["shard_writer_nodes"], result.summary
        assert cluster.head_node.node_id not in result.summary["shard_writer_nodes"]
        # no partial shard: every file is a whole Parquet file of its slice, no temporary file is left
        import pyarrow.parquet as pq
        for folder in (result.draws.root, result.shards.root):
            assert not [f for f in os.listdir(folder) if f.startswith(".")], os.listdir(folder)
        draws_rows = [pq.read_table(p).num_rows for p in result.draws.paths()]
        assert len(draws_rows) == 10 and sum(draws_rows) == len(clips), draws_rows
        # every clip exactly once, and labelled (none lost with the node)
        assert sorted(table["clip_id"]) == sorted(clips["clip_id"])
        assert table["error"].isna().all(), table["error"].value_counts()
        assert (table["lalm_votes"].map(lambda v: min(v)) >= 0).all()
        # no answer paid twice: one request per clip (n answers in one request); only a request in flight
        # on the lost node when it died, whose answer never reached the cache, may be sent again. Both LALM
        # actors may sit on the lost node (one run sent 155 requests for 150 clips), each with
        # `concurrency` requests in flight
        in_flight_on_lost_node = cfg.lalm.concurrency * cfg.lalm.num_actors
        assert len(clips) <= requests <= len(clips) + in_flight_on_lost_node, (requests, len(clips), record)

        # a two-worker DDP student, one worker per node, storage on the shared path; the lost node's
        # replacement (as an autoscaler would start one) joins from the main thread: Ray registers
        # signal handlers when a node starts, which only the main thread may do
        cluster.add_node(num_cpus=2)
        assert wait_for(lambda: ray.available_resources().get("CPU", 0) >= 3, timeout=60), ray.available_resources()
        print("resources before training", ray.available_resources(), len([n for n in ray.nodes() if n["Alive"]]))
        cfg.train.epochs, cfg.train.batch_size = 1, 8
        cfg.train.num_workers, cfg.train.cpus_per_worker, cfg.train.placement_strategy = 2, 0.5, "STRICT_SPREAD"
        cfg.train.storage_path = os.path.join(shared, "ray_train")
        res = train_student(cfg, table, None, checkpoint, os.path.join(shared, "student"), run_name="multinode")
        assert res.history and res.history[-1]["epoch"] == 0
        assert os.path.isdir(os.path.join(shared, "ray_train", "multinode"))
        assert os.path.exists(os.path.join(res.model_dir, "mifuse_model.json"))
    finally:
        ray.shutdown()
        cluster.shutdown()
