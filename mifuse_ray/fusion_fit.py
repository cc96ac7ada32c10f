"""The global part of a fusion (docs/method.md §3), fitted over a whole split and applied per batch.

``fit_fusion`` streams a split's teacher statistics in passes (memory: one batch) and returns a
``fusion.FusionFit``: each teacher's balancing scale, the label model's confusions, the fused
label's balancing scale. Beside it: temperatures fitted on the dev split, balancing within each
speaker, and the running class means that stand in for whole-split ones during online re-fusion.
Pure numpy; ``fusion.fuse`` applies what is fitted here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .fusion import (BALANCINGS, FusionFit, TeacherStats, _is_torch, _present, corrected_pbars, fuse,
                     label_model_posterior, rescale, temper)

def fit_fusion(batches, num_classes: int, *, prior=None, balance_teachers: str = "mean",
               balance_fused: str = "sinkhorn", temperatures=None, sinkhorn_iters: int = 20,
               label_model_iters: int = 30, **fuse_kwargs) -> FusionFit:
    """The global corrections of a fusion, fitted over every clip of the split.

    ``batches()`` yields lists of TeacherStats (numpy), one per batch; it is called once per pass,
    so the split streams through and is never held at once. The steps, each a few passes:
    1. each teacher balanced towards the prior π (its class means; Sinkhorn iterates that);
    2. with ``combine='label_model'``: Dawid–Skene EM for each teacher's confusion matrix,
       started from the balanced equal-weight mean (see ``label_model_posterior``);
    3. the fused label balanced towards π.
    Clips a teacher did not answer (errors, budget, spend cap) do not count in its statistics.
    """
    if balance_teachers not in BALANCINGS or balance_fused not in BALANCINGS:
        raise ValueError(f"balancing must be one of {BALANCINGS}")
    prior = np.full(num_classes, 1.0 / num_classes) if prior is None else np.asarray(prior, dtype=np.float64)
    prior = prior / prior.sum()
    floor = 0.02 / num_classes
    fit = FusionFit(temperatures=list(temperatures) if temperatures is not None else None)
    fixed = fuse_kwargs.get("fixed_weights") if fuse_kwargs.get("weighting") == "fixed" else None

    if balance_teachers != "none":
        passes = 1 if balance_teachers == "mean" else sinkhorn_iters
        for _ in range(passes):
            means, _ = _column_means(batches, lambda ts: list(zip(corrected_pbars(ts, fit),
                                                                  _present(ts, fixed).T)))
            if not means:
                break
            scales = fit.teacher_scales or [np.ones(num_classes)] * len(means)
            fit.teacher_scales = [_scale_step(v, m, prior, floor, fit.notes, f"teacher {i}")
                                  for i, (v, m) in enumerate(zip(scales, means))]

    if fuse_kwargs.get("combine") == "label_model":
        _fit_label_model(batches, fit, num_classes, prior, label_model_iters, balance_fused != "none", fuse_kwargs)

    if balance_fused != "none":
        passes = 1 if balance_fused == "mean" else sinkhorn_iters
        fit.fused_scale = np.ones(num_classes)
        for _ in range(passes):
            means, _ = _column_means(batches, lambda ts: [_fused_rows(ts, fuse_kwargs, fit)])
            if not means:
                break
            fit.fused_scale = _scale_step(fit.fused_scale, means[0], prior, floor, fit.notes, "fused label")
    return fit


def _column_means(batches, rows_of) -> tuple[np.ndarray, np.ndarray]:
    """One pass: the sum over clips of ``rows_of(batch)`` (a list of (B, C) arrays and (B,) masks),
    per list entry, divided by the clips counted. Memory is one batch, whatever the split's size.
    Batches held on the cluster (``split_stats``) sum where they are; the driver adds the sums."""
    sums, counts = batches.column_sums(rows_of) if hasattr(batches, "column_sums") else column_sums(batches(), rows_of)
    if sums is None:
        return [], []
    return [s / max(c, 1.0) for s, c in zip(sums, counts)], counts


def column_sums(batches, rows_of) -> tuple[list | None, list | None]:
    """(sums, counts) of ``_column_means`` over an iterable of batches."""
    sums, counts = None, None
    for batch in batches:
        parts = rows_of(batch)
        if sums is None:
            sums = [np.zeros(np.asarray(p).shape[1]) for p, _ in parts]
            counts = [0.0] * len(parts)
        for i, (p, mask) in enumerate(parts):
            p, mask = np.asarray(p, dtype=np.float64), np.asarray(mask, dtype=bool)
            sums[i] += np.nan_to_num(p[mask]).sum(0)
            counts[i] += float(mask.sum())
    return sums, counts


def _scale_step(scale, marginal, prior, floor: float, notes: list, what: str):
    """v ← v · π / m, with a class nobody predicts floored instead of divided by zero (noted)."""
    marginal = np.asarray(marginal, dtype=np.float64)
    starved = marginal < floor
    if starved.any():
        note = f"{what}: class(es) {np.flatnonzero(starved).tolist()} almost never predicted; balancing capped"
        if note not in notes:
            notes.append(note)
    return np.asarray(scale, dtype=np.float64) * np.asarray(prior) / np.maximum(marginal, floor)


def _fused_rows(teachers, fuse_kwargs, fit):
    q = np.asarray(fuse(teachers, fit=fit, **fuse_kwargs).q)
    return q, np.isfinite(q).all(1)


def _fit_label_model(batches, fit: FusionFit, C: int, prior, iters: int, fixed_prior: bool, fuse_kwargs,
                     soft_final: int = 2) -> None:
    """Dawid–Skene EM over the corrected p̄ of every teacher (one soft vote each).

    The M-step counts each clip for its most likely class (hard, or classification, EM): with
    one soft vote per teacher the evidence is weak, and soft EM was seen to flatten every
    confusion matrix towards uniform within a few iterations (its posterior then forgets the
    teachers); hard assignments keep the estimated confusions as sharp as the data says. Hard EM
    over-states the diagonal, so the last ``soft_final`` iterations are soft EM from there."""
    start = {**fuse_kwargs, "combine": "mean", "weighting": "equal"}
    posterior = lambda ts: np.asarray(fuse(ts, fit=fit, **start).q)  # noqa: E731  (first E-step)
    for it in range(iters):
        hard = it < iters - soft_final
        joint, prior_sum, T = None, np.zeros(C), 0
        for ts in batches():
            post = np.nan_to_num(posterior(ts))
            if hard:                                                         # (see docstring)
                post = np.eye(C)[post.argmax(1)] * (post.sum(1, keepdims=True) > 0)
            pbars, present = corrected_pbars(ts, fit), np.asarray(_present(ts))
            T = len(ts)
            joint = joint if joint is not None else [np.zeros((C, C)) for _ in range(T)]
            for i in range(T):
                p = np.nan_to_num(np.asarray(pbars[i], dtype=np.float64)) * present[:, i:i + 1]
                joint[i] += post.T @ p
            prior_sum += post.sum(0)
        if joint is None:
            return
        confusion = [(j + 0.5) / (j + 0.5).sum(1, keepdims=True) for j in joint]   # Laplace-smoothed rows
        fit.log_confusion = [np.log(c) for c in confusion]
        fit.log_prior = np.log(prior if fixed_prior else np.maximum(prior_sum / prior_sum.sum(), 1e-6))
        posterior = lambda ts: np.asarray(label_model_posterior(  # noqa: E731
            corrected_pbars(ts, fit), _present(ts), fit.log_confusion, fit.log_prior))


def fit_temperatures(teachers: Sequence[TeacherStats], y, grid=None) -> list[float]:
    """Per teacher, the temperature that minimises the negative log-likelihood of the dev
    split's labels ``y`` under its tempered p̄ (clips where the teacher answered)."""
    grid = np.exp(np.linspace(np.log(0.1), np.log(10.0), 41)) if grid is None else grid
    y = np.asarray(y)
    out = []
    for t in teachers:
        here = np.asarray(t.n) > 0
        p = np.asarray(t.pbar, dtype=np.float64)[here]
        if not here.any():
            out.append(1.0)
            continue
        nll = [-np.log(np.clip(temper(p, T)[np.arange(len(p)), y[here]], 1e-6, None)).mean() for T in grid]
        out.append(float(grid[int(np.argmin(nll))]))
    return out


