"""The Python API beside the jobs: ``adapt(config)``, ``label(...)``, ``predict(...)``.

``adapt`` is the whole product: resolve inputs (the demo when none are given), start the
offline LALM endpoint when no real one is named, label the target with both teachers, train
the MI-Fuse student, evaluate everything on the labelled test split and write ``report.md``.
A rerun with the same output reuses finished work: labels, cached LALM answers, checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time

import pandas as pd

from .audio import list_inputs
from .config import ConfigError, MiFuseConfig, to_dict
from .ray_utils import init_ray

log = logging.getLogger("mifuse_ray")


@dataclasses.dataclass
class Inputs:
    target: str
    source_checkpoint: str
    adapt_df: pd.DataFrame
    dev_df: pd.DataFrame | None
    test_df: pd.DataFrame | None


def demo_paths(cfg: MiFuseConfig) -> tuple[str, str]:
    """Create the demo domains and source model if missing; return (target manifest, source checkpoint)."""
    from .demo.domains import DOMAINS, ensure_domain
    from .train.source import train_source
    root = os.path.abspath(cfg.demo.root)
    for name in (cfg.demo.source_domain, cfg.demo.target_domain):
        if name not in DOMAINS:
            raise ConfigError(f"demo domain {name!r} unknown; choose from {sorted(DOMAINS)}")
    source_manifest = ensure_domain(cfg.demo.source_domain, root, cfg.demo.scale)
    target_manifest = ensure_domain(cfg.demo.target_domain, root, cfg.demo.scale)
    model_root = os.path.join(root, "source_models", f"{cfg.demo.source_domain}_x{cfg.demo.scale:g}")
    if not os.path.exists(os.path.join(model_root, "model", "mifuse_model.json")):
        log.info("training the demo source model on %s", cfg.demo.source_domain)
        train_source(cfg, source_manifest, model_root)
    return target_manifest, os.path.join(model_root, "model")


def resolve_inputs(cfg: MiFuseConfig) -> Inputs:
    from .labels import check_same_labels
    from .models.base import read_meta
    from .train.source import labelled_split
    if cfg.target:
        target, checkpoint = cfg.target, cfg.source.checkpoint
        if not checkpoint:
            raise ConfigError("source.checkpoint is required with a user target (the demo trains its own)")
    else:
        target, checkpoint = demo_paths(cfg)
        checkpoint = cfg.source.checkpoint or checkpoint
    try:
        meta = read_meta(checkpoint)
    except FileNotFoundError as exc:
        raise ConfigError(f"{exc}; set source.checkpoint to a model directory written by train_source.py "
                          "or a transformers audio-classification directory") from None
    if "labels" in meta:
        check_same_labels(meta["labels"], cfg.labels)
    try:
        adapt_df = list_inputs(target, split=cfg.adapt_split if target.endswith(".parquet") else None)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    if adapt_df.empty:
        raise ConfigError(f"no clips in {target} (split {cfg.adapt_split!r})")
    dev_df = test_df = None
    if target.endswith(".parquet"):
        full = pd.read_parquet(target, columns=None)
        if "split" in full.columns and "label" in full.columns:
            if (full["split"] == cfg.dev_split).any():
                dev_df = labelled_split(target, cfg.dev_split, cfg.labels)
            if (full["split"] == cfg.test_split).any():
                test_df = labelled_split(target, cfg.test_split, cfg.labels)
    return Inputs(target, checkpoint, adapt_df, dev_df, test_df)


@contextlib.contextmanager
def lalm_endpoint(cfg: MiFuseConfig):
    """The configured endpoint, or the offline stand-in on a free loopback port for the run's duration."""
    if cfg.lalm.base_url or cfg.lalm.preset != "offline":
        yield cfg.lalm.base_url
        return
    from .lalm.server import BackgroundServer, ServerConfig
    server = BackgroundServer(ServerConfig(labels=tuple(cfg.labels))).start()
    log.info("offline LALM stand-in listening on %s", server.url)
    try:
        yield server.url
    finally:
        server.stop()


def check_lalm(cfg: MiFuseConfig, base_url: str) -> None:
    """Config, key and reachability checks: one clear error before any audio is sent."""
    import asyncio
    from .lalm.client import preflight, resolve
    resolved = resolve(cfg.lalm, cfg.labels, base_url)
    asyncio.run(preflight(resolved, timeout_s=min(cfg.lalm.timeout_s, 15.0)))


def check_output_writable(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"output {path} is not writable ({exc.strerror}); choose another `output`") from None


