"""Named synthetic emotional-speech domains, written as real audio files plus a manifest.

A domain is a typed config: who speaks (F0 range, vocal-tract length, speaking rate), how
strongly emotion is expressed (acted vs natural, with overlap between classes), how it was
recorded (full band vs telephone band with a codec, noise, reverberation, gain) and how the
classes are balanced. Define a new one by constructing :class:`DomainConfig`; no code change.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import soundfile as sf

from ..label_set import DEFAULT_LABELS
from .synth import Prosody, Speaker, apply_channel, synthesize_utterance

# Acted prototypes: how each emotion sounds when fully expressed.
EMOTION_PROTOTYPES: dict[str, Prosody] = {
    "neutral": Prosody(f0_scale=1.0, f0_range_st=2.0, rate_syl_s=4.0, energy_db=0.0, jitter=0.005,
                       shimmer=0.03, tilt=0.5, breathiness=0.05, declination_st=2.0),
    "happy": Prosody(f0_scale=1.3, f0_range_st=6.0, rate_syl_s=4.6, energy_db=4.0, jitter=0.008,
                     shimmer=0.04, tilt=0.3, breathiness=0.05, declination_st=1.0),
    "angry": Prosody(f0_scale=1.2, f0_range_st=3.5, rate_syl_s=5.0, energy_db=9.0, jitter=0.02,
                     shimmer=0.08, tilt=0.1, breathiness=0.02, declination_st=1.0),
    "sad": Prosody(f0_scale=0.85, f0_range_st=1.0, rate_syl_s=2.8, energy_db=-6.0, jitter=0.01,
                   shimmer=0.05, tilt=0.75, breathiness=0.25, declination_st=3.0),
}

GENERATED_SPLITS = ("train", "dev", "test", "adapt")   # in this order: each split's speakers seeded in turn


@dataclass
class DomainConfig:
    """Everything that makes one synthetic corpus differ from another."""

    name: str
    description: str = ""
    labels: tuple[str, ...] = DEFAULT_LABELS
    expressiveness: float = 1.0              # 1 = acted prototypes, 0 = every emotion sounds neutral
    variability: float = 0.25                # per-utterance prosody spread, as a fraction of the prototypes' span
    f0_range_hz: tuple[float, float] = (90.0, 240.0)   # speakers' base F0
    vtl_range: tuple[float, float] = (0.9, 1.1)        # speakers' vocal-tract length scale
    rate_scale: float = 1.0                  # the population's speaking-rate habit
    channel: str = "full"                    # "full" band or "telephone" (300–3400 Hz, 8 kHz, mu-law)
    file_format: str = "wav"                 # "wav" or "flac"
    snr_db_range: tuple[float, float] = (35.0, 45.0)
    rt60_range_s: tuple[float, float] = (0.0, 0.0)
    gain_db_range: tuple[float, float] = (-3.0, 3.0)
    loudness_normalized: bool = False        # broadcast-style: every clip brought to one RMS level first
    class_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    duration_range_s: tuple[float, float] = (1.8, 2.6)
    speakers_per_split: dict[str, int] = field(default_factory=lambda: {"train": 8, "dev": 3, "test": 3, "adapt": 6})
    clips_per_speaker: int = 50
    seed: int = 0

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


# The demo's domains: the built-in demo and the benchmark's six transfers run between them.
DEMO_DOMAINS: dict[str, DomainConfig] = {
    "acted_studio": DomainConfig(
        name="acted_studio",
        description="acted emotions, studio microphone, clean, balanced classes, mixed voices",
        expressiveness=1.0, variability=0.12, f0_range_hz=(90, 250), vtl_range=(0.9, 1.1),
        channel="full", file_format="wav", snr_db_range=(30, 40), seed=11),
    "call_centre": DomainConfig(
        name="call_centre",
        description="natural emotions over the telephone (8 kHz, mu-law), noisy, mostly neutral",
        expressiveness=0.65, variability=0.15, f0_range_hz=(85, 230), vtl_range=(0.85, 1.15),
        channel="telephone", file_format="flac", snr_db_range=(8, 18), gain_db_range=(-10, 0),
        class_weights=(0.45, 0.15, 0.25, 0.15), seed=22),
    "podcast": DomainConfig(
        name="podcast",
        description="semi-natural speech in reverberant rooms, loudness-normalised, low voices, fast talkers, happy-heavy",
        expressiveness=0.8, variability=0.12, f0_range_hz=(75, 170), vtl_range=(1.0, 1.2), rate_scale=1.2,
        loudness_normalized=True,
        channel="full", file_format="flac", snr_db_range=(18, 28), rt60_range_s=(0.2, 0.5),
        gain_db_range=(-6, 6), class_weights=(0.25, 0.35, 0.2, 0.2), seed=33),
}


def _prototype_matrix(labels) -> np.ndarray:
    return np.stack([EMOTION_PROTOTYPES[label].as_array() for label in labels])


def sample_prosody(cfg: DomainConfig, label_index: int, rng: np.random.Generator) -> Prosody:
    protos = _prototype_matrix(cfg.labels)
    neutral = EMOTION_PROTOTYPES["neutral"].as_array()
    span = protos.max(0) - protos.min(0)
    mean = neutral + cfg.expressiveness * (protos[label_index] - neutral)
    values = mean + cfg.variability * span * rng.standard_normal(len(span))
    low = np.array([0.6, 0.0, 1.5, -15.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    high = np.array([1.8, 10.0, 8.0, 15.0, 0.05, 0.2, 0.95, 0.5, 6.0])
    return Prosody.from_array(np.clip(values, low, high))


def generate_domain(cfg: DomainConfig, out_dir: str, sample_rate: int = 16000, scale: float = 1.0) -> str:
    """Write the domain's audio and ``manifest.parquet`` under ``out_dir``; returns the manifest path.

    Deterministic in (cfg, scale). The adaptation split is unlabelled: its ``label`` is null and
    the true label sits in ``oracle_label`` for diagnostics only.
    """
    unknown = [label for label in cfg.labels if label not in EMOTION_PROTOTYPES]
    if unknown:
        raise ValueError(f"domain {cfg.name}: no acoustic prototype for labels {unknown}")
    audio_dir = os.path.join(out_dir, "audio")
    os.makedirs(audio_dir, exist_ok=True)
    weights = np.asarray(cfg.class_weights, dtype=float)
    weights = weights / weights.sum()
    clips_per_speaker = max(2, int(round(cfg.clips_per_speaker * scale)))
    rows = []
    speaker_no = 0
    for split in GENERATED_SPLITS:
        for _ in range(cfg.speakers_per_split.get(split, 0)):
            speaker_no += 1
            spk_rng = np.random.default_rng([cfg.seed, speaker_no])
            speaker = Speaker(f0_hz=spk_rng.uniform(*cfg.f0_range_hz), vtl_scale=spk_rng.uniform(*cfg.vtl_range),
                              rate_scale=cfg.rate_scale * spk_rng.uniform(0.85, 1.15),
                              energy_db=spk_rng.normal(0.0, 2.0))
            speaker_id = f"{cfg.name}_spk{speaker_no:03d}"
            for i in range(clips_per_speaker):
                clip_rng = np.random.default_rng([cfg.seed, speaker_no, i])
                label_index = int(clip_rng.choice(len(weights), p=weights))
                prosody = sample_prosody(cfg, label_index, clip_rng)
                duration = clip_rng.uniform(*cfg.duration_range_s)
                wav = synthesize_utterance(prosody, speaker, duration, sample_rate, clip_rng)
                if cfg.loudness_normalized:
                    wav = wav * (0.05 / max(float(np.sqrt(np.mean(wav ** 2))), 1e-6))
                wav, sr = apply_channel(wav, sample_rate, cfg.channel, clip_rng.uniform(*cfg.snr_db_range),
                                        clip_rng.uniform(*cfg.rt60_range_s), clip_rng.uniform(*cfg.gain_db_range),
                                        clip_rng)
                clip_id = f"{speaker_id}_{i:04d}"
                rel = os.path.join("audio", f"{clip_id}.{cfg.file_format}")
                sf.write(os.path.join(out_dir, rel), wav, sr, subtype="PCM_16")
                label = cfg.labels[label_index]
                rows.append(dict(clip_id=clip_id, path=rel, duration_s=len(wav) / sr, sample_rate=sr,
                                 domain=cfg.name, speaker_id=speaker_id, split=split,
                                 label=None if split == "adapt" else label, oracle_label=label))
    manifest = os.path.join(out_dir, "manifest.parquet")
    pd.DataFrame(rows).to_parquet(manifest, index=False)
    with open(os.path.join(out_dir, "domain.json"), "w") as fh:
        json.dump({"config": asdict(cfg), "scale": scale, "fingerprint": cfg.fingerprint()}, fh, indent=2)
    return manifest


# Validation domains: made with settings unlike any demo domain's (class balance, recording chain, voices,
# expressiveness) to check on other data what was chosen on the demo's. Several defaults were then kept or
# changed on them (docs/results.md, 'Defaults'), so they are validation data, not held-out data.
VALIDATION_DOMAINS: dict[str, DomainConfig] = {
    "meeting_room": DomainConfig(
        name="meeting_room",
        description="far-field meeting recordings: long reverberation, higher voices, slow talkers, sad-heavy",
        expressiveness=0.7, variability=0.14, f0_range_hz=(140, 280), vtl_range=(0.85, 1.0), rate_scale=0.9,
        channel="full", file_format="wav", snr_db_range=(15, 25), rt60_range_s=(0.4, 0.8),
        gain_db_range=(-12, -4), class_weights=(0.3, 0.15, 0.15, 0.4), seed=44),
    "voice_notes": DomainConfig(
        name="voice_notes",
        description="phone voice messages: noisy full band, loud and expressive, angry-heavy",
        expressiveness=0.9, variability=0.2, f0_range_hz=(95, 220), vtl_range=(0.9, 1.15), rate_scale=1.05,
        channel="full", file_format="flac", snr_db_range=(5, 15), gain_db_range=(-2, 4),
        class_weights=(0.2, 0.2, 0.4, 0.2), seed=55),
}
ALL_DOMAINS = {**DEMO_DOMAINS, **VALIDATION_DOMAINS}
_MORE_ADAPT_SPEAKERS = re.compile(r"^(?P<base>.+)_adapt(?P<speakers>\d+)$")
# The benchmark's paper-scale tier: per target 400 labelled dev clips (8 speakers), 1,000 test clips (20) and
# 2,400 adaptation clips (48), the size of the corpora SER adaptation is used on; the source's train split as is.
PAPER_SPEAKERS = {"dev": 8, "test": 20, "adapt": 48}
_PAPER = "_paper"


def with_adapt_speakers(domain: DomainConfig, speakers: int) -> DomainConfig:
    """``domain`` with ``speakers`` adaptation speakers instead of its own, named ``<name>_adapt<speakers>``.

    The splits' speakers are drawn in the order of GENERATED_SPLITS, each from its own seeded stream, so
    the train, dev and test clips are the same audio as the domain's and its first adaptation speakers are
    the domain's own (only the name in the clip ids differs): more unlabelled audio is a size, not a change."""
    return dataclasses.replace(domain, name=f"{domain.name}_adapt{speakers}",
                               description=f"{domain.description}; {speakers} adaptation speakers",
                               speakers_per_split={**domain.speakers_per_split, "adapt": speakers})


