"""LoRA students for `transformers` backbones (``peft``): one small adapter per target domain.

The base model stays frozen and is stored once; an adapted student is its LoRA matrices plus the
projector and classifier head (``modules_to_save``), a few percent of the weights. The student
directory names the base checkpoint it applies to, and ``load_model`` rebuilds base + adapter.
Both transformers families the project loads take one: the wav2vec2 family (``hf``) and the
Whisper encoders (``whisper``; its attention's ``q_proj``/``v_proj`` are the default targets).
"""
from __future__ import annotations

import os

from torch import nn

from .base import SERModel, save_transformers
from .hf import HFAudioClassifier
from .whisper import WhisperSER

HEAD_MODULES = ["projector", "classifier"]


class _Adapter:
    """What both LoRA students share: ``self.model`` is a ``PeftModel`` over the base's transformers
    model, saved alone (adapter_config.json + adapter_model.safetensors), the base named in the meta."""

    base_dir: str

    def save(self, directory: str, extra: dict | None = None) -> None:
        save_transformers(directory, self.model, {**self.base_meta(), "arch": self.arch, "base": self.base_dir,
                                                  "labels": self.labels, "head_dropout": self.head_dropout.p,
                                                  **(extra or {})})

    @classmethod
    def load(cls, directory: str, meta: dict, labels=None) -> SERModel:
        from peft import PeftModel
        from .base import load_model
        base_dir = meta["base"]
        if not os.path.isdir(base_dir):
            raise FileNotFoundError(f"{directory} is a LoRA adapter for {base_dir}, which is not there; "
                                    "put the base checkpoint back at that path")
        base = load_model(base_dir, labels=meta.get("labels", labels))
        return cls.around(base, PeftModel.from_pretrained(base.model, directory).eval(), base_dir).eval()


class HFLoRAClassifier(_Adapter, HFAudioClassifier):
    arch = "hf_lora"

    def __init__(self, peft_model: nn.Module, labels, base_dir: str, sample_rate: int = 16000,
                 normalize: bool = True, head_dropout: float | None = None):
        super().__init__(peft_model, labels, sample_rate, normalize, head_dropout)
        self.base_dir = os.path.abspath(base_dir)

    def base_meta(self) -> dict:
        return {"sample_rate": self.sample_rate, "normalize": self.normalize}

    @classmethod
    def around(cls, base: HFAudioClassifier, peft_model: nn.Module, base_dir: str) -> "HFLoRAClassifier":
        return cls(peft_model, base.labels, base_dir, base.sample_rate, base.normalize, base.head_dropout.p)


class WhisperLoRA(_Adapter, WhisperSER):
    arch = "whisper_lora"
    stores_trunk = False            # its encoder learns: a stored output of the base's would be stale

    def __init__(self, peft_model: nn.Module, labels, base_dir: str, head_dropout: float, encoder_name: str):
        super().__init__(peft_model, labels, head_dropout, encoder_name)
        self.base_dir = os.path.abspath(base_dir)

    def base_meta(self) -> dict:
        return {"encoder": self.encoder_name}

    @classmethod
    def around(cls, base: WhisperSER, peft_model: nn.Module, base_dir: str) -> "WhisperLoRA":
        return cls(peft_model, base.labels, base_dir, base.head_dropout.p, base.encoder_name)


def apply_lora(model: nn.Module, base_dir: str, rank: int, alpha: float, target_modules,
               dropout: float = 0.0) -> SERModel:
    """Wrap a loaded transformers source model: LoRA on ``target_modules``, head trainable, rest frozen."""
    wrapper = {HFAudioClassifier: HFLoRAClassifier, WhisperSER: WhisperLoRA}.get(type(model))
    if wrapper is None:
        raise ValueError(f"train.lora_rank needs a transformers backbone as the source model, got {model.arch!r}")
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        modules_to_save=HEAD_MODULES)
    return wrapper.around(model, get_peft_model(model.model, config), base_dir)


def trainable_fraction(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
