"""Student losses (docs/method.md §4) as pure tensor functions."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_label_kl(q: torch.Tensor, logits: torch.Tensor, clip_weight: torch.Tensor) -> torch.Tensor:
    """(1/Σc) Σ c(x) KL(q(x) || p_θ(x)); rows with c = 0 (or no valid q) do not count."""
    logp = F.log_softmax(logits.float(), -1)
    q = torch.nan_to_num(q.float(), nan=0.0)
    kl = (torch.where(q > 0, q * (torch.log(q.clamp_min(1e-12)) - logp), torch.zeros_like(q))).sum(-1)
    return _clip_weighted_mean(kl, clip_weight)


def soft_label_gce(q: torch.Tensor, logits: torch.Tensor, clip_weight: torch.Tensor, k: float) -> torch.Tensor:
    """(1/Σc) Σ c(x) Σ_y q_y(x) (1 − p_θ(y|x)^k) / k: the generalised cross-entropy (Zhang & Sabuncu, 2018)
    of the soft label, for labels that are often wrong.

    Why: its gradient is the cross-entropy's times p_θ(y|x)^k, so a label the student has come to
    disagree with pulls less than one it agrees with: the student's own view of a clip weighs against
    memorising a wrong label. k → 0 is the cross-entropy (the KL up to a constant), k = 1 the mean
    absolute error."""
    p = F.softmax(logits.float(), -1)
    q = torch.nan_to_num(q.float(), nan=0.0)
    return _clip_weighted_mean((q * (1.0 - p.clamp_min(1e-12) ** k) / k).sum(-1), clip_weight)


def _clip_weighted_mean(per_clip: torch.Tensor, clip_weight: torch.Tensor) -> torch.Tensor:
    """(1/Σc) Σ c(x) · per_clip(x): clips with c = 0 do not count (0 when none counts)."""
    return (clip_weight * per_clip).sum() / clip_weight.sum().clamp_min(1e-8)


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over DDP ranks that keeps the local gradient path (other ranks enter as constants)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    summed = x.detach().clone()
    dist.all_reduce(summed)
    return (summed - x.detach() + x) / dist.get_world_size()


def diversity_kl(probs: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """KL(p̂ || π), p̂ the mean prediction over the global batch."""
    p_hat = global_mean(probs.float().mean(0))
    return (p_hat * (torch.log(p_hat.clamp_min(1e-12)) - torch.log(prior.clamp_min(1e-12)))).sum()


def information_maximization(logits: torch.Tensor) -> torch.Tensor:
    """SHOT-IM: mean per-clip entropy minus the entropy of the mean prediction."""
    p = F.softmax(logits.float(), -1)
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
    p_hat = global_mean(p.mean(0))
    return ent + (p_hat * torch.log(p_hat.clamp_min(1e-12))).sum()
