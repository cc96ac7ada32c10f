"""Scale: labelling and one student epoch at N = 1k, 10k and 50k clips, with memory, on this machine.

    python -m benchmarks.scale [--sizes 1000 10000 50000] [--work outputs/benchmarks/scale]

Clips: the demo's call_centre adaptation clips written again with a random gain of ±1 dB each
(cycled, so N clips are N distinct files and N distinct LALM cache keys). Settings, chosen to
keep the 50k run near an hour on 2 cores: the demo's source CNN, K = 10 MC passes with
``source.mc_scope head``, 5 LALM answers per clip from the stand-in endpoint's benchmark mode
(scores from the audio's hash, no feature extraction) in a process of its own, a fresh LALM cache per size; the student
epoch is the default recipe (consistency with the EMA, online re-fusion) with one Train worker,
its audio streamed (decoded again each epoch, ``train.ingest stream``, the default) and, up to
10k clips, decoded once into the object store (``materialize``), the natural alternative.

Each (N, stage) cell runs in a fresh local Ray cluster. Memory is sampled every second: the
driver's RSS (its peak, and ``driver_rss_mb``: what it still holds once the stage has returned),
the object store's used bytes and, every 5 s (reading it costs CPU), over the whole cluster the sum
of PSS of this user's Ray processes and the driver (shared object-store pages counted once). A
labelling cell also writes where the CPU went (``labeling_cpu.csv``: CPU seconds per part of the
pipeline, per clip and as a share of cores × wall, from each process's CPU times between the first
and last sample).
The bound column is the source stage's own rate: the same model, K and scope on clips already
decoded in memory, in one process with both cores, so ``ratio_to_bound`` is the pipeline's
overhead (decoding, Arrow blocks, the LALM stage, fusion, writing).

Resumable: a cell already in scale.csv is not run again (delete the row to rerun it).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import threading
import time

import numpy as np
import pandas as pd

from benchmarks.common import commit, machine, runs_dir

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "scale", "scale.csv")
CPU_RESULTS = os.path.join(HERE, "results", "scale", "labeling_cpu.csv")
STAGES = ("labeling", "student_epoch", "student_epoch_materialized")
CPU_COLUMNS = ["n_clips", "stage", "part", "cpu_s", "cpu_ms_per_clip", "share", "wall_s", "machine", "commit"]
# where a process's CPU goes, by its Ray process title (the first pattern it contains) or, for the stand-in
# LALM, by being the driver's multiprocessing child
CPU_PARTS = (("SourceTeacherStage", "read, decode and source model (one fused actor stage)"),
             ("LALMStage", "LALM client (encode, HTTP, cache)"), ("spawn_main", "stand-in LALM endpoint"),
             ("ShardWriter", "shard writer"), ("_fuse_one", "fusion fit and map"), ("_Holder", "fusion fit and map"),
             ("ray::", "Ray's own actors and idle workers"), ("raylet", "Ray's own processes"),
             ("gcs_server", "Ray's own processes"), ("ray/", "Ray's own processes"))
COLUMNS = ["n_clips", "stage", "clips_per_s", "peak_rss_mb", "driver_peak_rss_mb", "object_store_peak_mb",
           "seconds", "bound_clips_per_s", "ratio_to_bound", "settings", "machine", "commit", "driver_rss_mb"]


class MemorySampler:
    """Peak driver RSS, cluster-wide PSS and object-store use, sampled in a background thread."""

    def __init__(self, interval_s: float = 1.0, pss_every: int = 5):
        self.interval_s, self.peaks = interval_s, {"driver": 0.0, "cluster": 0.0, "object_store": 0.0}
        # PSS costs the kernel ~7 ms a process to add up (smaps_rollup): read every second it took 0.25 s of
        # CPU a sample, an eighth of these 2 cores taken from the stage it measures; every 5th sample, 1/40
        self.pss_every, self.samples = pss_every, 0
        # pid → [what it is, CPU seconds when first seen, CPU seconds when last seen]; a Ray worker's title
        # says which stage it runs ("ray::IDLE" between tasks keeps the last one)
        self.cpu: dict[int, list] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        import psutil
        self.driver_end = psutil.Process().memory_info().rss / 2**20   # what the driver kept once the stage returned

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        import psutil
        me = psutil.Process()
        self.peaks["driver"] = max(self.peaks["driver"], me.memory_info().rss / 2**20)
        total, with_pss = 0.0, self.samples % self.pss_every == 0
        self.samples += 1
        children = {c.pid for c in me.children(recursive=True)}     # Ray's own processes, the stand-in LALM
        for proc in psutil.process_iter(["pid", "username", "cmdline", "cpu_times"]):
            try:
                if proc.info["username"] != me.username():
                    continue
                cmdline = " ".join(proc.info["cmdline"] or [])
                if proc.pid != me.pid and proc.pid not in children and "ray" not in cmdline:
                    continue
                if with_pss:
                    total += proc.memory_full_info().pss / 2**20
                self._count_cpu(proc.pid, "driver" if proc.pid == me.pid else cmdline, proc.info["cpu_times"])
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.peaks["cluster"] = max(self.peaks["cluster"], total)
        self.peaks["object_store"] = max(self.peaks["object_store"], object_store_used_mb())

    def _count_cpu(self, pid: int, what: str, times) -> None:
        seconds = times.user + times.system
        seen = self.cpu.setdefault(pid, [what, seconds, seconds])
        if what.strip() and not what.startswith("ray::IDLE"):
            seen[0] = what
        seen[2] = seconds

    def cpu_by_part(self) -> dict[str, float]:
        """CPU seconds spent while sampling, per part of the pipeline (``CPU_PARTS``). A process born
        between two samples loses at most its first interval."""
        parts: dict[str, float] = {}
        for what, first, last in self.cpu.values():
            part = "driver" if what == "driver" else next((name for pattern, name in CPU_PARTS if pattern in what),
                                                          "other")
            parts[part] = parts.get(part, 0.0) + last - first
        return dict(sorted(parts.items(), key=lambda kv: -kv[1]))


def cpu_rows(n: int, stage: str, parts: dict[str, float], wall_s: float) -> list[dict]:
    """``labeling_cpu.csv`` rows: each part's CPU seconds, per clip, and its share of the machine's CPU
    seconds over the stage (cores × wall), the idle rest as its own row."""
    cores = os.cpu_count() or 1
    rows = [{"part": part, "cpu_s": seconds} for part, seconds in parts.items()]
    rows.append({"part": "idle", "cpu_s": max(cores * wall_s - sum(parts.values()), 0.0)})
    return [dict(r, n_clips=n, stage=stage, cpu_s=round(r["cpu_s"], 1), cpu_ms_per_clip=round(1000 * r["cpu_s"] / n, 3),
                 share=round(r["cpu_s"] / (cores * wall_s), 3), wall_s=round(wall_s, 1), machine=machine(),
                 commit=commit()) for r in rows]


def object_store_used_mb() -> float:
    import ray
    try:
        total = ray.cluster_resources().get("object_store_memory", 0.0)
        free = ray.available_resources().get("object_store_memory", total)
        return (total - free) / 2**20
    except Exception:       # the cluster is starting or stopping
        return 0.0


def make_clips(work: str, n: int) -> pd.DataFrame:
    """n distinct WAV files from the demo's call_centre adaptation clips (gain ±1 dB), with a manifest."""
    import soundfile as sf

    from mifuse_ray.audio import list_inputs
    from mifuse_ray.config import MiFuseConfig
    from mifuse_ray.inputs import demo_paths
    manifest = os.path.join(work, f"manifest_{n}.parquet")
    if os.path.exists(manifest):
        return pd.read_parquet(manifest)
    target, _ = demo_paths(MiFuseConfig())
    base = list_inputs(target, split="adapt")
    rng = np.random.default_rng(0)
    rows, waves = [], {}
    for i in range(n):
        src = base.iloc[i % len(base)]
        if src["clip_id"] not in waves:
            waves[src["clip_id"]] = sf.read(src["path"], dtype="float32")
        wav, sr = waves[src["clip_id"]]
        path = os.path.join(work, "clips", f"{i // 1000:03d}", f"{i:06d}.wav")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            sf.write(path, np.clip(wav * 10 ** (rng.uniform(-1, 1) / 20), -1, 1), sr, subtype="PCM_16")
        else:
            rng.uniform()
        rows.append({"clip_id": f"{i:06d}", "path": path, "label": src["label"], "split": "adapt",
                     "domain": "call_centre", "speaker_id": src["speaker_id"]})
    df = pd.DataFrame(rows)
    df.to_parquet(manifest, row_group_size=1024)        # row groups = label shards: each read task reads its own
    return df


