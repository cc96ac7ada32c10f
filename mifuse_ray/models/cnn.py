"""A small log-mel CNN classifier that trains on a CPU in a minute or two on the demo."""
from __future__ import annotations

import os

import torch
import torchaudio
from safetensors.torch import load_file, save_file
from torch import nn

from ..label_set import DEFAULT_LABELS
from .base import SERModel, write_meta


class _ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, dropout: float):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Dropout(dropout))


class LogMelCNN(SERModel):
    """Log-mel → 4 conv blocks (each with dropout) → masked mean+std pooling → MLP head with dropout."""

    arch = "cnn"

    def __init__(self, labels=DEFAULT_LABELS, sample_rate: int = 16000, n_mels: int = 64,
                 channels=(16, 32, 48, 64), conv_dropout: float = 0.1, head_dropout: float = 0.3,
                 embed_dim: int = 128, normalize: str = "none",
                 log_floor: float = 1e-2):
        super().__init__(labels, sample_rate)
        self.config = dict(n_mels=n_mels, channels=list(channels), conv_dropout=conv_dropout,
                           head_dropout=head_dropout, embed_dim=embed_dim, normalize=normalize,
                           log_floor=log_floor)
        self.hop = sample_rate // 100
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=sample_rate // 40, hop_length=self.hop, n_mels=n_mels,
            f_min=50.0, f_max=sample_rate / 2)
        blocks, c_in = [], 1
        for c in channels:
            blocks.append(_ConvBlock(c_in, c, conv_dropout))
            c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.pool_factor = 2 ** len(channels)
        # Dropout → embedding (Linear+ReLU) → dropout → classifier: the part sampled in `head` scope.
        self.head_net = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(2 * c_in, embed_dim), nn.ReLU(),
                                      nn.Dropout(head_dropout), nn.Linear(embed_dim, len(self.labels)))

    def trunk(self, wav: torch.Tensor, lengths: torch.Tensor) -> dict:
        with torch.autocast(device_type=wav.device.type, enabled=False):
            spec = self.melspec(wav.float())
        logmel = torch.log(spec + self.config["log_floor"])                         # (B, mels, frames)
        valid = (torch.arange(logmel.shape[-1], device=wav.device)[None, :] <= lengths[:, None] // self.hop)
        valid = valid.to(logmel.dtype)[:, None, :]
        n_valid = valid.sum(-1, keepdim=True).clamp_min(1)
        if self.config["normalize"] == "utterance":   # remove the recording gain: one offset per clip
            offset = (logmel * valid).sum((-1, -2), keepdim=True) / (n_valid * logmel.shape[1])
            logmel = (logmel - offset) * valid
        elif self.config["normalize"] == "cmn":       # per-band mean: also removes static channel colour
            logmel = (logmel - (logmel * valid).sum(-1, keepdim=True) / n_valid) * valid
        x = self.blocks(logmel.unsqueeze(1) / 5.0).mean(dim=2)  # (B, C, T')
        frames = torch.clamp((lengths // self.hop + 1) // self.pool_factor, min=1, max=x.shape[-1])
        mask = (torch.arange(x.shape[-1], device=x.device)[None, :] < frames[:, None]).to(x.dtype)
        n = mask.sum(1, keepdim=True)
        mean = (x * mask[:, None]).sum(-1) / n
        var = ((x - mean[..., None]) ** 2 * mask[:, None]).sum(-1) / n
        pooled = torch.cat([mean, torch.sqrt(var + 1e-5)], dim=1)  # (B, 2C) pooled statistics
        return {"pooled": pooled, "frames": x.transpose(1, 2), "frame_mask": mask}

    def head_module(self) -> nn.Module:
        return self.head_net

    def head(self, features: dict) -> torch.Tensor:
        return self.head_net(features["pooled"])

    def embed(self, features: dict) -> torch.Tensor:
        return self.head_net[2](self.head_net[1](features["pooled"]))

    def frames(self, features: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return features["frames"], features["frame_mask"]

    stores_trunk = True

    def pooled(self, features: dict) -> torch.Tensor:
        return features["pooled"]

    def features_from_pooled(self, pooled: torch.Tensor) -> dict:
        return {"pooled": pooled}

    def arch_config(self) -> dict:
        return dict(self.config)

    def save(self, directory: str, extra: dict | None = None) -> None:
        write_meta(directory, {"arch": self.arch, "labels": self.labels, "sample_rate": self.sample_rate,
                               "config": self.arch_config(), **(extra or {})})
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, "model.safetensors"))

    @classmethod
    def load(cls, directory: str, meta: dict) -> "LogMelCNN":
        model = cls(labels=meta["labels"], sample_rate=meta["sample_rate"], **meta["config"])
        model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
        return model.eval()