def at_paper_scale(domain: DomainConfig) -> DomainConfig:
    """``domain`` with the paper-scale tier's dev, test and adaptation speakers (``PAPER_SPEAKERS``), named
    ``<name>_paper``: the same voices, prosody and recording chain, more of them (a size, not a change).
    Its train split is the domain's, so a source model trained on either is the same model."""
    return dataclasses.replace(domain, name=f"{domain.name}{_PAPER}",
                               description=f"{domain.description}; paper scale",
                               speakers_per_split={**domain.speakers_per_split, **PAPER_SPEAKERS})


def domain_named(name: str) -> DomainConfig:
    """A domain by name: a demo or validation domain, ``<domain>_paper`` at the paper-scale tier's size
    (``at_paper_scale``), and either with ``_adapt<N>`` for N adaptation speakers (``with_adapt_speakers``;
    ``<domain>_paper_adapt96`` is the paper tier with 4,800 adaptation clips, its test split unchanged).
    Unknown names raise KeyError with the names there are."""
    match = _MORE_ADAPT_SPEAKERS.match(name)
    if match:
        base = _named_base(match["base"])
        if base is not None:
            return with_adapt_speakers(base, int(match["speakers"]))
    base = _named_base(name)
    if base is None:
        raise KeyError(f"unknown domain {name!r}; choose from {', '.join(ALL_DOMAINS)} "
                       "(or <domain>_paper, <domain>_adapt<N>, <domain>_paper_adapt<N>)")
    return base


def _named_base(name: str) -> DomainConfig | None:
    if name in ALL_DOMAINS:
        return ALL_DOMAINS[name]
    if name.endswith(_PAPER) and name[:-len(_PAPER)] in ALL_DOMAINS:
        return at_paper_scale(ALL_DOMAINS[name[:-len(_PAPER)]])
    return None


def ensure_domain(name_or_cfg, root: str, scale: float = 1.0) -> str:
    """The domain's manifest under ``root``, generating it only when missing or stale (``game_voices``,
    real speech, is built once by ``python -m mifuse_ray.game_voices``; its absence is one clear line)."""
    if name_or_cfg == "game_voices":
        from ..game_voices import ensure
        return ensure(root)
    cfg = domain_named(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    out_dir = os.path.join(root, cfg.name)
    manifest = os.path.join(out_dir, "manifest.parquet")
    meta_path = os.path.join(out_dir, "domain.json")
    if os.path.exists(manifest) and os.path.exists(meta_path):
        with open(meta_path) as fh:
            meta = json.load(fh)
        if meta.get("fingerprint") == cfg.fingerprint() and meta.get("scale") == scale:
            return manifest
    return generate_domain(cfg, out_dir, scale=scale)
