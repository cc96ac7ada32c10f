"""The adaptation pipeline, the one path every job, Tune trial and benchmark goes through:

    prepare(cfg) → label_run (both teachers on every split) → choose_split_fusion (on dev)
                 → train_students → evaluate_run → write_report

``adapt(cfg)`` is all of it. ``jobs/tune.py`` runs the first two once and each trial the last
part (``tune.run_tune``), so a trial trains exactly what ``adapt`` trains at its settings. The
offline LALM stand-in starts when no real endpoint is named. A rerun into the same output reuses
finished work: labels, cached LALM answers, students (``reuse.py``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time

import pandas as pd

from . import reuse
from .config import MiFuseConfig, to_dict
from .console import divert_native_logs, quiet_ray, stage
from .inputs import Inputs, check_output_writable, prepare
from .label_shards import ManifestSplit

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
    from .lalm.client import preflight, resolve_endpoint
    resolved = resolve_endpoint(cfg.lalm, cfg.labels, base_url)
    asyncio.run(preflight(resolved, timeout_s=min(cfg.lalm.timeout_s, 15.0)))


def labeling_fingerprint(cfg: MiFuseConfig, df, checkpoint: str, base_url: str) -> str:
    """What makes stored labels reusable: the clips, the source checkpoint's bytes, and every
    result field of the LALM, source and audio settings (``config.result_fields``); not the fusion,
    which every run applies afresh to the stored draws."""
    from .config import result_fields
    from .runrecord import file_sha256
    ckpt_files = sorted(os.listdir(checkpoint)) if os.path.isdir(checkpoint) else []
    ckpt_hash = [file_sha256(os.path.join(checkpoint, f)) for f in ckpt_files]
    source = {k: v for k, v in result_fields(cfg.source).items() if k != "checkpoint"}   # hashed by content
    # the clips: a streamed manifest split by its digest (its ids and paths, summed over its rows), a frame by its rows
    clips = {"manifest_split": df.digest} if isinstance(df, ManifestSplit) else \
        {"clips": sorted(df["clip_id"]), "paths": sorted(df["path"])}
    payload = {**clips, "ckpt": ckpt_hash,
               "lalm": result_fields(cfg.lalm), "source": source, "audio": result_fields(cfg.audio),
               "endpoint": "offline" if cfg.lalm.preset == "offline" and not cfg.lalm.base_url else base_url,
               "labels": cfg.labels}
    return reuse.digest(payload)


def label_or_reuse(cfg: MiFuseConfig, df, out_dir: str, checkpoint: str, base_url: str,
                   name: str = "labels", limiter: tuple[str, int] | None = None):
    """The teachers' draws for ``df`` (a frame, or a ``ManifestSplit`` the cluster reads) in ``<out_dir>/<name>/draws``: reused when nothing that changes
    them has changed, resumed shard by shard after an interrupted run at the same settings, labelled
    afresh otherwise. Not fused: ``label_splits`` fuses every split with the run's own fusion."""
    from .labeling import LabelingResult, label_target
    fingerprint = labeling_fingerprint(cfg, df, checkpoint, base_url)
    stage_dir = os.path.join(out_dir, name)
    labels_path = os.path.join(stage_dir, "labels.parquet")
    stored = reuse.stamped(stage_dir, fingerprint)
    if stored is not None and stored.get("complete", True):
        return LabelingResult(labels_path, {"reused": True}, os.path.join(stage_dir, "draws"))
    if stored is None:                      # other settings (or none yet): nothing in the folder is ours
        for old in ("draws", "labels.parquet", "manifest.parquet"):
            reuse.remove_tree(os.path.join(stage_dir, old))
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.remove(os.path.join(stage_dir, old))
    reuse.stamp(stage_dir, fingerprint, complete=False)     # a crash from here on resumes these shards
    if cfg.lalm.cache_dir == "":
        cfg = dataclasses.replace(cfg, lalm=dataclasses.replace(cfg.lalm, cache_dir=os.path.join(out_dir, "lalm_cache")))
    target, split = (df.path, df.split) if isinstance(df, ManifestSplit) else (df, None)
    result = label_target(cfg, target, stage_dir, checkpoint, base_url, limiter, split=split, fuse=False)
    reuse.stamp(stage_dir, fingerprint, complete=True)
    return result


