"""MI-Fuse label fusion (METHOD.md §2) as pure, vectorised functions.

Everything here runs unchanged on numpy arrays (the labeling stage, Tune trials
re-fusing stored draws) and on torch tensors (online re-fusion with the EMA teacher
inside training), so the two can never drift apart.

Both teachers are treated as *label emitters*: the LALM's parsed answers and one
label drawn from each MC-dropout pass of the source model. Measuring the spread of
labels the same way for both is what makes their uncertainties comparable; the
BALD mutual information of the soft draws is computed too where soft draws exist.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

try:  # torch is a dependency, but keep the pure numpy path importable on its own.
    import torch
except ImportError:  # pragma: no cover
    torch = None

UNCERTAINTIES = ("vote_entropy", "mi", "entropy")
WEIGHTINGS = ("exp", "inverse", "fixed")

# Per-clip fusion outcome, stored as a small integer and named in STATUS_NAMES.
FUSED, EQUAL_WEIGHTS_SINGLE_DRAW, ONLY_FIRST, ONLY_SECOND, NO_TEACHER = range(5)
STATUS_NAMES = ("fused", "equal_weights_single_draw", "only_lalm", "only_source", "no_teacher")


def _is_torch(x) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


class _Ops:
    """The handful of array operations fusion needs, for numpy or torch alike."""

    def __init__(self, like):
        self.torch = _is_torch(like)
        self.device = like.device if self.torch else None

    def f32(self, x):
        if self.torch:
            return x.to(torch.float32) if _is_torch(x) else torch.as_tensor(x, dtype=torch.float32, device=self.device)
        return np.asarray(x, dtype=np.float32)

    def arange(self, n):
        return torch.arange(n, device=self.device) if self.torch else np.arange(n)

    def where(self, cond, a, b):
        if self.torch:
            return torch.where(cond, self.f32(a), self.f32(b))
        return np.where(cond, a, b).astype(np.float32)

    def sum_keep(self, x):
        return x.sum(1, keepdim=True) if self.torch else x.sum(1, keepdims=True)

    def max_keep(self, x):
        return x.max(1, keepdim=True).values if self.torch else x.max(1, keepdims=True)

    def stack(self, xs):
        return torch.stack(xs, 1) if self.torch else np.stack(xs, 1)

    def exp(self, x):
        return torch.exp(x) if self.torch else np.exp(x)

    def log(self, x):
        return torch.log(x) if self.torch else np.log(x)

    def index(self, x):
        return x.long() if self.torch else x

    def to_int(self, x):
        return x.to(torch.int64) if self.torch else x.astype(np.int64)


def entropy(p, axis: int = -1):
    """Shannon entropy in nats along ``axis``, with 0·log 0 = 0."""
    ops = _Ops(p)
    positive = p > 0
    logp = ops.log(ops.where(positive, p, 1.0))
    return -(ops.where(positive, p * logp, 0.0)).sum(axis)


def _histogram_entropy_table(max_draws: int, ops: _Ops):
    """table[n, c] = -(c/n) log(c/n): vote-histogram entropy by lookup, exact and log-free."""
    n = np.arange(max_draws + 1, dtype=np.float64)[:, None]
    c = np.arange(max_draws + 1, dtype=np.float64)[None, :]
    frac = np.where((n > 0) & (c <= n), c / np.maximum(n, 1), 0.0)
    table = -frac * np.log(np.where(frac > 0, frac, 1.0))
    return ops.f32(table.astype(np.float32))


@dataclass
class TeacherStats:
    """Sufficient statistics of one teacher's draws for a batch of clips (B clips, C classes)."""

    n: Any               # (B,) valid draws
    counts: Any          # (B, C) vote counts
    hist: Any            # (B, C) vote histogram h_t (zeros when n = 0)
    pbar: Any            # (B, C) mean soft distribution where every draw is soft, else h_t
    vote_entropy: Any    # (B,) H(h_t)
    entropy: Any         # (B,) H(pbar)
    mi: Any              # (B,) BALD MI of the soft draws (NaN where not every draw is soft)


def teacher_stats(votes, num_classes: int, soft=None, with_mi: bool = True) -> TeacherStats:
    """Statistics of one teacher from its draws.

    votes: (B, n) integer labels, -1 marking an invalid draw (e.g. an unparseable answer).
    soft:  optional (B, n, C) per-draw distributions; rows with NaN count as "no soft draw".
    with_mi: compute the BALD MI (a log over every draw); skip it when only vote entropy is used.
    """
    ops = _Ops(votes)
    valid = votes >= 0
    n = valid.sum(1)
    counts = (votes[..., None] == ops.arange(num_classes)).sum(1)  # invalid (-1) matches nothing
    n_f = ops.f32(n)
    safe_n = ops.where(n_f > 0, n_f, 1.0)
    hist = ops.f32(counts) / safe_n[:, None]
    table = _histogram_entropy_table(votes.shape[1], ops)
    vote_entropy = table[ops.index(n)[:, None], ops.index(counts)].sum(1)

    pbar, mi = hist, n_f * float("nan")
    if soft is not None:
        soft = ops.f32(soft)
        soft_ok = valid & (soft == soft).all(-1)          # NaN rows: no soft draw
        n_soft = ops.f32(soft_ok.sum(1))
        soft = ops.where(soft_ok[..., None], soft, 0.0)
        mean_soft = soft.sum(1) / ops.where(n_soft > 0, n_soft, 1.0)[:, None]
        all_soft = (n_soft == n_f) & (n_f > 0)
        pbar = ops.where(all_soft[:, None], mean_soft, hist)
        if with_mi:
            mean_draw_entropy = entropy(soft).sum(1) / ops.where(n_soft > 0, n_soft, 1.0)
            bald = entropy(mean_soft) - mean_draw_entropy
            mi = ops.where(all_soft, ops.where(bald > 0, bald, 0.0), mi)  # clamp round-off below 0
    return TeacherStats(n=n, counts=counts, hist=hist, pbar=pbar, vote_entropy=vote_entropy,
                        entropy=entropy(pbar), mi=mi)