def manifest_path(df: pd.DataFrame) -> str:
    """The Parquet manifest ``make_clips`` wrote for this frame (labelling reads it, not the frame)."""
    return os.path.join(os.path.dirname(df["path"].iloc[0]), "..", "..", f"manifest_{len(df)}.parquet")


def bench_config():
    from mifuse_ray.config import MiFuseConfig
    cfg = MiFuseConfig()
    cfg.source.mc_scope = "head"
    cfg.train.epochs = 1
    return cfg


def source_bound(checkpoint: str, df: pd.DataFrame, cfg, clips: int = 512, repeats: int = 3) -> float:
    """The source stage's clips/s on clips already decoded in memory (same model, K, scope, batch): the
    median of ``repeats`` passes, so that one pass slowed by another process does not set the bound."""
    import torch

    from mifuse_ray.data import decode_locally
    from mifuse_ray.source_teacher import SourceTeacherStage
    torch.set_num_threads(os.cpu_count() or 1)
    decoded = decode_locally(df.head(clips), cfg.audio)
    stage = SourceTeacherStage(checkpoint, passes_per_clip=cfg.source.passes_per_clip, scope=cfg.source.mc_scope,
                               seed=cfg.source.seed, amp=cfg.source.amp, labels=cfg.labels)
    bs = cfg.source.batch_size
    ids, audio = list(decoded["clip_id"]), list(decoded["audio"])
    stage.predict(ids[:bs], audio[:bs])                                  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(ids), bs):
            stage.predict(ids[i:i + bs], audio[i:i + bs])
        rates.append(len(ids) / (time.perf_counter() - start))
    return float(np.median(rates))