def speaker_scales(q, speakers, prior, min_clips: int, iters: int = 20, notes: list | None = None) -> dict:
    """Per speaker, the scale vector v_s that balances the labels of that speaker's clips towards the
    prior (Sinkhorn within the speaker); ``rescale_by_speaker`` applies it as q ⊙ v_s / <q, v_s>.

    Why: emotion is heard against the speaker's own voice. Both teachers hear a high, loud or fast
    speaker as aroused in every clip (the F0, loudness and rate that carry emotion also differ between
    speakers by as much as between emotions); balancing within the speaker removes what stays constant
    over their clips and keeps what changes between them. It assumes each speaker's clips span the
    classes as the split's do (the prior); a speaker with fewer than ``min_clips`` labelled clips, or
    none (an empty or missing id), is left as the split's balancing made it."""
    q = np.asarray(q, dtype=np.float64)
    keys = np.array(["" if s is None or (isinstance(s, float) and np.isnan(s)) else str(s) for s in speakers],
                    dtype=object)
    prior = np.asarray(prior, dtype=np.float64)
    floor = 0.02 / q.shape[1]
    ok = np.flatnonzero(np.isfinite(q).all(1) & (keys != ""))
    notes = [] if notes is None else notes
    names, inverse, counts = np.unique(keys[ok].astype(str), return_inverse=True, return_counts=True)
    groups = np.split(ok[np.argsort(inverse, kind="stable")], np.cumsum(counts)[:-1])   # one sort, not one scan each
    out = {}
    for speaker, rows in zip(names, groups):
        if len(rows) < min_clips:
            continue
        scale = np.ones(q.shape[1])
        for _ in range(iters):
            scale = _scale_step(scale, rescale(q[rows], scale).mean(0), prior, floor, notes, "a speaker's labels")
        out[str(speaker)] = scale / scale.sum()
    return out


