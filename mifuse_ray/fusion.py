"""MI-Fuse label fusion (docs/method.md §2–3) as pure, vectorised functions.

Everything here runs unchanged on numpy arrays (the labeling stage, Tune trials
re-fusing stored draws) and on torch tensors (online re-fusion with the EMA teacher
inside training), so the two can never drift apart.

Both teachers are treated as *label emitters*: the LALM's parsed answers and one
label drawn from each MC-dropout pass of the source model. Measuring the spread of
labels the same way for both is what makes their uncertainties comparable; the
BALD mutual information of the soft draws is computed too where soft draws exist.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


UNCERTAINTIES = ("vote_entropy", "mi", "entropy")
WEIGHTINGS = ("exp", "inverse", "equal", "fixed")
COMBINES = ("mean", "product", "label_model")
BALANCINGS = ("none", "mean", "sinkhorn")   # fitted over a split in fusion_fit.py

# Named fusions: field overrides of FusionConfig. The teachers alone and the paper's MI-Fuse are
# here so that every table and the dev choice speak of the same things. (Train modes have names of
# their own, train/modes.py: the mode "mifuse_paper" learns the variant "paper".)
VARIANTS: dict[str, dict] = {  # FusionConfig field overrides
    "paper": dict(weighting="exp", combine="mean", balance_teachers="none", balance_fused="none",
                         balance_speakers=False, calibrate=False),
    "equal_mean": dict(weighting="equal", combine="mean", balance_teachers="none", balance_fused="none",
                  balance_speakers=False, calibrate=False),
    "lalm": dict(weighting="fixed", fixed_weights=[1.0, 0.0], combine="mean", balance_teachers="none",
                 balance_fused="none", balance_speakers=False, calibrate=False),
    "source": dict(weighting="fixed", fixed_weights=[0.0, 1.0], combine="mean", balance_teachers="none",
                   balance_fused="none", balance_speakers=False, calibrate=False),
    "lalm_balanced": dict(weighting="fixed", fixed_weights=[1.0, 0.0], combine="mean", balance_teachers="none",
                          balance_fused="sinkhorn"),
    "mean_balanced": dict(weighting="equal", combine="mean", balance_teachers="mean", balance_fused="sinkhorn"),
    "paper_balanced": dict(weighting="exp", combine="mean", balance_teachers="mean", balance_fused="sinkhorn"),
    "mean_dev_weighted": dict(weighting="dev", combine="mean", balance_teachers="mean", balance_fused="sinkhorn"),
    "product_dev_weighted": dict(weighting="dev", combine="product", balance_teachers="mean",
                                 balance_fused="sinkhorn"),
    "product_balanced": dict(weighting="equal", combine="product", balance_teachers="mean",
                             balance_fused="sinkhorn"),
    "label_model": dict(weighting="equal", combine="label_model", balance_teachers="mean",
                        balance_fused="sinkhorn"),
}


# Per-clip fusion outcome, stored as a small integer and named in STATUS_NAMES.
FUSED, EQUAL_WEIGHTS_SINGLE_DRAW, TEACHER_MISSING, NO_TEACHER = range(4)
STATUS_NAMES = ("fused", "equal_weights_single_draw", "teacher_missing", "no_teacher")


def _is_torch(x) -> bool:
    """Whether ``x`` is a tensor, without importing torch: a tensor exists only once torch is imported, and
    the numpy path (the fusion map's tasks, the fit's holder actors) then stays ~0.4 GB smaller a worker."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


class _Ops:
    """The handful of array operations fusion needs, for numpy or torch alike."""

    def __init__(self, like):
        self.torch = _is_torch(like)
        self.t = sys.modules["torch"] if self.torch else None     # the torch module, on the torch path only
        self.device = like.device if self.torch else None

    def f32(self, x):
        if self.torch:
            return x.to(self.t.float32) if _is_torch(x) else self.t.as_tensor(x, dtype=self.t.float32, device=self.device)
        return np.asarray(x, dtype=np.float32)

    def arange(self, n):
        return self.t.arange(n, device=self.device) if self.torch else np.arange(n)

    def where(self, cond, a, b):
        if self.torch:
            return self.t.where(cond, self.f32(a), self.f32(b))
        return np.where(cond, a, b).astype(np.float32)

    def sum_keep(self, x):
        return x.sum(1, keepdim=True) if self.torch else x.sum(1, keepdims=True)

    def max_keep(self, x):
        return x.max(1, keepdim=True).values if self.torch else x.max(1, keepdims=True)

    def stack(self, xs):
        return self.t.stack(xs, 1) if self.torch else np.stack(xs, 1)

    def exp(self, x):
        return self.t.exp(x) if self.torch else np.exp(x)

    def log(self, x):
        return self.t.log(x) if self.torch else np.log(x)

    def index(self, x):
        return x.long() if self.torch else x

    def no_rows(self, like):
        """An all-False (B,) mask."""
        if self.torch:
            return self.t.zeros(like.shape[0], dtype=self.t.bool, device=self.device)
        return np.zeros(like.shape[0], dtype=bool)

    def to_int(self, x):
        return x.to(self.t.int64) if self.torch else x.astype(np.int64)


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