def run_labeling(cfg, df: pd.DataFrame, checkpoint: str, out: str) -> float:
    from mifuse_ray.demo.lalm_server import ServerConfig, ServerProcess
    from mifuse_ray.labeling import label_target
    shutil.rmtree(out, ignore_errors=True)
    cfg = dataclasses.replace(cfg, lalm=dataclasses.replace(cfg.lalm, cache_dir=os.path.join(out, "lalm_cache")))
    # the stand-in in its own process, as a real endpoint is: its state is not the driver's (counted in the all-process peak)
    with ServerProcess(ServerConfig(labels=tuple(cfg.labels), benchmark=True)) as server:
        start = time.time()
        result = label_target(cfg, manifest_path(df), out, checkpoint, server.url, split="adapt")   # streamed
        seconds = time.time() - start
    if not result.summary["clips"] == result.summary["labelled"] == len(df):
        raise SystemExit(f"{len(df)} clips, {result.summary['labelled']} labelled: {result.summary.get('failures')}")
    return seconds


def run_student_epoch(cfg, out: str, checkpoint: str) -> tuple[float, float]:
    """(epoch seconds inside the Train worker, wall seconds of the whole call)."""
    from mifuse_ray.train.student import train_student
    from mifuse_ray.label_shards import LabelShards
    table = LabelShards(os.path.join(out, "labels.parquet"))      # the shards, read by the cluster
    shutil.rmtree(os.path.join(out, "models"), ignore_errors=True)
    shutil.rmtree(os.path.join(out, "_ray_train"), ignore_errors=True)
    start = time.time()
    res = train_student(cfg, table, None, checkpoint, out, run_name="scale")
    return res.history[0]["epoch_seconds"], time.time() - start