def rescale_by_speaker(q, speakers, scales: dict | None):
    """Each row balanced with its speaker's scale vector (``speaker_scales``); rows of a speaker
    without one stay as they are."""
    if not scales:
        return q
    q = np.array(q, dtype=np.float64)
    rows = [i for i, s in enumerate(speakers) if str(s) in scales]
    if rows:
        q[rows] = rescale(q[rows], np.stack([scales[str(speakers[i])] for i in rows]))
    return q


class OnlineBalance:
    """Class balancing for online re-fusion: running class means of a teacher (or of q) over the
    steps of training, standing in for the whole-split means the labelling fit used.
    ``scale()`` is π / m, the one-step balancing vector ``rescale`` applies."""

    def __init__(self, prior, initial_scale=None, momentum: float = 0.95):
        self.prior = np.asarray(prior, dtype=np.float64)
        start = self.prior / np.asarray(initial_scale) if initial_scale is not None else self.prior
        self.mean = start / start.sum()
        self.momentum = momentum

    def update(self, p) -> None:
        p = np.asarray(p.detach().cpu() if _is_torch(p) else p, dtype=np.float64)
        p = p[np.isfinite(p).all(1)]
        if len(p):
            self.mean = self.momentum * self.mean + (1 - self.momentum) * p.mean(0)

    def scale(self):
        return self.prior / np.maximum(self.mean, 0.02 / len(self.mean))
