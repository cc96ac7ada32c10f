"""Audio loading shared by every stage: list inputs, probe headers, decode, validate.

Decoding uses ``soundfile`` (libsndfile: WAV, FLAC, OGG in any bit depth) and resampling
uses torchaudio. Every failure a user's data can cause becomes an :class:`AudioError`
with a machine-readable ``reason``, so a pipeline turns it into an error row rather
than losing the clip or crashing a batch.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import pandas as pd
import soundfile as sf

# Reasons an input clip can be rejected; stored verbatim in the `error` column.
MISSING_FILE = "missing_file"
UNREADABLE = "unreadable"
EMPTY = "empty"
TOO_LONG = "too_long"
RATE_TOO_LOW = "sample_rate_too_low"
NON_FINITE = "non_finite_samples"
SILENT = "silent"


class AudioError(Exception):
    """A clip that cannot be used, with the clip id and a reason code."""

    def __init__(self, clip_id: str, reason: str, detail: str = ""):
        self.clip_id, self.reason, self.detail = clip_id, reason, detail
        super().__init__(f"{clip_id}: {reason}" + (f" ({detail})" if detail else ""))

    @property
    def message(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


@dataclass
class AudioConfig:
    """How raw files become model input."""

    sample_rate: int = 16000          # every stage works at this rate
    min_sample_rate: int = 8000       # below this a file is rejected, above it resampled
    max_duration_s: float = 60.0      # longer files are rejected or split (long_audio)
    long_audio: Literal["reject", "split"] = "reject"   # or "split" into fixed windows
    window_s: float = 4.0             # window length when splitting long recordings
    min_duration_s: float = 0.1       # shorter than this counts as empty
    silence_dbfs: float = -60.0       # peak level below this counts as silent
    train_crop_s: float = 2.0         # fixed length for training batches (crop or pad)


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def open_binary(path: str):
    """A readable binary file object for a local path or an fsspec URI (s3://, gs://, ...)."""
    if _is_uri(path):
        import fsspec
        return fsspec.open(path, "rb").open()
    return open(path.removeprefix("file://"), "rb")


def read_bytes(path: str) -> bytes:
    with open_binary(path) as fh:
        return fh.read()


@dataclass
class AudioInfo:
    sample_rate: int
    frames: int
    channels: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def probe(path: str, clip_id: str = "") -> AudioInfo:
    """Header-only look at a file: rate, length and channels without decoding the samples."""
    clip_id = clip_id or path
    try:
        with open_binary(path) as fh:
            info = sf.info(fh)
    except FileNotFoundError:
        raise AudioError(clip_id, MISSING_FILE, path) from None
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(clip_id, UNREADABLE, _short(exc)) from None
    return AudioInfo(sample_rate=int(info.samplerate), frames=int(info.frames), channels=int(info.channels))


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__


def check_header(info: AudioInfo, cfg: AudioConfig, clip_id: str) -> None:
    if info.frames == 0:
        raise AudioError(clip_id, EMPTY, "no samples")
    if info.sample_rate < cfg.min_sample_rate:
        raise AudioError(clip_id, RATE_TOO_LOW, f"{info.sample_rate} Hz < minimum {cfg.min_sample_rate} Hz")
    if info.duration_s < cfg.min_duration_s:
        raise AudioError(clip_id, EMPTY, f"{info.duration_s:.3f} s < minimum {cfg.min_duration_s} s")
    if cfg.long_audio == "reject" and info.duration_s > cfg.max_duration_s:
        raise AudioError(clip_id, TOO_LONG, f"{info.duration_s:.0f} s > maximum {cfg.max_duration_s:.0f} s")


def segment_windows(info: AudioInfo, cfg: AudioConfig) -> list[tuple[float, float]]:
    """(offset_s, duration_s) windows for a file: one for a short file, fixed windows for a long one."""
    if cfg.long_audio != "split" or info.duration_s <= cfg.max_duration_s:
        return [(0.0, info.duration_s)]
    starts = np.arange(0.0, info.duration_s, cfg.window_s)
    return [(float(s), float(min(cfg.window_s, info.duration_s - s))) for s in starts
            if info.duration_s - s >= cfg.min_duration_s]


@lru_cache(maxsize=16)
def _resampler(orig: int, new: int):
    import torchaudio
    return torchaudio.transforms.Resample(orig, new)


def resample(wav: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    if orig_sr == new_sr:
        return wav.astype(np.float32, copy=False)
    import torch
    with torch.no_grad():
        return _resampler(orig_sr, new_sr)(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))).numpy()


