"""What a student learns from: the labels of its mode, as rows the training loop reads.

A mode's labels are the fusion chosen on dev (``calibration.choose_fusion``) or one of the named
variants (``fusion.VARIANTS``) fitted on the adaptation split; the rows carry the fused label q,
the clip weight and every teacher's stored draws but the source model's, whose place the EMA
teacher takes in online re-fusion.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from ..config import FusionConfig, MiFuseConfig
from ..fusion import FusionFit
from ..models.base import TRUNK_FEATURES
from ..fused_labels import (SOURCE, draw_columns, fit_table, fitted_speaker_scales, fusion_columns,
                            stored_draws, table_frames)
from .modes import MODES

def mode_labels(cfg: MiFuseConfig, labels_table, choice=None) -> tuple[FusionConfig, FusionFit | None]:
    """The fusion a mode learns from: the dev-chosen one, or its named variant fitted on the split;
    with ``train.targets speaker_balanced``, its fit also balances each adaptation speaker's labels."""
    from ..fusion import VARIANTS
    mode = MODES[cfg.train.mode]
    if mode.labels == "chosen" or mode.labels is None:
        if choice is None:
            from ..calibration import choose_fusion
            choice = choose_fusion(labels_table, None, cfg.fusion, cfg.labels)
        fusion, fit = choice.config, choice.fit
    else:
        fusion = dataclasses.replace(cfg.fusion, **VARIANTS[mode.labels])
        fit = fit_table(labels_table, len(cfg.labels), fusion)
    if cfg.train.targets == "speaker_balanced" and not (fit is not None and fit.speaker_scales):
        fit = fit or FusionFit()
        scales = fitted_speaker_scales(table_frames(labels_table), len(cfg.labels), fusion, fit)
        fit = dataclasses.replace(fit, speaker_scales=scales or None)
    return fusion, fit


def training_table(labels_table: pd.DataFrame, cfg: MiFuseConfig, fusion: FusionConfig,
                   fit: FusionFit | None) -> pd.DataFrame:
    """Rows the student learns from: q fused with the mode's fusion, and the draws of every teacher
    but the source model (the EMA takes its place) for online re-fusion."""
    C = len(cfg.labels)
    ok = labels_table[labels_table["error"].isna()].reset_index(drop=True)
    if not len(ok):
        return ok
    fused = fusion_columns(ok, C, fusion, fit)
    q = np.stack(fused["q"]).astype(np.float32)
    valid = np.isfinite(q).all(1)
    draws = stored_draws(ok, C, fusion.lalm_answers_used, fusion.source_passes_used)
    keep = [c for c in ("clip_id", "path", "offset_s", "segment_s", "parent_id", "speaker_id", TRUNK_FEATURES)
            if c in ok.columns]
    table = ok.loc[valid, keep].copy()
    table["q"] = list(q[valid])
    table["clip_weight"] = fused["clip_weight"].to_numpy(np.float32)[valid]
    for name, (votes, probs) in draws.items():
        if name != SOURCE:
            votes_col, probs_col = draw_columns(name)
            table[votes_col], table[probs_col] = list(votes[valid]), list(probs[valid])
    table["error"] = None
    return table.reset_index(drop=True)


@dataclasses.dataclass
class TrainingRows:
    """A mode's training rows as a Ray Dataset held in the object store (never in the driver), and the
    few numbers the driver needs of them, summed over batches by the cluster."""

    dataset: object             # materialised Ray Dataset of ``training_table`` rows, in shard order
    n: int
    q_mean: list
    digest: str                 # the rows' clip ids, labels and weights, however they were batched
    has_trunk: bool             # every row carries the trunk output the source stage stored


def _rows_stats(batch: pd.DataFrame, num_classes: int) -> pd.DataFrame:
    from ..label_shards import shard_rows_digest
    keyed = pd.DataFrame({"clip_id": batch["clip_id"], "q": [np.round(np.asarray(q, dtype=np.float64), 5).tolist()
                                                            for q in batch["q"]],
                          "w": np.round(batch["clip_weight"].to_numpy(np.float64), 5)})
    n, hashed = shard_rows_digest(keyed, ["clip_id", "q", "w"])
    q_sum = np.stack(batch["q"]).sum(0).tolist() if n else [0.0] * num_classes
    missing = int(batch[TRUNK_FEATURES].isna().sum()) if TRUNK_FEATURES in batch else n
    return pd.DataFrame({"n": [n], "hash": [str(hashed)], "q_sum": [q_sum], "trunk_missing": [missing]})


def training_rows(labels, cfg: MiFuseConfig, fusion: FusionConfig, fit: FusionFit | None) -> TrainingRows:
    """``training_table`` mapped over a split's labels by Ray Data tasks: a sharded split
    (``LabelShards``) is read by the cluster; a table in memory goes in as blocks."""
    from ..data import manifest_dataset
    from ..fused_shards import FUSE_CPUS
    C = len(cfg.labels)
    ds = manifest_dataset(labels) if isinstance(labels, pd.DataFrame) else labels.dataset()
    ds.context.execution_options.preserve_order = True          # the same rows in the same order every run
    rows = ds.map_batches(training_table, fn_kwargs=dict(cfg=cfg, fusion=fusion, fit=fit), batch_format="pandas",
                          batch_size=4096, num_cpus=FUSE_CPUS).materialize()
    parts = rows.map_batches(_rows_stats, fn_kwargs=dict(num_classes=C), batch_format="pandas", batch_size=4096,
                             num_cpus=FUSE_CPUS).take_all()
    n = sum(int(p["n"]) for p in parts)
    q_sum = np.sum([p["q_sum"] for p in parts], axis=0) if parts else np.zeros(C)
    digest = str(sum(int(p["hash"]) for p in parts) % 2**64)
    return TrainingRows(rows, n, (np.asarray(q_sum) / max(n, 1)).tolist(), digest,
                        bool(parts) and all(int(p["trunk_missing"]) == 0 for p in parts))


def class_prior(cfg: MiFuseConfig, rows: TrainingRows) -> list[float]:
    C = len(cfg.labels)
    if cfg.train.diversity_prior == "q_mean":
        return list(rows.q_mean)
    return [1.0 / C] * C


def fused_dev_uar(dev_labels: pd.DataFrame | None, dev_df: pd.DataFrame | None, cfg: MiFuseConfig,
                  fusion: FusionConfig, fit: FusionFit | None) -> float | None:
    """The fused label's UAR on the student's dev clips (its line in the report's curve)."""
    from ..metrics import counting_unanswered_as_wrong, uar
    if dev_labels is None or dev_df is None or not len(dev_df):
        return None
    C = len(cfg.labels)
    t = dev_labels[dev_labels["error"].isna() & dev_labels["clip_id"].isin(set(dev_df["clip_id"]))]
    if not len(t):
        return None
    pred = fusion_columns(t.reset_index(drop=True), C, fusion, fit)["fused_pred"].to_numpy()
    y = np.array([cfg.labels.index(v) for v in t["label"]])
    return uar(y, counting_unanswered_as_wrong(y, pred, C), C)


def with_stored_trunk(dev_df: pd.DataFrame, dev_labels: pd.DataFrame) -> pd.DataFrame:
    """The student's dev clips with the trunk output the source stage stored for them while labelling
    the dev split (clips it could not decode have none, and are left out as the waveform path leaves
    out clips that do not decode)."""
    stored = dev_labels.loc[dev_labels["error"].isna(), ["clip_id", TRUNK_FEATURES]]
    return dev_df.drop(columns=[TRUNK_FEATURES], errors="ignore").merge(stored, on="clip_id", how="inner")
