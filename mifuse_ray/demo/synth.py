"""A source-filter voice whose prosody carries the emotion.

Glottal pulses follow an F0 contour (with jitter and shimmer), pass through vowel formant
resonators scaled by the speaker's vocal-tract length, and are shaped into syllables with
pauses. Emotion lives where it lives in real speech: F0 level and range, speaking rate,
energy, voice quality (jitter, shimmer, spectral tilt, breathiness). The recording channel
(telephone band, codec, noise, reverberation, gain) is applied afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import signal

# F1, F2, F3 (Hz) of five vowels for an average adult vocal tract.
VOWEL_FORMANTS = np.array([
    [730, 1090, 2440],   # a
    [530, 1840, 2480],   # e
    [270, 2290, 3010],   # i
    [570, 840, 2410],    # o
    [300, 870, 2240],    # u
], dtype=np.float64)
FORMANT_BANDWIDTHS = np.array([80.0, 110.0, 160.0])


@dataclass
class Prosody:
    """Acoustic realisation of an emotion for one utterance."""

    f0_scale: float = 1.0      # multiplies the speaker's base F0
    f0_range_st: float = 2.0   # size of pitch accents, semitones
    rate_syl_s: float = 4.0    # syllables per second
    energy_db: float = 0.0     # loudness relative to neutral
    jitter: float = 0.005      # relative cycle-to-cycle F0 perturbation
    shimmer: float = 0.03      # relative cycle-to-cycle amplitude perturbation
    tilt: float = 0.5          # spectral tilt: one-pole low-pass coefficient (0 bright … 0.95 dark)
    breathiness: float = 0.05  # aspiration noise relative to the voiced source
    declination_st: float = 2.0  # pitch fall across the utterance, semitones

    FIELDS = ("f0_scale", "f0_range_st", "rate_syl_s", "energy_db", "jitter", "shimmer",
              "tilt", "breathiness", "declination_st")

    def as_array(self) -> np.ndarray:
        return np.array([getattr(self, f) for f in self.FIELDS], dtype=np.float64)

    @classmethod
    def from_array(cls, arr) -> "Prosody":
        return cls(**{f: float(v) for f, v in zip(cls.FIELDS, arr)})


@dataclass
class Speaker:
    f0_hz: float          # base F0
    vtl_scale: float      # vocal-tract length relative to average (formants divide by it)
    rate_scale: float     # personal speaking-rate habit
    energy_db: float      # personal loudness habit


def _smooth_noise(rng, n: int, rate_hz: float, sr: int) -> np.ndarray:
    """Unit-variance noise varying at about ``rate_hz``, by linear interpolation of knots."""
    knots = max(2, int(n / sr * rate_hz) + 2)
    values = rng.standard_normal(knots)
    return np.interp(np.linspace(0, knots - 1, n), np.arange(knots), values)


def _glottal_source(f0: np.ndarray, sr: int, jitter: float, shimmer: float, rng) -> np.ndarray:
    """Differentiated raised-cosine glottal pulses following an F0 track, with jitter and shimmer."""
    n = len(f0)
    f0 = f0 * (1.0 + jitter * _smooth_noise(rng, n, 150.0, sr))
    phase = np.cumsum(f0 / sr)
    frac = phase % 1.0
    open_quotient = 0.6
    pulse = np.where(frac < open_quotient, np.sin(np.pi * frac / open_quotient) ** 2, 0.0)
    cycles = phase.astype(np.int64)
    cycle_amp = 1.0 + shimmer * rng.standard_normal(cycles[-1] + 2)
    flow = pulse * cycle_amp[cycles]
    return np.diff(flow, prepend=0.0) * sr / (np.mean(f0) * 4.0)


def _resonator_sos(freq: float, bw: float, sr: int) -> np.ndarray:
    r = np.exp(-np.pi * bw / sr)
    theta = 2 * np.pi * freq / sr
    a = [1.0, -2 * r * np.cos(theta), r * r]
    b = [1.0 - r, 0.0, 0.0]
    return np.array([b + a])


def synthesize_utterance(prosody: Prosody, speaker: Speaker, duration_s: float, sr: int,
                         rng: np.random.Generator) -> np.ndarray:
    """A speech-like waveform at ``sr`` Hz, peak-normalised to the requested energy."""
    n = int(duration_s * sr)
    t = np.arange(n) / sr
    rate = max(1.0, prosody.rate_syl_s * speaker.rate_scale)

    # Syllable timeline with occasional pauses.
    onsets, lengths = [], []
    pos = rng.uniform(0.05, 0.2)
    while pos < duration_s - 0.12:
        length = (1.0 / rate) * rng.uniform(0.7, 1.3)
        onsets.append(pos)
        lengths.append(min(length * 0.8, duration_s - pos))
        pos += length
        if rng.random() < 0.15:
            pos += rng.uniform(0.1, 0.25)

    # F0 contour: declination plus one pitch accent per syllable.
    semitones = -prosody.declination_st * t / duration_s
    for on, ln in zip(onsets, lengths):
        accent = prosody.f0_range_st * rng.uniform(-0.3, 1.0)
        centre = on + ln / 2
        semitones += accent * np.exp(-0.5 * ((t - centre) / (ln / 3)) ** 2)
    f0 = speaker.f0_hz * prosody.f0_scale * 2.0 ** (semitones / 12.0)
    f0 = np.clip(f0, 50.0, 600.0)

    source = _glottal_source(f0, sr, prosody.jitter, prosody.shimmer, rng)
    source = source + prosody.breathiness * rng.standard_normal(n) * (np.abs(source).mean() * 3)
    source = signal.lfilter([1.0 - prosody.tilt], [1.0, -prosody.tilt], source)

    out = np.zeros(n)
    for on, ln in zip(onsets, lengths):
        a, b = int(on * sr), min(n, int((on + ln) * sr))
        if b - a < 16:
            continue
        formants = VOWEL_FORMANTS[rng.integers(len(VOWEL_FORMANTS))] / speaker.vtl_scale
        formants = formants * rng.uniform(0.93, 1.07, size=3)
        seg = source[a:b]
        voiced = sum(signal.sosfilt(_resonator_sos(f, bw, sr), seg)
                     for f, bw in zip(formants, FORMANT_BANDWIDTHS) if f < sr / 2 - 200)
        env = np.sin(np.linspace(0, np.pi, b - a)) ** 0.6
        out[a:b] += voiced * env
        # A short fricative-like burst at the syllable onset.
        burst_len = min(b - a, int(0.03 * sr))
        burst = rng.standard_normal(burst_len) * np.linspace(1, 0, burst_len) * 0.05
        out[a:a + burst_len] += np.diff(burst, prepend=0.0)

    peak = np.abs(out).max() or 1.0
    level_db = -12.0 + prosody.energy_db + speaker.energy_db
    return (out / peak * 10 ** (level_db / 20)).astype(np.float32)


def _reverb(wav: np.ndarray, sr: int, rt60: float, rng) -> np.ndarray:
    n = int(rt60 * sr)
    ir = rng.standard_normal(n) * np.exp(-6.9 * np.arange(n) / n)
    ir[0] = 1.0 / 0.3
    wet = signal.fftconvolve(wav, ir)[: len(wav)] * 0.3
    return wet * (np.abs(wav).max() / (np.abs(wet).max() or 1.0))


def _pink_noise(rng, n: int) -> np.ndarray:
    white = rng.standard_normal(n)
    b = [0.049922035, -0.095993537, 0.050612699, -0.004408786]
    a = [1.0, -2.494956002, 2.017265875, -0.522189400]
    pink = signal.lfilter(b, a, white)
    return pink / (pink.std() or 1.0)


def apply_channel(wav: np.ndarray, sr: int, channel: str, snr_db: float, rt60: float, gain_db: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Room, noise, microphone/telephone band and codec. Returns (audio, output rate)."""
    out = wav.astype(np.float64)
    if rt60 > 0:
        out = _reverb(out, sr, rt60, rng)
    if np.isfinite(snr_db):
        noise = _pink_noise(rng, len(out))
        speech_power = np.mean(out ** 2) or 1e-12
        out = out + noise * np.sqrt(speech_power / 10 ** (snr_db / 10))
    out_sr = sr
    if channel == "telephone":
        sos = signal.butter(6, [300, 3400], btype="bandpass", fs=sr, output="sos")
        out = signal.resample_poly(signal.sosfilt(sos, out), 1, sr // 8000)
        out_sr = 8000
        # 8-bit mu-law codec round trip.
        mu = 255.0
        peak = np.abs(out).max() or 1.0
        x = out / peak
        y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
        y = np.round(y * 127) / 127
        out = np.sign(y) * ((1 + mu) ** np.abs(y) - 1) / mu * peak
    elif channel != "full":
        raise ValueError(f"channel must be 'full' or 'telephone', got {channel!r}")
    out = out * 10 ** (gain_db / 20)
    return np.clip(out, -0.99, 0.99).astype(np.float32), out_sr