@dataclass
class FusionFit:
    """The global part of a fusion, fitted once over the whole split and then applied per batch.

    Every vector is (C,) and every list has one entry per teacher. ``None`` means "not used".
    Balancing a distribution p towards the prior is p ⊙ v / <p, v> for a scale vector v: one
    step of it (v = π / mean p) is class-mean balancing, iterating it is Sinkhorn; so the same
    ``rescale`` applies both, to each teacher and to the fused label.
    """

    temperatures: list | None = None       # per teacher, from the dev split (1.0: as given)
    teacher_scales: list | None = None     # per teacher: balancing scale vector v_t
    fused_scale: Any = None                # balancing scale vector of the fused label
    log_confusion: list | None = None      # label model: per teacher (C_true, C_said) log P(said | true)
    log_prior: Any = None                  # label model: (C,) log class prior
    speaker_scales: dict | None = None     # fusion.balance_speakers: {speaker id: scale vector of its labels}
    notes: list = field(default_factory=list)   # what the fit had to work around (a class nobody predicts, …)


def temper(p, temperature: float):
    """p^(1/T), renormalised: T > 1 softens a teacher that is over-confident, T < 1 sharpens."""
    if temperature == 1.0:
        return p
    ops = _Ops(p)
    powered = ops.exp(ops.log(ops.where(p > 0, p, 1e-12)) / temperature)
    return powered / ops.sum_keep(powered)


def rescale(p, scale):
    """p ⊙ v / <p, v> per row (rows that are all zero or NaN stay as they are); v is one (C,) vector
    for every row, or a (B, C) matrix of one per row."""
    if scale is None:
        return p
    ops = _Ops(p)
    scale = ops.f32(scale)
    scaled = p * (scale[None, :] if scale.ndim == 1 else scale)
    norm = ops.sum_keep(scaled)
    return ops.where(norm > 0, scaled / ops.where(norm > 0, norm, 1.0), p)


def padded(fixed_weights, num_teachers: int) -> list[float]:
    """Fixed weights for every teacher: those past the list get 0, so the one-teacher variants
    (``lalm``: [1, 0]) mean the same with extra teachers."""
    return list(fixed_weights) + [0.0] * (num_teachers - len(fixed_weights))


def _present(teachers, fixed_weights=None):
    ops = _Ops(teachers[0].pbar)
    present = ops.stack([ops.f32(t.n) for t in teachers]) > 0
    if fixed_weights is not None:  # a teacher given weight 0 is absent: it must not stand in for another
        present = present & (ops.f32(padded(fixed_weights, len(teachers)))[None, :] > 0)
    return present


def _weights(teachers, present, uncertainty: str, weighting: str, tau: float, eps: float, fixed_weights):
    """Per-clip teacher weights (B, T) summing to 1 over the teachers present, and the U_t used."""
    ops = _Ops(teachers[0].pbar)
    U = ops.stack([getattr(t, uncertainty) for t in teachers])      # (B, T)
    n = ops.stack([ops.f32(t.n) for t in teachers])
    if uncertainty == "mi" and weighting in ("exp", "inverse") and bool((present & (U != U)).any()):
        raise ValueError("uncertainty='mi' needs soft draws from every teacher (LALM logprobs); "
                         "use 'vote_entropy' or enable logprobs")
    U = ops.where(present & (U == U), U, 0.0)
    present_f = ops.f32(present)
    if weighting == "exp":
        logits = ops.where(present, -U / tau, -1e30)
        raw = ops.exp(logits - ops.max_keep(logits))
    elif weighting == "inverse":
        raw = 1.0 / (U + eps)
    elif weighting == "fixed":
        raw = U * 0 + ops.f32(padded(fixed_weights, len(teachers)))[None, :]
    else:                                                            # equal
        raw = present_f
    # a present teacher with one draw has no spread to measure: uncertainty weights fall back to equal
    single = (present & (n < 2)).any(1) if weighting in ("exp", "inverse") else ops.no_rows(present)
    raw = ops.where(single[:, None], present_f, raw * present_f)
    total = ops.sum_keep(raw)
    return raw / ops.where(total > 0, total, 1.0), U, single


def corrected_pbars(teachers, fit: FusionFit | None) -> list:
    """Each teacher's p̄ after its dev-split temperature and its balancing, as the fusion sees it."""
    out = []
    for i, t in enumerate(teachers):
        p = t.pbar
        if fit is not None and fit.temperatures is not None:
            p = temper(p, fit.temperatures[i])
        if fit is not None and fit.teacher_scales is not None:
            p = rescale(p, fit.teacher_scales[i])
        out.append(p)
    return out


