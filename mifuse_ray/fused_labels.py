"""Fusion over stored draws: a labels table in, its fusion columns out.

Pure pandas/numpy around ``fusion.py``: the labelling pipeline's fusion stage, the dev choice
(``calibration.py``), training (which re-fuses the stored draws for each mode) and the benchmarks
all fuse through these functions, and none of them needs the Ray Data pipeline to do it.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from .fusion import STATUS_NAMES, FusionFit, corrected_pbars, fuse, teacher_stats
from .fusion_fit import _column_means, fit_fusion, rescale_by_speaker, speaker_scales

NO_TEACHER_ERROR = "no_teacher_answer"     # a decoded clip that neither teacher could answer


LALM = "lalm"                            # the API teacher; every other teacher is a source model
SOURCE = "source"                        # the source model (source.checkpoint), whose place the EMA takes online
_SOURCE_TEACHER = re.compile(r"^(source\d*)_votes$")


def source_teacher_name(i: int) -> str:
    """The i-th source-model teacher: ``source`` (source.checkpoint), then ``source2``, ``source3``, …
    for ``source.extra_checkpoints``: the one place that spells these names."""
    return SOURCE if i == 0 else f"{SOURCE}{i + 1}"


def teacher_names(table) -> list[str]:
    """The teachers a labels table holds, in fusion order: the LALM, the source model, then the
    extra source models (``source.extra_checkpoints``: ``source2``, ``source3``, …). Each has a
    ``<name>_votes`` column and a distribution column (``lalm_soft``, ``<name>_probs``)."""
    columns = table.columns if hasattr(table, "columns") else table       # a DataFrame, or a batch's keys
    extra = sorted((m.group(1) for m in map(_SOURCE_TEACHER.match, columns) if m and m.group(1) != SOURCE),
                   key=lambda n: int(n[len("source"):]))
    return [LALM, SOURCE, *extra]


def draw_columns(name: str) -> tuple[str, str]:
    """(votes, distributions) columns of a teacher in a labels table."""
    return f"{name}_votes", ("lalm_soft" if name == LALM else f"{name}_probs")


def stored_draws(df: pd.DataFrame, num_classes: int, answers_used: int = 0, passes_used: int = 0) -> dict:
    """{teacher: (votes (B, n), distributions (B, n, C))}: the first N LALM answers and K MC passes
    of every source-model teacher per clip (0 = all stored)."""
    out = {}
    for name in teacher_names(df):
        votes_col, probs_col = draw_columns(name)
        out[name] = (_stack_lists(df[votes_col], fill=-1), _stack_lists(df[probs_col], fill=np.nan, inner=num_classes))
    return draws_used(out, answers_used, passes_used)


def draws_used(draws: dict, answers_used: int = 0, passes_used: int = 0) -> dict:
    """The first N LALM answers and K MC passes of each teacher's stored draws (0 = all)."""
    out = {}
    for name, (votes, probs) in draws.items():
        n = (answers_used if name == LALM else passes_used) or votes.shape[1]
        out[name] = (votes[:, :n].reshape(len(votes), -1), probs[:, :n].reshape(len(votes), -1, probs.shape[-1]))
    return out


def _stack_lists(col, fill, inner: int | None = None) -> np.ndarray:
    rows = [r if (r is not None and hasattr(r, "__len__") and not isinstance(r, str)) else None for r in col]
    width = max((len(r) for r in rows if r is not None), default=1) or 1
    shape = (len(rows), width) if inner is None else (len(rows), width, inner)
    out = np.full(shape, fill, dtype=np.float32 if inner is not None else np.int64)
    for i, r in enumerate(rows):
        if r is None or len(r) == 0:
            continue
        arr = np.asarray([np.asarray(x, dtype=np.float32) for x in r]) if inner is not None else np.asarray(r)
        out[i, :len(arr)] = arr
    return out


def teachers_of(df: pd.DataFrame, num_classes: int, answers_used: int = 0, passes_used: int = 0) -> list:
    """Every teacher's statistics, in ``teacher_names`` order, from a table's stored draws."""
    return teachers_from_draws(stored_draws(df, num_classes, answers_used, passes_used), num_classes)


