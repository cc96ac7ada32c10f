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
from ..fused_labels import SOURCE, draw_columns, fit_table, fusion_columns, stored_draws
from .modes import MODES

def mode_labels(cfg: MiFuseConfig, labels_table: pd.DataFrame, choice=None) -> tuple[FusionConfig, FusionFit | None]:
    """The fusion a mode learns from: the dev-chosen one, or its named variant fitted on the split."""
    from ..fusion import VARIANTS
    mode = MODES[cfg.train.mode]
    if mode.labels == "chosen" or mode.labels is None:
        if choice is None:
            from ..calibration import choose_fusion
            choice = choose_fusion(labels_table, None, cfg.fusion, cfg.labels)
        return choice.config, choice.fit
    fusion = dataclasses.replace(cfg.fusion, **VARIANTS[mode.labels])
    return fusion, fit_table(labels_table, len(cfg.labels), fusion)


def training_table(labels_table: pd.DataFrame, cfg: MiFuseConfig, fusion: FusionConfig,
                   fit: FusionFit | None) -> pd.DataFrame:
    """Rows the student learns from: q fused with the mode's fusion, and the draws of every teacher
    but the source model (the EMA takes its place) for online re-fusion."""
    C = len(cfg.labels)
    ok = labels_table[labels_table["error"].isna()].reset_index(drop=True)
    fused = fusion_columns(ok, C, fusion, fit)
    q = np.stack(fused["q"]).astype(np.float32)
    valid = np.isfinite(q).all(1)
    draws = stored_draws(ok, C, fusion.lalm_answers_used, fusion.source_passes_used)
    keep = [c for c in ("clip_id", "path", "offset_s", "segment_s", "parent_id", TRUNK_FEATURES) if c in ok.columns]
    table = ok.loc[valid, keep].copy()
    table["q"] = list(q[valid])
    table["clip_weight"] = fused["clip_weight"].to_numpy(np.float32)[valid]
    for name, (votes, probs) in draws.items():
        if name != SOURCE:
            votes_col, probs_col = draw_columns(name)
            table[votes_col], table[probs_col] = list(votes[valid]), list(probs[valid])
    table["error"] = None
    return table.reset_index(drop=True)


def class_prior(cfg: MiFuseConfig, table: pd.DataFrame) -> list[float]:
    C = len(cfg.labels)
    if cfg.train.diversity_prior == "q_mean":
        return np.stack(table["q"]).mean(0).tolist()
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