@dataclass
class FusionResult:
    q: Any             # (B, C) fused soft label (NaN rows where no teacher had a valid draw)
    weights: Any       # (B, T) per-teacher weights, summing to 1 over the teachers present
    uncertainty: Any   # (B, T) U_t used for weighting
    clip_weight: Any   # (B,) c(x): 0 below the confidence threshold or without any teacher
    status: Any        # (B,) integer codes, names in STATUS_NAMES


def fuse(teachers: Sequence[TeacherStats], uncertainty: str = "vote_entropy", weighting: str = "exp",
         tau: float = 0.5, eps: float = 1e-6, fixed_weights: Sequence[float] | None = None,
         sharpen_temperature: float = 1.0, min_confidence: float = 0.0) -> FusionResult:
    """Fuse T teachers' mean predictions with per-clip uncertainty weights.

    w_t ∝ exp(-U_t/τ) (``exp``) or 1/(U_t+ε) (``inverse``) or given constants (``fixed``).
    A teacher with no valid draw on a clip gets weight 0 there; where a present teacher has
    a single draw there is no spread to measure and the present teachers share equally.
    """
    if uncertainty not in UNCERTAINTIES:
        raise ValueError(f"uncertainty must be one of {UNCERTAINTIES}, got {uncertainty!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "fixed" and (fixed_weights is None or len(fixed_weights) != len(teachers)):
        raise ValueError("weighting='fixed' needs one fixed weight per teacher")
    ops = _Ops(teachers[0].pbar)
    U = ops.stack([getattr(t, uncertainty) for t in teachers])      # (B, T)
    pbar = ops.stack([t.pbar for t in teachers])                     # (B, T, C)
    n = ops.stack([ops.f32(t.n) for t in teachers])                  # (B, T)
    present = n > 0
    if weighting == "fixed":  # a teacher given weight 0 is absent: it must not stand in for the other
        present = present & (ops.f32(list(fixed_weights))[None, :] > 0)
    if uncertainty == "mi" and bool((present & (U != U)).any()):
        raise ValueError("uncertainty='mi' needs soft draws from every teacher (LALM logprobs); "
                         "use 'vote_entropy' or enable logprobs")
    U = ops.where(present & (U == U), U, 0.0)

    if weighting == "exp":
        logits = ops.where(present, -U / tau, -1e30)
        raw = ops.exp(logits - ops.max_keep(logits))
    elif weighting == "inverse":
        raw = 1.0 / (U + eps)
    else:
        raw = U * 0 + ops.f32(list(fixed_weights))[None, :]
    present_f = ops.f32(present)
    single = (present & (n < 2)).any(1)
    raw = ops.where(single[:, None], present_f, raw * present_f)
    total = ops.sum_keep(raw)
    weights = raw / ops.where(total > 0, total, 1.0)

    q = (weights[..., None] * ops.where(present[..., None], pbar, 0.0)).sum(1)
    if sharpen_temperature != 1.0:
        powered = q ** (1.0 / sharpen_temperature)
        norm = ops.sum_keep(powered)
        q = powered / ops.where(norm > 0, norm, 1.0)
    any_present = present.any(1)
    q = ops.where(any_present[:, None], q, float("nan"))
    confident = ops.max_keep(ops.where(any_present[:, None], q, 0.0))[:, 0] >= min_confidence
    clip_weight = ops.f32(any_present & confident)

    status = ops.where(single, float(EQUAL_WEIGHTS_SINGLE_DRAW), float(FUSED))
    if len(teachers) == 2:
        status = ops.where(present[:, 0] & ~present[:, 1], float(ONLY_FIRST), status)
        status = ops.where(~present[:, 0] & present[:, 1], float(ONLY_SECOND), status)
    status = ops.to_int(ops.where(~any_present, float(NO_TEACHER), status))
    return FusionResult(q=q, weights=weights, uncertainty=U, clip_weight=clip_weight, status=status)


def draw_labels(soft, uniforms):
    """One label per draw, v ~ Categorical(s), by inverse CDF of given uniforms.

    soft: (B, K, C) distributions; uniforms: (B, K) in [0, 1), derived from per-(clip, pass)
    seeds by the caller so that draws do not depend on batching.
    """
    soft = np.asarray(soft, dtype=np.float64)
    cdf = np.cumsum(soft, axis=-1)
    cdf[..., -1] = np.inf
    return (np.asarray(uniforms)[..., None] >= cdf).sum(-1).astype(np.int64)