LABEL_STAGES = {"adapt": "labels", "dev": "labels_dev", "test": "labels_test"}


def label_splits(cfg: MiFuseConfig, inputs: Inputs, out: str, base_url: str):
    """Both teachers on every split that exists, then one fusion for all of them.

    The adaptation split is what the student learns from; the labelled dev split calibrates and
    chooses the fusion (``choose_split_fusion``); the test split scores the LALM and the fused
    label beside the students. Each split's draws are reused when nothing that changes them has; the
    chosen fusion (fitted on the adaptation split) fuses every split's draws into its labels shards.
    Returns ({split: LabelingResult}, FusionChoice)."""
    from .fused_shards import fuse_split
    from .labeling import request_limiter
    with request_limiter(cfg, inputs.clip_totals()) as limiter:     # one cap for every split of the run
        results = {split: label_or_reuse(cfg, df, out, inputs.source_checkpoint, base_url, LABEL_STAGES[split],
                                         limiter)
                   for split, df in inputs.splits().items()}
    draws = {split: res.draws if split == "adapt" else res.draws.to_pandas() for split, res in results.items()}
    choice = choose_split_fusion(cfg, draws)
    for split, res in results.items():
        fit = choice.fit if split == "adapt" else choice.fit_for(draws[split], cfg.labels)
        res.summary.update(fuse_split(res.draws, res.shards, cfg.labels, choice.config, fit))
    results["adapt"].summary["fusion"] = choice.summary()
    return results, choice


def choose_split_fusion(cfg: MiFuseConfig, tables: dict[str, pd.DataFrame]):
    """The fusion of ``cfg.fusion``, its dev-fitted parts fitted on the first half of the dev split's
    labels (when there is one) and its global part on the adaptation split: what every student of
    the run learns from, in ``adapt`` and in every Tune trial alike."""
    from .calibration import choose_fusion
    return choose_fusion(tables["adapt"], tables.get("dev"), cfg.fusion, cfg.labels)


def label_run(cfg: MiFuseConfig, inputs: Inputs, out: str, spend: dict | None = None):
    """The paid part of a run: the endpoint (or the offline stand-in), its checks before the first
    request, the run record, then ``label_splits``. Returns what ``label_splits`` returns."""
    from .runrecord import file_sha256, write_run_record
    with lalm_endpoint(cfg) as base_url:
        check_lalm(cfg, base_url)
        write_run_record(cfg, out, {"target": inputs.target, "source_checkpoint": inputs.source_checkpoint,
                                    "manifest_sha256": file_sha256(inputs.target),
                                    "lalm_endpoint": base_url, "audio_sent_to": base_url,
                                    "estimated_spend": spend})
        return label_splits(cfg, inputs, out, base_url)


REPORT_PLOT_CLIPS = 20000      # the report's fusion plots draw the first shards of the adaptation split, up to this


def split_tables(split_labels: dict) -> dict:
    """What the students read of each split: the adaptation split as shards (streamed by the
    cluster, never collected here), the labelled dev and test splits as frames (small)."""
    return {split: res.shards if split == "adapt" else res.table for split, res in split_labels.items()}


def student_dev_half(dev_df: pd.DataFrame | None) -> pd.DataFrame | None:
    """The half of the dev split a student run sees (its curve, the re-fusion gate, ``smoothed_dev``):
    the other half chose the fusion (``calibration.dev_halves``), so no clip chooses both."""
    if dev_df is None:
        return None
    from .calibration import dev_halves
    return dev_df[dev_halves(dev_df)[1]].reset_index(drop=True)


