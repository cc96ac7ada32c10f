"""LoRA students for `transformers` backbones (``peft``): one small adapter per target domain.

The base model stays frozen and is stored once; an adapted student is its LoRA matrices plus the
projector and classifier head (``modules_to_save``), a few percent of the weights. The student
directory names the base checkpoint it applies to, and ``load_model`` rebuilds base + adapter.
"""
from __future__ import annotations

import os

from torch import nn

from .base import read_meta, write_meta
from .hf import HFAudioClassifier

HEAD_MODULES = ["projector", "classifier"]


class HFLoRAClassifier(HFAudioClassifier):
    arch = "hf_lora"

    def __init__(self, peft_model: nn.Module, labels, base_dir: str, sample_rate: int = 16000,
                 normalize: bool = True, head_dropout: float | None = None):
        super().__init__(peft_model, labels, sample_rate, normalize, head_dropout)
        self.base_dir = os.path.abspath(base_dir)

    def save(self, directory: str, extra: dict | None = None) -> None:
        os.makedirs(directory, exist_ok=True)
        self.model.save_pretrained(directory)           # adapter_config.json + adapter_model.safetensors only
        write_meta(directory, {"arch": self.arch, "base": self.base_dir, "labels": self.labels,
                               "sample_rate": self.sample_rate, "normalize": self.normalize,
                               "head_dropout": self.head_dropout.p, **(extra or {})})

    @classmethod
    def load(cls, directory: str, meta: dict, labels=None) -> "HFLoRAClassifier":
        from peft import PeftModel
        base_dir = meta["base"]
        if not os.path.isdir(base_dir):
            raise FileNotFoundError(f"{directory} is a LoRA adapter for {base_dir}, which is not there; "
                                    "put the base checkpoint back at that path")
        base = HFAudioClassifier.load(base_dir, read_meta(base_dir), labels=meta.get("labels", labels))
        peft_model = PeftModel.from_pretrained(base.model, directory)
        peft_model.eval()
        return cls(peft_model, meta.get("labels", base.labels), base_dir, meta.get("sample_rate", base.sample_rate),
                   meta.get("normalize", base.normalize), meta.get("head_dropout")).eval()


def apply_lora(model: nn.Module, base_dir: str, rank: int, alpha: float, target_modules,
               dropout: float = 0.0) -> HFLoRAClassifier:
    """Wrap a loaded ``HFAudioClassifier``: LoRA on ``target_modules``, head trainable, rest frozen."""
    if type(model) is not HFAudioClassifier:
        raise ValueError(f"train.lora_rank needs a transformers backbone as the source model, got {model.arch!r}")
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        modules_to_save=HEAD_MODULES)
    peft_model = get_peft_model(model.model, config)
    return HFLoRAClassifier(peft_model, model.labels, base_dir, model.sample_rate, model.normalize,
                            model.head_dropout.p)


def trainable_fraction(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