def label_model_posterior(pbars, present, log_confusion, log_prior):
    """Dawid–Skene E-step with each teacher's p̄ as one soft vote: log post_k = log ρ_k +
    Σ_t Σ_c p̄_t(c) log P_t(c | k). Counting the teacher's answer *distribution* once, not
    each of its N draws as an independent annotator, keeps a many-draw teacher from
    drowning the other (the plain per-draw EM was measured below the LALM alone)."""
    ops = _Ops(pbars[0])
    logits = ops.f32(log_prior)[None, :] + pbars[0][:, :1] * 0
    for p, logc, here in zip(pbars, log_confusion, [present[:, i] for i in range(present.shape[1])]):
        p = ops.where(here[:, None], ops.where(p == p, p, 0.0), 0.0)
        logits = logits + p @ ops.f32(logc).T
    post = ops.exp(logits - ops.max_keep(logits))
    return post / ops.sum_keep(post)


def fuse(teachers: Sequence[TeacherStats], uncertainty: str = "vote_entropy", weighting: str = "exp",
         tau: float = 0.5, eps: float = 1e-6, fixed_weights: Sequence[float] | None = None,
         sharpen_temperature: float = 1.0, min_confidence: float = 0.0, combine: str = "mean",
         fit: FusionFit | None = None) -> FusionResult:
    """Fuse T teachers' (corrected) mean predictions into the soft label q, per clip.

    weighting: w_t ∝ exp(-U_t/τ) (``exp``, the MI-Fuse paper) or 1/(U_t+ε) (``inverse``) or equal
    or given constants (``fixed``). combine: the weighted mean Σ w_t p̃_t (``mean``), the product
    of experts Π p̃_t^{w_t} (``product``), or the label model's posterior (``label_model``, which
    needs ``fit.log_confusion``). ``fit`` carries the global corrections (dev temperatures, class
    balancing of each teacher and of q); without it this is the paper's per-clip fusion.
    ``fixed_weights`` shorter than the teachers gives the rest weight 0. A teacher with no valid
    draw on a clip gets weight 0 there; where a present teacher has a
    single draw there is no spread to measure and the present teachers share equally.
    """
    if uncertainty not in UNCERTAINTIES:
        raise ValueError(f"uncertainty must be one of {UNCERTAINTIES}, got {uncertainty!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    if weighting == "fixed" and (fixed_weights is None or len(fixed_weights) > len(teachers)):
        raise ValueError("weighting='fixed' needs at most one fixed weight per teacher")
    ops = _Ops(teachers[0].pbar)
    present = _present(teachers, fixed_weights if weighting == "fixed" else None)
    weights, U, single = _weights(teachers, present, uncertainty, weighting, tau, eps, fixed_weights)
    pbars = corrected_pbars(teachers, fit)
    pbar = ops.stack(pbars)                                          # (B, T, C)
    if combine == "label_model":
        if fit is None or fit.log_confusion is None:
            raise ValueError("combine='label_model' needs a fitted label model (fit_fusion)")
        q = label_model_posterior(pbars, present, fit.log_confusion, fit.log_prior)
    elif combine == "product":
        logp = ops.log(ops.where(present[..., None] & (pbar > 0), pbar, 1.0))
        logp = ops.where(present[..., None] & ~(pbar > 0), -30.0, logp)
        logits = (weights[..., None] * logp).sum(1)
        q = ops.exp(logits - ops.max_keep(logits))
        q = q / ops.sum_keep(q)
    else:
        q = (weights[..., None] * ops.where(present[..., None], pbar, 0.0)).sum(1)
    if fit is not None:
        q = rescale(q, fit.fused_scale)
    if sharpen_temperature != 1.0:
        q = temper(q, sharpen_temperature)
    any_present = present.any(1)
    q = ops.where(any_present[:, None], q, float("nan"))
    confident = ops.max_keep(ops.where(any_present[:, None], q, 0.0))[:, 0] >= min_confidence
    clip_weight = ops.f32(any_present & confident)

    status = ops.where(single, float(EQUAL_WEIGHTS_SINGLE_DRAW), float(FUSED))
    status = ops.where(any_present & ~present.all(1), float(TEACHER_MISSING), status)
    status = ops.to_int(ops.where(~any_present, float(NO_TEACHER), status))
    return FusionResult(q=q, weights=weights, uncertainty=U, clip_weight=clip_weight, status=status)


def draw_labels(soft, uniforms):
    """One label per draw, v ~ Categorical(s), by inverse CDF of given uniforms (numpy or torch).

    soft: (B, K, C) distributions; uniforms: (B, K) in [0, 1), derived from per-(clip, pass)
    seeds by the caller so that draws do not depend on batching. The labelling stage draws the
    source teacher's votes with it, training the EMA teacher's: one code path for both.
    """
    if _is_torch(soft):
        float64 = sys.modules["torch"].float64
        cdf = soft.to(float64).cumsum(-1)
        cdf[..., -1] = float("inf")
        return (uniforms.to(cdf.device, float64)[..., None] >= cdf).sum(-1)
    soft = np.asarray(soft, dtype=np.float64)
    cdf = np.cumsum(soft, axis=-1)
    cdf[..., -1] = np.inf
    return (np.asarray(uniforms)[..., None] >= cdf).sum(-1).astype(np.int64)