def student_runs(cfg: MiFuseConfig) -> dict[str, str]:
    """{run name: train mode}: the shipped recipe (named ``mifuse`` whatever its mode) and, with
    ``baselines``, every mode of ``baseline_modes``."""
    runs = {"mifuse": cfg.train.mode}
    if cfg.baselines:
        runs.update({m: m for m in cfg.baseline_modes})
    return runs


def train_students(cfg: MiFuseConfig, tables: dict[str, pd.DataFrame], choice, dev_df: pd.DataFrame | None,
                   source_checkpoint: str, out: str, runs: dict[str, str], report_to_tune: bool = False,
                   progress: bool = True) -> dict:
    """Each run of ``runs`` ({name: train mode}) on the adaptation split's labels, monitored on the
    student's dev half. Returns {name: StudentResult}."""
    from .train.student import train_student
    students, student_dev = {}, student_dev_half(dev_df)
    for index, (name, mode) in enumerate(runs.items()):
        run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mode=mode))
        with stage(f"training the {name} student ({cfg.train.epochs} epochs)", 5, 3) if progress \
                else contextlib.nullcontext():
            students[name] = train_student(run_cfg, tables["adapt"], student_dev, source_checkpoint, out,
                                           run_name=name, choice=choice, dev_labels=tables.get("dev"),
                                           report_to_tune=report_to_tune)
    return students


@dataclasses.dataclass
class AdaptResult:
    output: str
    report_path: str
    results: dict
    stage_seconds: dict


def adapt(cfg: MiFuseConfig) -> AdaptResult:
    """Label → train → evaluate → report."""
    from .choice_record import choice_record
    from .evaluation import evaluate_run
    from .labeling import estimate_spend
    from .report import write_report

    check_output_writable(cfg.output)
    out = os.path.abspath(cfg.output)
    log_path = quiet_ray(os.path.join(out, "logs"), cfg.verbose)
    if log_path:
        divert_native_logs(log_path)
        print(f"Ray's own logs: {log_path} (--verbose shows them here)")
    times: dict[str, float] = {}
    t0 = time.time()
    with stage("inputs (the demo's data and source model are made on the first run)", 5, 1):
        inputs = prepare(cfg, verbose=cfg.verbose)
    times["prepare_inputs"] = time.time() - t0
    spend = estimate_spend(cfg, inputs.clip_totals())
    if cfg.lalm.dry_run:
        print(json.dumps({"dry_run": spend}, indent=2))
        return AdaptResult(out, "", {"dry_run": spend}, times)
    t = time.time()
    with stage(f"labelling {inputs.clip_totals()[0]} clips with both teachers, then fusion", 5, 2):
        split_labels, choice = label_run(cfg, inputs, out, spend)
    times["label"] = time.time() - t
    tables = split_tables(split_labels)
    t = time.time()
    students = train_students(cfg, tables, choice, inputs.dev_df, inputs.source_checkpoint, out, student_runs(cfg))
    times.update({f"train_{name}": s.seconds for name, s in students.items()})
    times["train"] = time.time() - t
    t = time.time()
    test_labels = split_labels.get("test")
    with stage("evaluating every model and teacher on the test split", 5, 4):
        results = evaluate_run(cfg, inputs, students, test_labels)
    times["evaluate"] = time.time() - t
    results["labeling"] = split_labels["adapt"].summary
    results["labeling_test"] = test_labels.summary if test_labels else None
    results["estimated_spend"] = spend
    results["choices"] = choice_record(cfg, choice, students)
    times["total"] = time.time() - t0
    with stage("writing the report", 5, 5):
        report = write_report(cfg, out, results, times, split_labels["adapt"].shards.head(REPORT_PLOT_CLIPS), students)
    with open(os.path.join(out, "choices.json"), "w") as fh:
        json.dump(results["choices"], fh, indent=2, default=str)
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump({"results": results, "stage_seconds": times, "config": to_dict(cfg)}, fh, indent=2, default=str)
    return AdaptResult(out, report, results, times)