def teachers_from_draws(draws: dict, num_classes: int) -> list:
    return [teacher_stats(votes, num_classes, probs) for votes, probs in draws.values()]


def fuse_kwargs(fusion_cfg) -> dict:
    """The per-clip part of a fusion config, as ``fusion.fuse`` takes it. Weights still to be fitted
    on a dev split (``dev``, resolved by ``calibration.fit_with_dev``) are equal until they are."""
    f = fusion_cfg
    weighting = "equal" if f.weighting == "dev" else f.weighting
    return dict(uncertainty=f.uncertainty, weighting=weighting, tau=f.tau, eps=f.eps,
                fixed_weights=list(f.fixed_weights), sharpen_temperature=f.sharpen_temperature,
                min_confidence=f.min_confidence, combine=f.combine)


def fusion_prior(fusion_cfg, num_classes: int, batches=None):
    """The class prior balancing aims at: uniform (UAR weighs classes equally), given, or estimated
    as the mean of the teachers' plain average over the split."""
    if fusion_cfg.balance_prior == "given":
        if len(fusion_cfg.balance_prior_values) != num_classes:
            raise ValueError(f"fusion.balance_prior_values needs {num_classes} values with fusion.balance_prior: given")
        return np.asarray(fusion_cfg.balance_prior_values, dtype=np.float64)
    if fusion_cfg.balance_prior == "estimated" and batches is not None:
        means, _ = _column_means(batches, lambda ts: [(np.asarray(q), np.isfinite(np.asarray(q)).all(1))
                                                       for q in [fuse(ts, weighting="equal").q]])
        if means:
            return means[0]
    return np.full(num_classes, 1.0 / num_classes)


def fit_frames(frames, num_classes: int, fusion_cfg, temperatures=None, batches=None) -> FusionFit:
    """The global part of the fusion (balancing, label model) fitted over every decoded clip.

    ``frames()`` yields the split as pandas batches of stored draws, once per pass (a slice of a
    table in memory, or a split's shards read one at a time). ``batches``: the teachers' statistics
    already held elsewhere (``split_stats.HeldSplit``: on the cluster, for a sharded split)."""
    def from_frames():
        for frame in frames():
            ok = frame[frame["error"].isna()] if "error" in frame else frame
            if len(ok):
                yield teachers_of(ok, num_classes, fusion_cfg.lalm_answers_used, fusion_cfg.source_passes_used)
    batches = batches or from_frames
    prior = fusion_prior(fusion_cfg, num_classes, batches)
    fit = fit_fusion(batches, num_classes, prior=prior, balance_teachers=fusion_cfg.balance_teachers,
                     balance_fused=fusion_cfg.balance_fused, temperatures=temperatures, **fuse_kwargs(fusion_cfg))
    if fusion_cfg.balance_speakers:
        fit.speaker_scales = fitted_speaker_scales(frames, num_classes, fusion_cfg, fit, prior) or None
    return fit


def fitted_speaker_scales(frames, num_classes: int, fusion_cfg, fit: FusionFit, prior=None) -> dict:
    """One more pass over the split: its fused labels (with ``fit``'s balancing) grouped by speaker,
    C floats per clip, and each speaker's scale vector (``fusion_fit.speaker_scales``)."""
    qs, speakers = [], []
    for frame in frames():
        ok = frame[frame["error"].isna()] if "error" in frame else frame
        if len(ok) and "speaker_id" in ok:
            teachers = teachers_of(ok, num_classes, fusion_cfg.lalm_answers_used, fusion_cfg.source_passes_used)
            qs.append(np.asarray(fuse(teachers, fit=fit, **fuse_kwargs(fusion_cfg)).q))
            speakers.append(ok["speaker_id"].to_numpy(dtype=object))
    if not qs:
        return {}
    prior = fusion_prior(fusion_cfg, num_classes) if prior is None else prior
    return speaker_scales(np.concatenate(qs), np.concatenate(speakers), prior, fusion_cfg.speaker_min_clips,
                          notes=fit.notes)


