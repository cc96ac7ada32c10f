"""The stand-in LALM's brain: acoustic features and a linear scorer fitted on pretraining domains.

No audio LLM can be downloaded here, so the offline endpoint answers with this scorer. It
is a realistic teacher on purpose: it has never seen any demo domain (it was fitted on a
separate family of randomly drawn "pretraining" domains, seeds disjoint from the demo's),
it knows nothing of the clips' labels, and it reasons from prosodic features rather than a
spectrogram CNN, so its errors differ from the source classifier's. Its design and weights
are fixed (``standin_weights.json``); they are never re-fitted to make a result look better.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache

import numpy as np

WEIGHTS_PATH = os.path.join(os.path.dirname(__file__), "standin_weights.json")
FEATURE_NAMES = ("level_db", "dynamic_range_db", "log_f0_median", "f0_range_st", "syllable_rate",
                 "high_low_ratio_db", "voiced_fraction", "f0_jitter_st", "periodicity")
SR = 16000


def _frames(x: np.ndarray, size: int, hop: int) -> np.ndarray:
    n = 1 + max(0, (len(x) - size) // hop)
    idx = np.arange(size)[None, :] + hop * np.arange(n)[:, None]
    return x[np.minimum(idx, len(x) - 1)]


def acoustic_features(wav: np.ndarray, sr: int = SR) -> np.ndarray:
    """Nine prosodic/voice-quality features of a 16 kHz mono clip."""
    if sr != SR:
        raise ValueError("acoustic_features expects 16 kHz audio")
    wav = np.asarray(wav, dtype=np.float64)
    frames = _frames(wav, 640, 160) * np.hanning(640)
    energy_db = 10 * np.log10((frames ** 2).mean(1) + 1e-10)
    loud = energy_db > energy_db.max() - 25
    level_db = float(np.mean(energy_db[loud]))
    dyn = float(np.percentile(energy_db, 95) - np.percentile(energy_db, 5))

    spec = np.fft.rfft(frames, n=1280)
    power = np.abs(spec) ** 2
    ac = np.fft.irfft(power, n=1280)[:, :640]
    ac = ac / np.maximum(ac[:, :1], 1e-12)
    lo, hi = SR // 400, SR // 60
    lag = lo + np.argmax(ac[:, lo:hi], axis=1)
    peak = ac[np.arange(len(ac)), lag]
    voiced = loud & (peak > 0.45)
    f0 = SR / lag
    if voiced.sum() >= 3:
        st = 12 * np.log2(f0[voiced])
        log_f0 = float(np.log(np.median(f0[voiced])))
        f0_range = float(np.percentile(st, 90) - np.percentile(st, 10))
        jitter = float(np.median(np.abs(np.diff(st)))) if voiced.sum() > 3 else 0.0
        periodicity = float(np.mean(peak[voiced]))
    else:
        log_f0, f0_range, jitter, periodicity = np.log(150.0), 0.0, 0.0, float(np.mean(peak))

    freqs = np.fft.rfftfreq(1280, 1 / SR)
    band = power[loud] if loud.any() else power
    low = band[:, (freqs >= 80) & (freqs < 1000)].sum()
    high = band[:, (freqs >= 1000) & (freqs < 3400)].sum()
    ratio = float(10 * np.log10((high + 1e-10) / (low + 1e-10)))

    env = np.convolve(10 ** (energy_db / 20), np.ones(5) / 5, mode="same")
    thr = np.percentile(env, 60)
    peaks = (env[1:-1] > env[:-2]) & (env[1:-1] >= env[2:]) & (env[1:-1] > thr)
    rate = float(peaks.sum() / (len(wav) / SR))
    return np.array([level_db, dyn, log_f0, f0_range, rate, ratio, float(voiced.mean()), jitter, periodicity])


@lru_cache(maxsize=1)
def load_weights(path: str = WEIGHTS_PATH) -> dict:
    with open(path) as fh:
        w = json.load(fh)
    return {k: np.asarray(v) if isinstance(v, list) else v for k, v in w.items()}


def scores(wav: np.ndarray, labels, weights: dict | None = None) -> np.ndarray:
    """Class probabilities over ``labels`` (any subset/order of the stand-in's own label set)."""
    w = weights or load_weights()
    x = (acoustic_features(wav) - w["mean"]) / w["std"]
    logits = w["W"] @ x + w["b"]
    own = list(w["labels"])
    missing = [label for label in labels if label not in own]
    if missing:
        raise ValueError(f"the stand-in LALM knows only {own}; cannot score {missing}")
    logits = logits[[own.index(label) for label in labels]]
    p = np.exp(logits - logits.max())
    return p / p.sum()


def pretraining_domains(count: int = 16, seed: int = 9001):
    """A family of random domains, disjoint in seed from the demo domains, for fitting the scorer."""
    from .domains import DomainConfig
    rng = np.random.default_rng(seed)
    domains = []
    for i in range(count):
        f0_lo = rng.uniform(75, 140)
        domains.append(DomainConfig(
            name=f"pretrain_{i:02d}", expressiveness=rng.uniform(0.6, 1.0), variability=rng.uniform(0.1, 0.25),
            f0_range_hz=(f0_lo, f0_lo + rng.uniform(40, 120)), vtl_range=(rng.uniform(0.85, 1.0), rng.uniform(1.0, 1.2)),
            rate_scale=rng.uniform(0.85, 1.2), channel=str(rng.choice(["full", "telephone"])),
            snr_db_range=(rng.uniform(5, 20), rng.uniform(20, 40)),
            rt60_range_s=(0.0, float(rng.choice([0.0, 0.5]))), gain_db_range=(-8.0, 4.0),
            speakers_per_split={"train": 6}, clips_per_speaker=15, seed=100000 + i))
    return domains


def fit(out_path: str = WEIGHTS_PATH, work_dir: str = "/tmp/mifuse_standin_pretraining", l2: float = 1e-2) -> dict:
    """Fit the scorer on the pretraining family (run once; the result is committed)."""
    import pandas as pd
    import torch
    from ..audio import AudioConfig, load_audio
    from .domains import generate_domain
    from ..label_set import DEFAULT_LABELS
    feats, ys = [], []
    for dom in pretraining_domains():
        manifest = generate_domain(dom, os.path.join(work_dir, dom.name))
        df = pd.read_parquet(manifest)
        for rec in df.to_dict("records"):
            wav = load_audio(os.path.join(work_dir, dom.name, rec["path"]), AudioConfig())
            feats.append(acoustic_features(wav))
            ys.append(DEFAULT_LABELS.index(rec["oracle_label"]))
    X = np.stack(feats)
    mean, std = X.mean(0), X.std(0) + 1e-8
    Xt = torch.tensor((X - mean) / std, dtype=torch.float64)
    yt = torch.tensor(ys)
    W = torch.zeros(len(DEFAULT_LABELS), X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(DEFAULT_LABELS), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=500)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(Xt @ W.T + b, yt) + l2 * (W ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    weights = {"labels": list(DEFAULT_LABELS), "features": list(FEATURE_NAMES), "mean": mean.tolist(),
               "std": std.tolist(), "W": W.detach().numpy().tolist(), "b": b.detach().numpy().tolist(),
               "fitted_on": "pretraining_domains(count=16, seed=9001)", "clips": len(ys)}
    with open(out_path, "w") as fh:
        json.dump(weights, fh, indent=1)
    load_weights.cache_clear()
    return weights