def labeling_fingerprint(cfg: MiFuseConfig, df: pd.DataFrame, checkpoint: str, base_url: str) -> str:
    """What makes stored labels reusable: inputs, teachers and their settings (not the fusion)."""
    from .runrecord import file_sha256
    ckpt_files = sorted(os.listdir(checkpoint)) if os.path.isdir(checkpoint) else []
    ckpt_hash = [file_sha256(os.path.join(checkpoint, f)) for f in ckpt_files]
    lalm = {k: v for k, v in dataclasses.asdict(cfg.lalm).items()
            if k not in ("concurrency", "num_actors", "actor_cpus", "batch_size", "batches_in_flight", "dry_run",
                         "cache_dir")}
    payload = {"clips": sorted(df["clip_id"]), "paths": sorted(df["path"]), "ckpt": ckpt_hash, "lalm": lalm,
               "endpoint": "offline" if cfg.lalm.preset == "offline" and not cfg.lalm.base_url else base_url,
               "source": {k: v for k, v in dataclasses.asdict(cfg.source).items()
                          if k in ("mc_passes", "mc_scope", "dropout_override", "seed")},
               "audio": dataclasses.asdict(cfg.audio), "labels": cfg.labels}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def label(cfg: MiFuseConfig, df: pd.DataFrame, out_dir: str, checkpoint: str, base_url: str, name: str = "labels"):
    """Label ``df`` (reusing ``<out_dir>/<name>.parquet`` when nothing that changes it has changed)."""
    from .labeling import LabelingResult, label_target, refuse_stored, summarize, write_parquet
    fingerprint = labeling_fingerprint(cfg, df, checkpoint, base_url)
    stage_dir = os.path.join(out_dir, name)
    path = os.path.join(stage_dir, "labels.parquet")
    meta_path = os.path.join(stage_dir, "fingerprint.txt")
    if os.path.exists(path) and os.path.exists(meta_path) and open(meta_path).read() == fingerprint:
        table = refuse_stored(pd.read_parquet(path), len(cfg.labels), cfg.fusion)
        write_parquet(table, path)          # atomic: a hard-linked copy elsewhere keeps its own fusion
        summary = summarize(table, cfg.labels)
        summary["reused"] = True
        return LabelingResult(path, table, summary)
    if cfg.lalm.cache_dir == "":
        cfg = dataclasses.replace(cfg, lalm=dataclasses.replace(cfg.lalm, cache_dir=os.path.join(out_dir, "lalm_cache")))
    result = label_target(cfg, df, stage_dir, checkpoint, base_url)
    with open(meta_path, "w") as fh:
        fh.write(fingerprint)
    return result


def predict(cfg: MiFuseConfig, target: str, model_dir: str, split: str | None = None) -> pd.DataFrame:
    from .predict import predict_files
    init_ray(cfg.ray_address)
    return predict_files(target, model_dir, cfg, split)


@dataclasses.dataclass
class AdaptResult:
    output: str
    report_path: str
    results: dict
    stage_seconds: dict


def adapt(cfg: MiFuseConfig) -> AdaptResult:
    """Label → train → evaluate → report."""
    from .evaluation import evaluate_run
    from .labeling import estimate_spend
    from .report import write_report
    from .runrecord import file_sha256, write_run_record
    from .train.student import train_student

    out = os.path.abspath(cfg.output)
    check_output_writable(out)
    times: dict[str, float] = {}
    t0 = time.time()
    init_ray(cfg.ray_address)
    inputs = resolve_inputs(cfg)
    times["prepare_inputs"] = time.time() - t0
    spend = estimate_spend(cfg, inputs.adapt_df)
    if cfg.lalm.dry_run:
        print(json.dumps({"dry_run": spend}, indent=2))
        return AdaptResult(out, "", {"dry_run": spend}, times)
    with lalm_endpoint(cfg) as base_url:
        check_lalm(cfg, base_url)
        write_run_record(cfg, out, {"target": inputs.target, "source_checkpoint": inputs.source_checkpoint,
                                    "manifest_sha256": file_sha256(inputs.target),
                                    "lalm_endpoint": base_url, "audio_sent_to": base_url,
                                    "estimated_spend": spend})
        t = time.time()
        adapt_labels = label(cfg, inputs.adapt_df, out, inputs.source_checkpoint, base_url, "labels")
        times["label_adapt"] = time.time() - t
        test_labels = None
        if inputs.test_df is not None:
            t = time.time()
            test_labels = label(cfg, inputs.test_df, out, inputs.source_checkpoint, base_url, "labels_test")
            times["label_test"] = time.time() - t
    if inputs.dev_df is None:
        raise ConfigError("a labelled dev split is needed to select the student (set dev_split); "
                          "see README 'No dev split'")
    runs = {"mifuse": cfg.train.mode}
    if cfg.baselines:
        runs.update({m: m for m in ("lalm_only", "source_only", "shot_im", "equal_weights", "no_ema")})
    students = {}
    for name, mode in runs.items():
        t = time.time()
        run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mode=mode))
        students[name] = train_student(run_cfg, adapt_labels.table, inputs.dev_df, inputs.source_checkpoint, out,
                                       run_name=name)
        times[f"train_{name}"] = time.time() - t
    t = time.time()
    results = evaluate_run(cfg, inputs, students, test_labels)
    times["evaluate"] = time.time() - t
    results["labeling"] = adapt_labels.summary
    results["labeling_test"] = test_labels.summary if test_labels else None
    results["estimated_spend"] = spend
    times["total"] = time.time() - t0
    report = write_report(cfg, out, results, times, adapt_labels.table)
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump({"results": results, "stage_seconds": times, "config": to_dict(cfg)}, fh, indent=2, default=str)
    return AdaptResult(out, report, results, times)