def fit_table(table, num_classes: int, fusion_cfg, temperatures=None, batch_rows: int = 8192):
    """``fit_frames`` over a table in memory, or over a sharded split (``label_shards.LabelShards``),
    whose statistics the cluster holds (``split_stats``) and whose shards the driver reads one at a time."""
    if not isinstance(table, pd.DataFrame):
        from .split_stats import held_split
        held = held_split(table, num_classes)
        return fit_frames(table.frames, num_classes, fusion_cfg, temperatures,
                          batches=held.batches(fusion_cfg.lalm_answers_used, fusion_cfg.source_passes_used))
    return fit_frames(table_frames(table, batch_rows), num_classes, fusion_cfg, temperatures)


def table_frames(table, batch_rows: int = 8192):
    """``frames()`` of a split: a sharded split's shards one at a time, or slices of a table in memory."""
    if not isinstance(table, pd.DataFrame):
        return table.frames
    return lambda: (table.iloc[i:i + batch_rows] for i in range(0, len(table), batch_rows))


def fusion_columns(df: pd.DataFrame, num_classes: int, fusion_cfg, fit: FusionFit | None = None) -> pd.DataFrame:
    """The fusion map stage: per-teacher p̄ (as fused) and uncertainties, weights, q, argmax, status."""
    out = df.copy()
    names = teacher_names(df)
    teachers = teachers_of(df, num_classes, fusion_cfg.lalm_answers_used, fusion_cfg.source_passes_used)
    res = fuse(teachers, fit=fit, **fuse_kwargs(fusion_cfg))
    for name, t, pbar in zip(names, teachers, corrected_pbars(teachers, fit)):
        out[f"{name}_n"] = np.asarray(t.n)
        out[f"{name}_pbar"] = list(np.asarray(t.pbar))
        out[f"{name}_vote_entropy"] = np.asarray(t.vote_entropy)
        out[f"{name}_mi"] = np.asarray(t.mi)
        out[f"{name}_entropy"] = np.asarray(t.entropy)
        out[f"{name}_pred"] = np.where(np.asarray(t.n) > 0, np.asarray(t.pbar).argmax(1), -1)
        out[f"{name}_corrected_pred"] = np.where(np.asarray(t.n) > 0, np.asarray(pbar).argmax(1), -1)
    w = np.asarray(res.weights)
    for i, name in enumerate(names):
        out[f"weight_{name}"] = w[:, i]
    q = np.asarray(res.q)
    if fit is not None and fit.speaker_scales and "speaker_id" in df:
        q = rescale_by_speaker(q, df["speaker_id"].to_numpy(dtype=object), fit.speaker_scales)
    out["q"] = list(q)
    out["clip_weight"] = np.asarray(res.clip_weight)
    out["fusion_status"] = [STATUS_NAMES[s] for s in np.asarray(res.status)]
    out["fused_pred"] = np.where(np.isfinite(q).all(1), np.nan_to_num(q).argmax(1), -1)
    decoded = out["error"].isna()
    out.loc[decoded & (out["fusion_status"] == "no_teacher"), "error"] = NO_TEACHER_ERROR
    return out


def fused_again(table: pd.DataFrame, num_classes: int, fusion_cfg, fit: FusionFit | None = None) -> pd.DataFrame:
    """A stored labels table fused again with other fusion settings (N, K, τ, weighting, balancing).

    Reuse of stored labels ignores the fusion on purpose (a rerun that changes only the fusion
    pays for no call), so the fusion columns of a reused table must be recomputed, or the run's
    labels and its ``fused_label`` score would still be those of the earlier settings."""
    table = table.copy()
    table.loc[table["error"] == NO_TEACHER_ERROR, "error"] = None
    if fit is None:
        fit = fit_table(table, num_classes, fusion_cfg)
    return fusion_columns(table, num_classes, fusion_cfg, fit)
