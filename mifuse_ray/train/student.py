"""A student run, from the driver: the mode's labels as rows, the datasets, the ``TorchTrainer``, the
final model, and reuse of a finished run with the same settings.

What every worker executes is ``train/loop.py``; what a mode learns from is ``train/labels.py``;
what a baseline changes is its row in ``train/modes.py``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import Callable

import pandas as pd

from .. import reuse
from ..config import MiFuseConfig, result_fields
from ..fused_labels import teacher_names
from .checkpoint import HISTORY_FILE, read_history
from .features import learns_on_stored_trunk
from .labels import class_prior, fused_dev_uar, mode_labels, training_rows, with_stored_trunk
from .loop import LoopInputs, student_loop
from .modes import MODES

log = logging.getLogger("mifuse_ray")

@dataclasses.dataclass
class StudentResult:
    model_dir: str              # the final model (the EMA, or the student of a mode without one)
    chosen: str                 # "student" | "ema"
    student_dir: str
    ema_dir: str | None
    best_metrics: dict          # the metrics of the epoch the model comes from
    history: list[dict]
    seconds: float
    fused_dev_uar: float | None = None


def train_student(cfg: MiFuseConfig, labels_table: pd.DataFrame, dev_df: pd.DataFrame | None, source_checkpoint: str,
                  out_dir: str, run_name: str = "student", step_hook: Callable | None = None,
                  report_to_tune: bool = False, choice=None, dev_labels: pd.DataFrame | None = None) -> StudentResult:
    """Train one mode's student; ``dev_df`` (the student's half of the dev split) only monitors it
    unless ``train.final_model = smoothed_dev``. A finished run with the same fingerprint is reused."""
    start = time.time()
    mode = MODES[cfg.train.mode]
    fusion, fit = mode_labels(cfg, labels_table, choice)
    rows = training_rows(labels_table, cfg, fusion, fit)
    if rows.n == 0:
        raise ValueError("no clip has a usable fused label: nothing to train the student on")
    stored, why_not = learns_on_stored_trunk(cfg, mode, rows, *([] if dev_df is None else [dev_labels]))
    if stored and dev_df is not None:
        dev_df = with_stored_trunk(dev_df, dev_labels)
    inputs = LoopInputs(cfg=cfg, mode=mode, source_checkpoint=os.path.abspath(source_checkpoint), n_train=rows.n,
                        prior=class_prior(cfg, rows), fusion=fusion, fit=fit,
                        fused_dev_uar=fused_dev_uar(dev_labels, dev_df, cfg, fusion, fit),
                        teachers=teacher_names(labels_table), stored_trunk=stored,
                        tensorboard_dir=os.path.abspath(os.path.join(out_dir, "tensorboard", run_name)),
                        step_hook=step_hook)
    final_dir = os.path.join(out_dir, "models", run_name)
    fingerprint = student_fingerprint(inputs, rows, dev_df)
    done = reuse.stamped(final_dir, fingerprint)
    if done is not None and not report_to_tune:
        return StudentResult(**done["result"])
    log.info("%s student: %s", run_name, "learns on the trunk output stored while labelling" if stored
             else f"runs its trunk on the audio every step ({why_not})")
    result = _fit(cfg, inputs, rows, dev_df, out_dir, run_name, fingerprint, report_to_tune)
    res = _final_model(result, final_dir, mode.ema, inputs.fused_dev_uar, time.time() - start)
    reuse.stamp(final_dir, fingerprint, result=dataclasses.asdict(res))
    return res


def _fit(cfg: MiFuseConfig, inputs: LoopInputs, rows, dev_df, out_dir: str, run_name: str,
         fingerprint: str, report_to_tune: bool):
    """The ``TorchTrainer`` run. Same name and storage as an interrupted run at the same settings:
    Ray Train restores its latest checkpoint; at other settings the old state is removed first."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ..data import ordered_ingest, stored_rows, training_clips
    t = cfg.train
    clips = stored_rows if inputs.stored_trunk else (lambda df: training_clips(df, cfg.audio, t.ingest))
    datasets = {"train": rows.dataset if inputs.stored_trunk else training_clips(rows.dataset, cfg.audio, t.ingest,
                                                                                  n_clips=rows.n)}
    if dev_df is not None and len(dev_df) > 0:
        datasets["dev"] = clips(dev_df)
    storage = t.storage_path or os.path.abspath(os.path.join(out_dir, "_ray_train"))
    # the stamp stays on the driver's disk even where the storage is an object store
    resume_stamp = os.path.abspath(os.path.join(out_dir, "_ray_train", "stamps", run_name))
    if reuse.stamp_differs(resume_stamp, fingerprint):
        reuse.remove_tree(f"{storage.rstrip('/')}/{run_name}")              # other settings: start afresh
    reuse.stamp(resume_stamp, fingerprint)
    trainer = TorchTrainer(
        student_loop, train_loop_config={"inputs": inputs}, datasets=datasets, dataset_config=ordered_ingest(),
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker},
                                               placement_strategy=t.placement_strategy),
        run_config=ray.train.RunConfig(
            storage_path=storage, name=run_name,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=_tune_callbacks() if report_to_tune else None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="select_score",
                                                         checkpoint_score_order="max")))
    return trainer.fit()


def _final_model(result, final_dir: str, has_ema: bool, dev_uar_of_labels, seconds: float) -> StudentResult:
    """Copy the checkpoint ``train.final_model`` ranks best to ``final_dir`` (resume state stays behind)."""
    best_ckpt = result.get_best_checkpoint(metric="select_score", mode="max") or result.checkpoint
    best = next((m for c, m in result.best_checkpoints if c.path == best_ckpt.path), result.metrics)
    if os.path.exists(final_dir):
        shutil.rmtree(final_dir)
    with best_ckpt.as_directory() as d:
        shutil.copytree(d, final_dir, ignore=shutil.ignore_patterns("train_state.pt", HISTORY_FILE))
    chosen = "ema" if has_ema else "student"
    with result.checkpoint.as_directory() as d:            # the latest checkpoint: every epoch's metrics
        history = read_history(d)
    return StudentResult(model_dir=os.path.join(final_dir, chosen), chosen=chosen,
                         student_dir=os.path.join(final_dir, "student"),
                         ema_dir=os.path.join(final_dir, "ema") if has_ema else None,
                         best_metrics=dict(best), history=history, seconds=seconds, fused_dev_uar=dev_uar_of_labels)


def _tune_callbacks() -> list:
    from ray.tune.integration.ray_train import TuneReportCallback
    return [TuneReportCallback()]


def student_fingerprint(inputs: LoopInputs, rows, dev_df: pd.DataFrame | None) -> str:
    """Everything that changes a student: every result field of the config (train, audio, fusion),
    the mode's fusion and fit, the source checkpoint, the clips and their labels, the dev clips."""
    cfg = inputs.cfg
    return reuse.digest({"train": result_fields(cfg.train), "audio": result_fields(cfg.audio),
                         "fusion": result_fields(inputs.fusion),
                         "fit": dataclasses.asdict(inputs.fit) if inputs.fit is not None else None,
                         "prior": inputs.prior, "labels": cfg.labels, "source": inputs.source_checkpoint,
                         "fused_dev_uar": inputs.fused_dev_uar, "stored_trunk": inputs.stored_trunk,
                         "dev": sorted(dev_df["clip_id"]) if dev_df is not None else None,
                         "rows": [rows.n, rows.digest]})
