"""One interface for every SER model the stages use, and self-describing checkpoints.

A model maps a batch of 16 kHz waveforms with their lengths to logits, and splits into a
deterministic ``trunk`` and a stochastic ``head`` so that MC-dropout can run the trunk once
and sample only the head (``head`` scope) — or repeat the whole network (``full`` scope).
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from ..label_set import DEFAULT_LABELS

CHECKPOINT_META = "mifuse_model.json"
# A head-on-base checkpoint's weights: the layers after the trunk only (``save_head_on_base``).
HEAD_WEIGHTS = "head_weights.pt"
# The column of the labels tables that holds the source model's deterministic trunk output per clip
# (``SERModel.pooled``): a head-only student learns from it without running its frozen trunk again.
TRUNK_FEATURES = "trunk_features"


class SERModel(nn.Module):
    """Base class: subclasses implement ``trunk`` and ``head`` and say how to (re)build themselves."""

    arch: str = "base"

    def __init__(self, labels=DEFAULT_LABELS, sample_rate: int = 16000):
        super().__init__()
        self.labels = list(labels)
        self.sample_rate = sample_rate

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def trunk(self, wav: torch.Tensor, lengths: torch.Tensor) -> Any:
        raise NotImplementedError

    def head(self, features: Any) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, features: Any) -> torch.Tensor:
        """A fixed-size clip embedding from trunk features (for diversity-aware selection)."""
        raise NotImplementedError

    def head_modules(self) -> list[nn.Module]:
        """Dropout modules that act inside ``head``: the ones sampled in ``head`` scope."""
        from .mc import dropout_modules
        return dropout_modules(self.head_module())

    def head_module(self) -> nn.Module:
        raise NotImplementedError

    def head_layers(self) -> list[nn.Module]:
        """The layers after the trunk: what ``train.trainable head`` trains and what learns at
        ``train.head_lr``; the last ``nn.Linear`` in them is the classifier SHOT-IM keeps."""
        return [self.head_module()]

    def frames(self, features: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame-level features (B, T, D) and their validity mask (B, T), for CKA distillation."""
        raise NotImplementedError

    # -- a trunk run once per clip (train.features stored) ----------------------------------
    stores_trunk: bool = False      # True where ``pooled`` and ``features_from_pooled`` are implemented

    def pooled(self, features: Any) -> torch.Tensor:
        """The fixed-size (B, D) trunk output that is all the head reads: what a head-only student
        can learn from once stored, instead of running the frozen trunk every step."""
        raise NotImplementedError

    def features_from_pooled(self, pooled: torch.Tensor) -> Any:
        """The trunk features ``head`` and ``embed`` take, rebuilt from stored ``pooled`` vectors."""
        raise NotImplementedError

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor, return_frames: bool = False):
        """Logits; with ``return_frames`` also ``frames(...)``, from the same pass (one DDP forward)."""
        features = self.trunk(wav, lengths)
        logits = self.head(features)
        return (logits, *self.frames(features)) if return_frames else logits

    # -- checkpoints ---------------------------------------------------------------------
    def arch_config(self) -> dict:
        raise NotImplementedError

    def save(self, directory: str, extra: dict | None = None) -> None:
        raise NotImplementedError


class OnStoredTrunk(nn.Module):
    """``model`` fed its trunk's stored output: ``forward(pooled, lengths)`` is ``model.head`` on it.

    A head-only student never changes its trunk, so the trunk's output on a clean clip is the same
    every epoch; the source stage stores it once (``TRUNK_FEATURES``) and the
    student's steps, its EMA teacher's MC passes and its dev scores read it from here. It shares
    ``model``'s parameters (what is trained and checkpointed is ``model``, a full network), and it
    has the interface ``mc_predict`` uses, so head-scope MC dropout works on it unchanged."""

    def __init__(self, model: SERModel):
        super().__init__()
        if not model.stores_trunk:
            raise ValueError(f"a {model.arch} model cannot be fed stored trunk features")
        self.model = model

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def trunk(self, pooled: torch.Tensor, lengths: torch.Tensor | None = None) -> Any:
        return self.model.features_from_pooled(pooled)

    def head(self, features: Any) -> torch.Tensor:
        return self.model.head(features)

    def embed(self, features: Any) -> torch.Tensor:
        return self.model.embed(features)

    def head_modules(self) -> list[nn.Module]:
        return self.model.head_modules()

    def pooled(self, features: Any) -> torch.Tensor:
        return self.model.pooled(features)

    def forward(self, pooled: torch.Tensor, lengths: torch.Tensor | None = None, return_frames: bool = False):
        if return_frames:
            raise ValueError("stored trunk features have no frames (CKA distillation needs train.features waveform)")
        return self.head(self.trunk(pooled))


