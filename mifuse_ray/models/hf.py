"""`transformers` audio classifiers (wav2vec2 / HuBERT / WavLM) behind the SERModel interface.

Loaded with ``AutoModelForAudioClassification.from_pretrained`` from a local directory. As a
teacher the model stays in eval mode — ``model.train()`` would switch on SpecAugment masking and
LayerDrop — and MC-dropout flips only the ``nn.Dropout`` modules (see ``mc.py``). As a student,
a head-only one (the default) keeps its trunk in eval mode too; one that trains its whole network
(``train.trainable all``) is put in train mode, SpecAugment and LayerDrop included, as transformers
fine-tuning is (``train/student.py``, ``_train_mode``).
"""
from __future__ import annotations


import torch
from torch import nn

from .base import SERModel, save_transformers


class HFAudioClassifier(SERModel):
    arch = "hf"

    def __init__(self, hf_model: nn.Module, labels, sample_rate: int = 16000, normalize: bool = True,
                 head_dropout: float | None = None):
        super().__init__(labels, sample_rate)
        self.model = hf_model
        self.normalize = normalize
        cfg = hf_model.config
        p = head_dropout if head_dropout is not None else float(getattr(cfg, "final_dropout", 0.0) or 0.0)
        # Dropout on the frame features before the projector: what `head` scope samples.
        self.head_dropout = nn.Dropout(p)

    def _attention_mask(self, wav, lengths):
        return (torch.arange(wav.shape[1], device=wav.device)[None, :] < lengths[:, None]).long()

    def trunk(self, wav: torch.Tensor, lengths: torch.Tensor) -> dict:
        mask = self._attention_mask(wav, lengths)
        if self.normalize:  # the zero-mean unit-variance step of Wav2Vec2FeatureExtractor, per clip
            m = mask.to(wav.dtype)
            n = m.sum(1, keepdim=True).clamp_min(1)
            mean = (wav * m).sum(1, keepdim=True) / n
            var = ((wav - mean) ** 2 * m).sum(1, keepdim=True) / n
            wav = (wav - mean) / torch.sqrt(var + 1e-7) * m
        base = getattr(self.model, self.model.base_model_prefix)
        hidden = base(wav, attention_mask=mask).last_hidden_state
        frame_mask = base._get_feature_vector_attention_mask(hidden.shape[1], mask)
        return {"hidden": hidden, "frame_mask": frame_mask}

    def head_module(self) -> nn.Module:
        return self.head_dropout

    def head_layers(self) -> list[nn.Module]:
        return [self.head_dropout, self.model.projector, self.model.classifier]

    def _pool(self, features: dict, dropout: bool) -> torch.Tensor:
        hidden = features["hidden"]
        if dropout:
            hidden = self.head_dropout(hidden)
        hidden = self.model.projector(hidden)
        m = features["frame_mask"].to(hidden.dtype)[..., None]
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)

    def head(self, features: dict) -> torch.Tensor:
        return self.model.classifier(self._pool(features, dropout=True))

    def embed(self, features: dict) -> torch.Tensor:
        return self._pool(features, dropout=False)

    def frames(self, features: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return features["hidden"], features["frame_mask"]

    def save(self, directory: str, extra: dict | None = None) -> None:
        save_transformers(directory, self.model, {"arch": self.arch, "labels": self.labels, "sample_rate": self.sample_rate,
                                                  "normalize": self.normalize, "head_dropout": self.head_dropout.p,
                                                  **(extra or {})})

    @classmethod
    def load(cls, directory: str, meta: dict, labels=None) -> "HFAudioClassifier":
        from transformers import AutoModelForAudioClassification
        model = AutoModelForAudioClassification.from_pretrained(directory)
        model.eval()
        cfg = model.config
        if "labels" in meta:
            names = meta["labels"]
        elif labels is not None:
            names = list(labels)
        else:
            names = [cfg.id2label[i] for i in range(cfg.num_labels)]
        if len(names) != cfg.num_labels:
            raise ValueError(f"{directory}: {len(names)} labels but the classifier has {cfg.num_labels} outputs")
        return cls(model, names, sample_rate=meta.get("sample_rate", 16000), normalize=meta.get("normalize", True),
                   head_dropout=meta.get("head_dropout")).eval()
