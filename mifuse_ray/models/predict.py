"""Deterministic and MC-dropout predictions for a batch, in ``head`` or ``full`` scope.

``head`` scope runs the deterministic trunk once and samples only the dropout layers of the
head K times: cheap, but it measures only the head's uncertainty. ``full`` scope samples
every dropout layer, so the uncertainty covers the whole network, at K forward passes' cost
(batched as K repeats of the batch, or looped K times; the masks are identical either way).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .base import SERModel, repeat_features
from .mc import mc_dropout

SCOPES = ("head", "full")


@dataclass
class MCOutput:
    probs: torch.Tensor        # (B, K, C) MC-dropout distributions
    det_probs: torch.Tensor    # (B, C) deterministic prediction (dropout off)
    embedding: torch.Tensor    # (B, E) clip embedding


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def mc_predict(model: SERModel, wav: torch.Tensor, lengths: torch.Tensor, row_seeds: torch.Tensor,
               scope: str = "head", p_override: float | None = None, amp: bool = False,
               full_strategy: str = "auto") -> MCOutput:
    """row_seeds: (B, K) int64, one seed per (clip, pass). K = 0 gives only the deterministic pass.

    ``full_strategy``: "batched" repeats the batch K times (fastest on a GPU), "loop" runs K passes
    (faster on a CPU, measured in benchmarks/mc_dropout.py), "auto" picks by device.
    """
    if scope not in SCOPES:
        raise ValueError(f"mc scope must be one of {SCOPES}, got {scope!r}")
    model.eval()
    B, K = row_seeds.shape
    with _autocast(wav.device, amp):
        features = model.trunk(wav, lengths)
        det_logits = model.head(features)
        embedding = model.embed(features)
        if K == 0:
            logits = det_logits[:, None, :0]
        elif scope == "head":
            with mc_dropout(model, row_seeds.reshape(-1), p_override, modules=model.head_modules()):
                logits = model.head(repeat_features(features, K))
        elif full_strategy == "batched" or (full_strategy == "auto" and wav.device.type == "cuda"):
            with mc_dropout(model, row_seeds.reshape(-1), p_override):
                logits = model(wav.repeat_interleave(K, 0), lengths.repeat_interleave(K, 0))
        else:
            per_pass = []
            for k in range(K):
                with mc_dropout(model, row_seeds[:, k].contiguous(), p_override):
                    per_pass.append(model(wav, lengths))
            logits = torch.stack(per_pass, 1).reshape(B * K, -1)
    probs = torch.softmax(logits.float(), -1).reshape(B, K, -1) if K else torch.zeros(B, 0, model.num_classes)
    return MCOutput(probs=probs, det_probs=torch.softmax(det_logits.float(), -1), embedding=embedding.float())