def repeat_features(features: Any, k: int) -> Any:
    """Repeat trunk features K times along the batch, clip-major (row b*K + k)."""
    if isinstance(features, torch.Tensor):
        return features.repeat_interleave(k, dim=0)
    if isinstance(features, (tuple, list)):
        return type(features)(repeat_features(f, k) for f in features)
    if isinstance(features, dict):
        return {key: repeat_features(v, k) for key, v in features.items()}
    raise TypeError(f"cannot repeat features of type {type(features)}")


def save_transformers(directory: str, hf_model: nn.Module, meta: dict) -> None:
    """A transformers model's own files (``save_pretrained``) with this project's meta beside them."""
    os.makedirs(directory, exist_ok=True)
    hf_model.save_pretrained(directory)
    write_meta(directory, meta)


def head_state(model: SERModel) -> dict[str, torch.Tensor]:
    """The state-dict entries of ``model.head_layers()``: every weight a head-only student learns."""
    heads = {id(layer) for layer in model.head_layers()}
    prefixes = [name for name, module in model.named_modules() if id(module) in heads]
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()
            if any(key.startswith(prefix + ".") for prefix in prefixes)}


def save_head_on_base(model: SERModel, directory: str, base_dir: str) -> None:
    """Only ``model``'s head, and the checkpoint ``base_dir`` whose trunk it sits on, unchanged.

    Why: a head-only student on the stored trunk output never runs or moves its trunk, yet a whole
    checkpoint repeats it: with Whisper base, 160 MB for the student and its EMA at every epoch's
    report, 2.2 GB kept per paper-scale benchmark cell for six students. The caller vouches that the trunk
    is the base's (``train/checkpoint.py`` does it only for a run on the stored trunk output);
    a weight that can learn outside the head is refused here, since it would be lost."""
    learning = [name for name, p in model.named_parameters() if p.requires_grad]
    state = head_state(model)
    outside = [name for name in learning if name not in state]
    if outside:
        raise ValueError(f"cannot save only the head: {outside[0]} learns outside it; save the whole model")
    os.makedirs(directory, exist_ok=True)
    torch.save(state, os.path.join(directory, HEAD_WEIGHTS))
    write_meta(directory, {"arch": "head_on_base", "base": os.path.abspath(base_dir), "labels": model.labels})


def _load_head_on_base(directory: str, meta: dict, labels=None) -> SERModel:
    base_dir = meta["base"]
    if not os.path.isdir(base_dir):
        raise FileNotFoundError(f"{directory} holds a head for the model at {base_dir}, which is not there; "
                                "put that checkpoint back at that path")
    model = load_model(base_dir, labels=meta.get("labels", labels))
    state = torch.load(os.path.join(directory, HEAD_WEIGHTS), weights_only=True)
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{directory}'s head does not fit the model at {base_dir} ({wrong[0]})")
    model.load_state_dict(state, strict=False)
    return model.eval()


def write_meta(directory: str, meta: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CHECKPOINT_META), "w") as fh:
        json.dump(meta, fh, indent=2)


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, CHECKPOINT_META)
    if not os.path.exists(path):
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"checkpoint not found: {directory}")
        if os.path.exists(os.path.join(directory, "config.json")):
            return {"arch": "hf"}  # a plain transformers directory
        raise FileNotFoundError(f"{directory} is not a model checkpoint (no {CHECKPOINT_META} or config.json)")
    with open(path) as fh:
        return json.load(fh)


def load_model(directory: str, dropout_override: float | None = None, labels=None) -> SERModel:
    """Load any checkpoint this project writes (or a transformers audio classifier directory)."""
    meta = read_meta(directory)
    if meta["arch"] == "cnn":
        from .cnn import LogMelCNN
        model = LogMelCNN.load(directory, meta)
    elif meta["arch"] == "hf":
        from .hf import HFAudioClassifier
        model = HFAudioClassifier.load(directory, meta, labels=labels)
    elif meta["arch"] == "whisper":
        from .whisper import WhisperSER
        model = WhisperSER.load(directory, meta, labels=labels)
    elif meta["arch"] == "head_on_base":
        model = _load_head_on_base(directory, meta, labels=labels)
    elif meta["arch"] in ("hf_lora", "whisper_lora"):
        from .lora import HFLoRAClassifier, WhisperLoRA
        wrapper = HFLoRAClassifier if meta["arch"] == "hf_lora" else WhisperLoRA
        model = wrapper.load(directory, meta, labels=labels)
    else:
        raise ValueError(f"unknown model arch {meta['arch']!r} in {directory}")
    if dropout_override is not None:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = dropout_override
    return model

