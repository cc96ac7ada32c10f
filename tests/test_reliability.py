"""Faults a deployment meets: a misbehaving LALM, a driver killed mid-labeling."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd

from conftest import REPO, subset_manifest, wait_for
from mifuse_ray.demo.lalm_server import BackgroundServer, ServerConfig


def wait_until_unchanged(read, quiet_s, timeout):
    last, since, end = read(), time.time(), time.time() + timeout
    while time.time() < end:
        time.sleep(0.2)
        now = read()
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= quiet_s:
            return True
    return False


def label_cmd(target, model, out, url, extra=()):
    return [sys.executable, os.path.join(REPO, "jobs", "label.py"), "--target", target, "--source.checkpoint", model,
            "--output", out, "--lalm.base_url", url, "--lalm.answers_per_clip", "3", "--source.passes_per_clip", "4",
            "--lalm.use_n", "false", *extra]


def test_misbehaving_lalm_loses_no_clip(ray_cluster, source_model, demo_root, tmp_path):
    target = subset_manifest(demo_root, "call_centre", str(tmp_path / "clips.parquet"), per_split=60,
                             splits=("adapt",))      # one split, one pipeline: the faults strike per request
    cfg = ServerConfig(fail_rate=0.2, retry_after_s=0.1, hang_s=3.0, latency_s=0.01, seed=3)
    with BackgroundServer(cfg) as server:
        proc = subprocess.run(label_cmd(target, source_model, str(tmp_path), server.url,
                                        ["--lalm.timeout_s", "1.0", "--lalm.retry_budget", "0.5",
                                         "--lalm.backoff_base_s", "0.05"]),
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        stats = server.stats
    table = pd.read_parquet(os.path.join(tmp_path, "labels", "labels.parquet"))
    manifest = pd.read_parquet(target)
    assert sorted(table.clip_id) == sorted(manifest.loc[manifest.split == "adapt", "clip_id"])
    needed = len(table) * 3                                           # N separate requests per clip
    assert stats["requests"] <= (1 + 0.5) * needed
    assert sum(stats["faults"].values()) > 0.1 * needed               # the faults really happened
    reasons = [r for rs in table.lalm_reasons.dropna() for r in rs if r]
    assert any(r.startswith("no_label_in_answer") for r in reasons)   # non-label answers kept with a reason
    ok = table[table.error.isna()]
    assert len(ok) >= 0.9 * len(table)
    failed = table[table.error.notna()]
    assert failed.error.str.len().gt(0).all()


def test_killed_driver_resumes_from_cache_with_identical_output(ray_cluster, source_model, demo_root, tmp_path):
    target = subset_manifest(demo_root, "podcast", str(tmp_path / "adapt.parquet"), per_split=80,
                             splits=("adapt",))                    # only the adaptation split: one stage
    n_clips = len(pd.read_parquet(target))
    total = n_clips * 3
    with BackgroundServer(ServerConfig(latency_s=0.05)) as server:
        args = ["--lalm.concurrency", "4"]
        proc = subprocess.Popen(label_cmd(target, source_model, str(tmp_path / "run"), server.url, args),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        assert wait_for(lambda: server.stats["completions"] >= total // 2, timeout=600, interval=0.05)
        os.killpg(proc.pid, signal.SIGKILL)                           # the driver dies half-way
        proc.wait()
        # The driver's actors outlive it until the cluster notices the death; requests they had in flight
        # may still complete. Count what was paid only once the endpoint has gone quiet.
        assert wait_until_unchanged(lambda: server.stats["completions"], quiet_s=3.0, timeout=120)
        paid_before = server.stats["completions"]
        assert paid_before < total
        rerun = subprocess.run(label_cmd(target, source_model, str(tmp_path / "run"), server.url, args),
                               capture_output=True, text=True, timeout=900)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        summary_text = rerun.stdout[rerun.stdout.index("{"):rerun.stdout.rindex("}") + 1]
        summary = json.loads(summary_text)
        paid_total = server.stats["completions"]
        assert summary["lalm_cache_hits"] >= paid_before - 4 * 2      # all but the requests cut off in flight
        assert paid_total - paid_before == summary["lalm_requests"] <= total - summary["lalm_cache_hits"] + 8
        fresh = subprocess.run(label_cmd(target, source_model, str(tmp_path / "fresh"), server.url, args),
                               capture_output=True, text=True, timeout=900)
        assert fresh.returncode == 0, fresh.stderr[-3000:]
    a = pd.read_parquet(os.path.join(tmp_path, "run", "labels", "labels.parquet")).sort_values("clip_id")
    b = pd.read_parquet(os.path.join(tmp_path, "fresh", "labels", "labels.parquet")).sort_values("clip_id")
    assert list(a.clip_id) == list(b.clip_id) and len(a) == n_clips
    for col in ("lalm_votes", "source_votes", "lalm_raw"):
        assert [list(x) for x in a[col]] == [list(x) for x in b[col]], col


SECRET = "sk-mifuse-reliability-SECRET-7171"    # conftest puts it in the cluster's environment too


def test_api_key_reaches_the_endpoint_and_is_never_written(ray_cluster, source_model, demo_root, tmp_path):
    """The key reaches an endpoint that requires it, by both routes a deployment uses, and appears
    nowhere: driver and job output, Ray's own session logs, Parquet, plots, the response cache.

    1. A driver joining a cluster whose workers lack the key forwards it to the stage actors.
    2. Under ``ray job submit`` the key is a cluster-wide secret in every node's environment (as the
       KubeRay manifest does with a Secret). Passing it in the runtime env's ``env_vars`` would not do:
       Ray's runtime-env agent writes those values to its log.
    """
    import ray
    target = subset_manifest(demo_root, "podcast", str(tmp_path / "subset.parquet"), per_split=16, splits=("adapt",))
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    with BackgroundServer(ServerConfig(api_key=SECRET)) as server:
        driver = subprocess.run(label_cmd(target, source_model, str(tmp_path / "driver"), server.url,
                                          ["--lalm.api_key_env", "MIFUSE_DRIVER_ONLY_KEY"]),
                                env={**os.environ, "MIFUSE_DRIVER_ONLY_KEY": SECRET},
                                capture_output=True, text=True, timeout=600)
        assert driver.returncode == 0, driver.stderr[-3000:]
        runtime_env = json.dumps({"excludes": [".venv", ".git", "demo_data", "outputs", "*.pyc", ".hypothesis"]})
        job_cmd = label_cmd(target, source_model, str(tmp_path / "job"), server.url,
                            ["--lalm.api_key_env", "MIFUSE_CLUSTER_KEY"])
        job_cmd[:2] = [sys.executable, "jobs/label.py"]
        submitted = subprocess.run([ray_bin, "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir",
                                    ".", "--runtime-env-json", runtime_env, "--", *job_cmd],
                                   cwd=REPO, capture_output=True, text=True, timeout=600)
        assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
        assert server.stats["rejected_auth"] == 0 and server.stats["completions"] >= 2 * 16
    for run in ("driver", "job"):
        table = pd.read_parquet(os.path.join(tmp_path, run, "labels", "labels.parquet"))
        assert len(table) == 16 and table.error.isna().all()      # every request was authorised
    assert SECRET not in driver.stdout + driver.stderr and SECRET not in submitted.stdout + submitted.stderr
    session_logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    leaks = []
    for root in (str(tmp_path / "driver"), str(tmp_path / "job"), session_logs):
        for folder, _, files in os.walk(root):
            for name in files:
                with open(os.path.join(folder, name), "rb") as fh:
                    if SECRET.encode() in fh.read():
                        leaks.append(os.path.join(folder, name))
    assert not leaks, leaks