def run_cell(n: int, stage: str, work: str, bound: float | None, cpu_results: str = CPU_RESULTS) -> dict:
    import ray

    from mifuse_ray.inputs import demo_paths
    from mifuse_ray.ray_utils import init_ray
    cfg = bench_config()
    df = make_clips(work, n)
    _, checkpoint = demo_paths(cfg)
    out = os.path.join(work, f"run_{n}")
    init_ray("", verbose=False)
    try:
        with MemorySampler() as mem:
            if stage == "labeling":
                seconds = wall = run_labeling(cfg, df, checkpoint, out)
            else:
                ingest = "materialize" if stage == "student_epoch_materialized" else "stream"   # not auto
                cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ingest=ingest))
                seconds, wall = run_student_epoch(cfg, out, checkpoint)
    finally:
        ray.shutdown()
    if stage == "labeling":
        from benchmarks.common import merge_record
        merge_record(cpu_results, cpu_rows(n, stage, mem.cpu_by_part(), wall), CPU_COLUMNS, ["n_clips", "stage", "part"])
    rate = n / seconds
    settings = (f"K={cfg.source.passes_per_clip} scope={cfg.source.mc_scope} N={cfg.lalm.answers_per_clip} "
                "stand-in benchmark mode, in its own process"
                if stage == "labeling" else f"batch={cfg.train.batch_size} workers={cfg.train.num_workers} "
                f"mode={cfg.train.mode} ingest={cfg.train.ingest}, wall {wall:.0f} s incl. Train start-up")
    return {"n_clips": n, "stage": stage, "clips_per_s": round(rate, 2), "peak_rss_mb": round(mem.peaks["cluster"]),
            "driver_peak_rss_mb": round(mem.peaks["driver"]), "object_store_peak_mb": round(mem.peaks["object_store"]),
            "seconds": round(seconds, 1), "bound_clips_per_s": round(bound, 2) if bound else None,
            "ratio_to_bound": round(rate / bound, 3) if bound else None, "settings": settings,
            "machine": machine(), "commit": commit(), "driver_rss_mb": round(mem.driver_end)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--materialize-up-to", type=int, default=10000,
                   help="largest N for the decode-once comparison (it holds all audio in the object store)")
    p.add_argument("--work", default=runs_dir("scale"), help="clips, labels and caches (GBs at 50k)")
    p.add_argument("--results", default=RESULTS)
    args = p.parse_args()
    args.work = os.path.abspath(args.work)       # the manifest's paths are absolute: it is read from any folder
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    done = pd.read_csv(args.results) if os.path.exists(args.results) else pd.DataFrame(columns=COLUMNS)
    bound = None
    for n in sorted(args.sizes):
        for stage in args.stages:
            if ((done["n_clips"] == n) & (done["stage"] == stage)).any():
                continue
            if stage == "student_epoch_materialized" and n > args.materialize_up_to:
                continue
            if stage == "labeling" and bound is None:
                from mifuse_ray.inputs import demo_paths
                cfg = bench_config()
                bound = source_bound(demo_paths(cfg)[1], make_clips(args.work, n), cfg)
            row = run_cell(n, stage, args.work, bound if stage == "labeling" else None,
                           os.path.join(os.path.dirname(args.results), os.path.basename(CPU_RESULTS)))
            done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
            done.to_csv(args.results, index=False)          # partial results survive an interruption
            print(f"{n:>6} {stage:<14} {row['clips_per_s']:>8.1f} clips/s  cluster peak {row['peak_rss_mb']} MB  "
                  f"driver {row['driver_peak_rss_mb']} MB  store {row['object_store_peak_mb']} MB  "
                  f"{row['seconds']} s", flush=True)
    print(done[COLUMNS[:8]].to_string(index=False))


if __name__ == "__main__":
    main()
