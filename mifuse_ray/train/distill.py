"""Distillation losses (docs/method.md §6): logit KL with temperature, and attention-weighted CKA.

CKA compares representations of different widths without a projection layer. Frames are
aligned to a common rate first, and CKA is computed over all of a batch's frames together
(with fewer frames than dimensions it is biased upwards).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """T² · KL(softmax(t/T) || softmax(s/T)), the teacher detached."""
    t = F.log_softmax(teacher_logits.detach().float() / temperature, -1)
    s = F.log_softmax(student_logits.float() / temperature, -1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2


def weighted_cka(X: torch.Tensor, Y: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """CKA_a(X, Y) = ‖Y_cᵀ D X_c‖²_F / (‖X_cᵀ D X_c‖_F ‖Y_cᵀ D Y_c‖_F), D = diag(a), Σa = 1.

    X: (n, d1), Y: (n, d2) frames × features; weights a: (n,) ≥ 0 (uniform when None → linear CKA).
    """
    n = X.shape[0]
    a = torch.full((n,), 1.0 / n, dtype=torch.float64, device=X.device) if weights is None \
        else weights.to(torch.float64) / weights.to(torch.float64).sum()
    X, Y = X.to(torch.float64), Y.to(torch.float64)
    Xc = X - (a[:, None] * X).sum(0, keepdim=True)
    Yc = Y - (a[:, None] * Y).sum(0, keepdim=True)
    cross = (Yc * a[:, None]).T @ Xc
    xx = (Xc * a[:, None]).T @ Xc
    yy = (Yc * a[:, None]).T @ Yc
    return (cross ** 2).sum() / (torch.linalg.norm(xx) * torch.linalg.norm(yy)).clamp_min(1e-12)


def align_frames(feats: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, T, D) → (B, frames, D) by linear interpolation along time."""
    return F.interpolate(feats.transpose(1, 2), size=frames, mode="linear", align_corners=False).transpose(1, 2)


def cka_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor, frame_weights: torch.Tensor | None = None
             ) -> torch.Tensor:
    """1 − CKA over the whole batch's frames; teacher detached, frame rates aligned to the student's."""
    B, T, _ = student_feats.shape
    teacher = align_frames(teacher_feats.detach().float(), T)
    w = None if frame_weights is None else frame_weights.reshape(B * T)
    return 1.0 - weighted_cka(student_feats.reshape(B * T, -1), teacher.reshape(B * T, -1), w).to(student_feats.dtype)


def frame_attention(teacher_frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) frame weights: a softmax over each clip's valid frames of the teacher's frame-feature
    norms (the frames the teacher responds to most), each clip summing to 1 so that long clips do
    not dominate. The models pool with a mean, not attention, so the norm stands in for it."""
    score = teacher_frames.detach().float().norm(dim=-1)
    score = score.masked_fill(mask <= 0, float("-inf"))
    return torch.softmax(score, dim=1)


def distill_terms(student_logits, student_frames, student_mask, teacher_logits, teacher_frames, teacher_mask,
                  kl_weight: float, temperature: float, cka_weight: float) -> dict[str, torch.Tensor]:
    """The optional loss terms (each already weighted) for one batch."""
    terms = {}
    if kl_weight > 0:
        terms["distill_kl"] = kl_weight * logit_kl(student_logits, teacher_logits, temperature)
    if cka_weight > 0:
        T = student_frames.shape[1]
        mask = student_mask.float()
        teacher = align_frames(teacher_frames.detach().float(), T)
        weights = frame_attention(teacher, mask) * (align_frames(teacher_mask.float()[..., None], T)[..., 0] > 0.5)
        terms["cka"] = cka_weight * cka_loss(student_frames.float(), teacher, weights)
    return terms
