"""The adaptation pipeline: label every split with both teachers, fuse, train, evaluate, report.

``adapt(cfg)`` is the whole product. It starts the offline LALM stand-in when no real endpoint is
named. A rerun with the same output reuses finished work: labels, cached LALM answers, checkpoints.
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

from .config import MiFuseConfig, to_dict
from .console import quiet_ray, stage
from .inputs import Inputs, check_output_writable, prepare

log = logging.getLogger("mifuse_ray")


@contextlib.contextmanager
def lalm_endpoint(cfg: MiFuseConfig):
    """The configured endpoint, or the offline stand-in on a free loopback port for the run's duration."""
    if cfg.lalm.base_url or cfg.lalm.preset != "offline":
        yield cfg.lalm.base_url
        return
    from .demo.lalm_server import BackgroundServer, ServerConfig
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


def labeling_fingerprint(cfg: MiFuseConfig, df: pd.DataFrame, checkpoint: str, base_url: str) -> str:
    """What makes stored labels reusable: the clips, the source checkpoint's bytes, and every
    result field of the LALM, source and audio settings (``config.result_fields``); not the fusion,
    which every run applies afresh to the stored draws."""
    from .config import result_fields
    from .runrecord import file_sha256
    ckpt_files = sorted(os.listdir(checkpoint)) if os.path.isdir(checkpoint) else []
    ckpt_hash = [file_sha256(os.path.join(checkpoint, f)) for f in ckpt_files]
    source = {k: v for k, v in result_fields(cfg.source).items() if k != "checkpoint"}   # hashed by content
    payload = {"clips": sorted(df["clip_id"]), "paths": sorted(df["path"]), "ckpt": ckpt_hash,
               "lalm": result_fields(cfg.lalm), "source": source, "audio": result_fields(cfg.audio),
               "endpoint": "offline" if cfg.lalm.preset == "offline" and not cfg.lalm.base_url else base_url,
               "labels": cfg.labels}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def label_or_reuse(cfg: MiFuseConfig, df: pd.DataFrame, out_dir: str, checkpoint: str, base_url: str,
                   name: str = "labels", limiter: tuple[str, int] | None = None):
    """Label ``df`` (reusing ``<out_dir>/<name>.parquet`` when nothing that changes it has changed)."""
    from .labeling import LabelingResult, label_target, summarize
    fingerprint = labeling_fingerprint(cfg, df, checkpoint, base_url)
    stage_dir = os.path.join(out_dir, name)
    path = os.path.join(stage_dir, "labels.parquet")
    meta_path = os.path.join(stage_dir, "fingerprint.txt")
    if os.path.exists(path) and os.path.exists(meta_path) and open(meta_path).read() == fingerprint:
        table = pd.read_parquet(path)       # draws reused; label_splits fuses them with this run's fusion
        summary = summarize(table, cfg.labels)
        summary["reused"] = True
        return LabelingResult(path, table, summary)
    if cfg.lalm.cache_dir == "":
        cfg = dataclasses.replace(cfg, lalm=dataclasses.replace(cfg.lalm, cache_dir=os.path.join(out_dir, "lalm_cache")))
    result = label_target(cfg, df, stage_dir, checkpoint, base_url, limiter)
    with open(meta_path, "w") as fh:
        fh.write(fingerprint)
    return result


LABEL_STAGES = {"adapt": "labels", "dev": "labels_dev", "test": "labels_test"}


def label_splits(cfg: MiFuseConfig, inputs: Inputs, out: str, base_url: str):
    """Both teachers on every split that exists, then one fusion for all of them.

    The adaptation split is what the student learns from; the labelled dev split calibrates and
    chooses the fusion (``calibration.choose_fusion``); the test split scores the LALM and the fused
    label beside the students. Each split's draws are reused when nothing that changes them has; the
    chosen fusion (fitted on the adaptation split) is written into every split's labels.parquet.
    Returns ({split: LabelingResult}, FusionChoice)."""
    from .calibration import choose_fusion
    from .labeling import fused_again, request_limiter, summarize, write_parquet
    with request_limiter(cfg, inputs.labelled_clips()) as limiter:     # one cap for every split of the run
        results = {split: label_or_reuse(cfg, df, out, inputs.source_checkpoint, base_url, LABEL_STAGES[split],
                                         limiter)
                   for split, df in inputs.splits().items()}
    dev = results.get("dev")
    choice = choose_fusion(results["adapt"].table, dev.table if dev else None, cfg.fusion, cfg.labels)
    for split, res in results.items():
        fit = choice.fit if split == "adapt" else choice.fit_for(res.table, cfg.labels)
        res.table = fused_again(res.table, len(cfg.labels), choice.config, fit)
        write_parquet(res.table, res.labels_path)
        res.summary.update(summarize(res.table, cfg.labels))
    results["adapt"].summary["fusion"] = choice.summary()
    return results, choice


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

    check_output_writable(cfg.output)
    out = os.path.abspath(cfg.output)
    log_path = quiet_ray(os.path.join(out, "logs"), cfg.verbose)
    if log_path:
        print(f"Ray's own logs: {log_path} (--verbose shows them here)")
    times: dict[str, float] = {}
    t0 = time.time()
    with stage("inputs (the demo's data and source model are made on the first run)", 5, 1):
        inputs = prepare(cfg, verbose=cfg.verbose)
    times["prepare_inputs"] = time.time() - t0
    spend = estimate_spend(cfg, inputs.labelled_clips())
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
        with stage(f"labelling {len(inputs.labelled_clips())} clips with both teachers, then fusion", 5, 2):
            split_labels, choice = label_splits(cfg, inputs, out, base_url)
        times["label"] = time.time() - t
    adapt_labels, test_labels = split_labels["adapt"], split_labels.get("test")
    dev_labels = split_labels["dev"].table if "dev" in split_labels else None
    student_dev = None
    if inputs.dev_df is not None:       # the half of the dev split that did not choose the fusion
        from .calibration import dev_halves
        student_dev = inputs.dev_df[dev_halves(inputs.dev_df)[1]].reset_index(drop=True)
    runs = {"mifuse": cfg.train.mode}
    if cfg.baselines:
        runs.update({m: m for m in cfg.baseline_modes})
    students = {}
    for name, mode in runs.items():
        t = time.time()
        run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mode=mode))
        with stage(f"training the {name} student ({cfg.train.epochs} epochs)", 5, 3):
            students[name] = train_student(run_cfg, adapt_labels.table, student_dev, inputs.source_checkpoint, out,
                                           run_name=name, choice=choice, dev_labels=dev_labels)
        times[f"train_{name}"] = time.time() - t
    t = time.time()
    with stage("evaluating every model and teacher on the test split", 5, 4):
        results = evaluate_run(cfg, inputs, students, test_labels)
    times["evaluate"] = time.time() - t
    results["labeling"] = adapt_labels.summary
    results["labeling_test"] = test_labels.summary if test_labels else None
    results["estimated_spend"] = spend
    times["total"] = time.time() - t0
    with stage("writing the report", 5, 5):
        report = write_report(cfg, out, results, times, adapt_labels.table, students)
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump({"results": results, "stage_seconds": times, "config": to_dict(cfg)}, fh, indent=2, default=str)
    return AdaptResult(out, report, results, times)