def load_audio(path: str, cfg: AudioConfig, clip_id: str = "", offset_s: float = 0.0,
               duration_s: float | None = None) -> np.ndarray:
    """Decode one clip (or one window of it) to mono float32 at ``cfg.sample_rate``.

    Raises AudioError for every input a user can get wrong; never returns garbage.
    """
    clip_id = clip_id or path
    info = probe(path, clip_id)
    if offset_s == 0.0 and duration_s is None:
        check_header(info, cfg, clip_id)
    elif info.sample_rate < cfg.min_sample_rate:
        raise AudioError(clip_id, RATE_TOO_LOW, f"{info.sample_rate} Hz < minimum {cfg.min_sample_rate} Hz")
    start = int(round(offset_s * info.sample_rate))
    stop = None if duration_s is None else start + int(round(duration_s * info.sample_rate))
    try:
        with open_binary(path) as fh:
            data, sr = sf.read(fh, dtype="float32", always_2d=True, start=start, stop=stop)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise AudioError(clip_id, UNREADABLE, _short(exc)) from None
    if data.shape[0] == 0:
        raise AudioError(clip_id, EMPTY, "no samples decoded (truncated file?)")
    wav = data.mean(axis=1)
    if not np.all(np.isfinite(wav)):
        raise AudioError(clip_id, NON_FINITE, f"{int((~np.isfinite(wav)).sum())} NaN/inf samples")
    peak = float(np.abs(wav).max())
    if peak <= 10 ** (cfg.silence_dbfs / 20):
        raise AudioError(clip_id, SILENT, f"peak {20 * np.log10(max(peak, 1e-12)):.0f} dBFS")
    return resample(wav, sr, cfg.sample_rate)


def encode_wav(wav: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM WAV bytes: what the LALM receives and what its cache key hashes."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(wav, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def list_inputs(source: str, split: str | None = None) -> pd.DataFrame:
    """A manifest DataFrame from a Parquet manifest (local or URI) or a folder of files.

    From a folder every non-hidden file is an input (a file that is not audio becomes an
    error row downstream, rather than being skipped silently).
    """
    if source.endswith(".parquet"):
        if not _is_uri(source) and not os.path.exists(source):
            raise FileNotFoundError(f"manifest not found: {source}")
        import pyarrow.parquet as pq
        if _is_uri(source):
            df = pd.read_parquet(source)
        else:   # only the split's rows (a row filter): not a 10M-row manifest for a 400-clip dev split
            split_column = split is not None and "split" in pq.read_schema(source).names
            df = pq.read_table(source, filters=[("split", "==", split)] if split_column else None).to_pandas()
        missing = {"clip_id", "path"} - set(df.columns)
        if missing:
            raise ValueError(f"manifest {source} lacks columns {sorted(missing)}")
        base = os.path.dirname(source)
        if not _is_uri(source):
            df["path"] = [p if os.path.isabs(p) or _is_uri(p) else os.path.join(base, p) for p in df["path"]]
        if split is not None and "split" in df.columns:
            df = df[df["split"] == split].reset_index(drop=True)
    else:
        if _is_uri(source):
            import fsspec
            fs, root = fsspec.core.url_to_fs(source)
            files = sorted(fs.find(root))
            protocol = source.split("://")[0]
            paths = [f"{protocol}://{f}" for f in files if not os.path.basename(f).startswith(".")]
        else:
            if not os.path.isdir(source):
                raise FileNotFoundError(f"target audio not found: {source} (give a .parquet manifest or a folder)")
            paths = sorted(os.path.join(d, f) for d, _, fs_ in os.walk(source) for f in fs_ if not f.startswith("."))
        root_len = len(source.rstrip("/")) + 1
        df = pd.DataFrame({"clip_id": [p[root_len:] for p in paths], "path": paths})
    if df["clip_id"].duplicated().any():
        dup = df.loc[df["clip_id"].duplicated(), "clip_id"].iloc[0]
        raise ValueError(f"duplicate clip_id {dup!r} in {source}")
    for col in ("label", "speaker_id", "domain"):
        if col not in df.columns:
            df[col] = None
    return df
