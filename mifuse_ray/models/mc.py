"""Monte-Carlo dropout with per-(clip, pass) seeds.

Only ``nn.Dropout`` modules are made stochastic; normalisation stays in eval mode (and
``transformers`` models keep SpecAugment and LayerDrop off, which ``model.train()`` would
switch on). Masks come from a counter-based hash of (row seed, layer, element), so a clip's
pass k gets the same mask whatever batch it sits in, on CPU or GPU, batched or looped.

Deterministic and MC-dropout predictions for a batch, in ``head`` or ``full`` scope.

``head`` scope runs the deterministic trunk once and samples only the dropout layers of the
head K times: cheap, but it measures only the head's uncertainty. ``full`` scope samples
every dropout layer, so the uncertainty covers the whole network, at K forward passes' cost
(batched as K repeats of the batch, or looped K times; the masks are identical either way).
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from .base import SERModel, repeat_features

_M1 = -49064778989728563     # 0xff51afd7ed558ccd as a signed int64
_M2 = -4265267296055464877   # 0xc4ceb9fe1a85ec53 as a signed int64
_LOW31 = (1 << 31) - 1


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 64-bit finaliser on int64 tensors (wrapping multiply, logical shifts)."""
    x = x ^ ((x >> 33) & _LOW31)
    x = x * _M1
    x = x ^ ((x >> 33) & _LOW31)
    x = x * _M2
    return x ^ ((x >> 33) & _LOW31)


def hashed_uniform(row_seeds: torch.Tensor, layer: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform [0, 1) numbers of shape (rows, *shape), a pure function of (row seed, layer, index)."""
    numel = 1
    for s in shape:
        numel *= s
    idx = torch.arange(numel, device=row_seeds.device, dtype=torch.int64)
    x = _mix64(row_seeds[:, None] * 1000003 + layer * 7919) ^ idx[None, :]
    x = _mix64(x)
    u = ((x >> 11) & ((1 << 53) - 1)).to(torch.float64) / float(1 << 53)
    return u.to(torch.float32).reshape(len(row_seeds), *shape)


def mc_seed(base_seed: int, clip_id: str, pass_index: int) -> int:
    """A 62-bit seed for one (clip, MC pass), stable across processes and machines."""
    digest = hashlib.blake2b(f"{base_seed}|{clip_id}|{pass_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def mc_seeds(base_seed: int, clip_ids, passes: int) -> torch.Tensor:
    """(B, K) int64 seeds, clip-major."""
    return torch.tensor([[mc_seed(base_seed, c, k) for k in range(passes)] for c in clip_ids], dtype=torch.int64)


@contextlib.contextmanager
def mc_dropout(model: nn.Module, row_seeds: torch.Tensor | None, p_override: float | None = None,
               modules: list[nn.Module] | None = None):
    """Inside the block the model's ``nn.Dropout`` modules sample seeded masks; all else is eval.

    ``row_seeds`` (one per batch row) fix each row's masks; ``None`` leaves dropout off, which
    gives the deterministic prediction. ``modules`` restricts MC to a subset (head scope).
    """
    was_training = model.training
    model.eval()
    targets = modules if modules is not None else [m for m in model.modules() if isinstance(m, nn.Dropout)]
    saved = []
    try:
        if row_seeds is not None:
            for layer, module in enumerate(targets):
                p = module.p if p_override is None else p_override
                saved.append((module, module.forward))
                module.forward = _seeded_forward(p, layer, row_seeds)
        yield
    finally:
        for module, forward in saved:
            module.forward = forward
        model.train(was_training)


def _seeded_forward(p: float, layer: int, row_seeds: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if p <= 0.0:
            return x
        if x.shape[0] != len(row_seeds):
            raise RuntimeError(f"MC dropout got {x.shape[0]} rows but {len(row_seeds)} seeds")
        keep = hashed_uniform(row_seeds.to(x.device), layer, tuple(x.shape[1:])) >= p
        return x * keep.to(x.dtype) / (1.0 - p)
    return forward


def dropout_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.Dropout)]


# -- predictions: deterministic and K MC passes in one call -----------------------------------
SCOPES = ("head", "full")


@dataclass
class MCOutput:
    probs: torch.Tensor        # (B, K, C) MC-dropout distributions
    det_probs: torch.Tensor    # (B, C) deterministic prediction (dropout off)
    embedding: torch.Tensor    # (B, E) clip embedding
    pooled: torch.Tensor | None = None   # (B, D) the deterministic trunk output the head reads (SERModel.pooled)


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
        pooled = model.pooled(features) if getattr(model, "stores_trunk", False) else None
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
    return MCOutput(probs=probs, det_probs=torch.softmax(det_logits.float(), -1), embedding=embedding.float(),
                    pooled=pooled.float() if pooled is not None else None)
