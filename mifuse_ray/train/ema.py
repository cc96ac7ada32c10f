"""The EMA teacher (docs/method.md §4): fp32 shadow weights, warm-up decay, buffers copied."""
from __future__ import annotations

import copy

import torch
from torch import nn


def decay_from_half_life(half_life_epochs: float, steps_per_epoch: int) -> float:
    """α such that the weight of the current parameters halves after ``half_life_epochs`` epochs."""
    return 0.5 ** (1.0 / max(1.0, half_life_epochs * steps_per_epoch))


def ema_decay_at(step: int, alpha: float) -> float:
    """α_t = min(α, (1+t)/(10+t)): early steps move the EMA instead of freezing it at the source."""
    return min(alpha, (1.0 + step) / (10.0 + step))


class EMATeacher:
    def __init__(self, model: nn.Module, alpha: float):
        self.model = copy.deepcopy(model).float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.alpha = alpha

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        a = ema_decay_at(step, self.alpha)
        for e, s in zip(self.model.parameters(), student.parameters()):
            # A frozen weight's average is itself, and the copy made at the start holds it already:
            # averaging it would add rounding, and copying it every step cost 7 ms a step on a frozen
            # 21M-parameter trunk (Whisper base), against 0.1 ms without.
            if s.requires_grad:
                e.mul_(a).add_(s.detach().float(), alpha=1.0 - a)
        for e, s in zip(self.model.buffers(), student.buffers()):
            e.copy_(s)
        return a
