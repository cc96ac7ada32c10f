import os

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from mifuse_ray.audio import (EMPTY, MISSING_FILE, NON_FINITE, RATE_TOO_LOW, SILENT, TOO_LONG, UNREADABLE,
                              AudioConfig, AudioError, list_inputs, load_audio, probe)
from mifuse_ray.data import decode_locally, expand_segments

SR = 16000


def tone(seconds=1.0, sr=SR, amp=0.3):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.fixture
def bad_folder(tmp_path):
    """A target folder with every kind of bad (and awkward but fine) input."""
    d = tmp_path / "target"
    d.mkdir()
    sf.write(d / "good.wav", tone(), SR)
    sf.write(d / "rate8k.wav", tone(sr=8000), 8000)
    sf.write(d / "stereo.wav", np.stack([tone(), tone()], 1), SR)
    sf.write(d / "pcm24.wav", tone(), SR, subtype="PCM_24")
    sf.write(d / "flac_named.wav", tone(), SR, format="FLAC")          # wrong extension, real audio
    sf.write(d / "rate4k.wav", tone(sr=4000), 4000)
    sf.write(d / "silent.wav", np.zeros(SR, np.float32), SR)
    nan = tone()
    nan[100:200] = np.nan
    sf.write(d / "nan.wav", nan, SR, subtype="FLOAT")
    full = (d / "good.wav").read_bytes()
    (d / "truncated.wav").write_bytes(full[:30])
    (d / "zero.wav").write_bytes(b"")
    (d / "notes.txt").write_text("this is not audio")
    with sf.SoundFile(d / "hour.wav", "w", SR, 1, subtype="PCM_16") as fh:   # an hour, written in chunks
        chunk = np.zeros(SR * 60, np.float32)
        for _ in range(60):
            fh.write(chunk)
    return d


EXPECTED = {"good.wav": None, "rate8k.wav": None, "stereo.wav": None, "pcm24.wav": None, "flac_named.wav": None,
            "rate4k.wav": RATE_TOO_LOW, "silent.wav": SILENT, "nan.wav": NON_FINITE, "truncated.wav": UNREADABLE,
            "zero.wav": UNREADABLE, "notes.txt": UNREADABLE, "hour.wav": TOO_LONG}


def test_each_bad_input_gets_its_reason(bad_folder):
    df = list_inputs(str(bad_folder))
    assert sorted(df["clip_id"]) == sorted(EXPECTED)
    out = decode_locally(df, AudioConfig(max_duration_s=60))
    for rec in out.to_dict("records"):
        want = EXPECTED[rec["clip_id"]]
        if want is None:
            assert pd.isna(rec["error"]), rec
            assert rec["audio"].dtype == np.float32 and rec["audio"].ndim == 1
            assert abs(len(rec["audio"]) - SR) <= 2          # resampled to 16 kHz, mono
        else:
            assert not pd.isna(rec["error"]) and rec["error"].startswith(want), (rec["clip_id"], rec["error"])


def test_missing_file_and_reason_carries_clip_id(tmp_path):
    with pytest.raises(AudioError) as err:
        load_audio(str(tmp_path / "nope.wav"), AudioConfig(), clip_id="clip-7")
    assert err.value.reason == MISSING_FILE and err.value.clip_id == "clip-7"


def test_too_long_is_decided_from_the_header_and_can_be_split(bad_folder):
    info = probe(str(bad_folder / "hour.wav"))
    assert info.duration_s == pytest.approx(3600)
    cfg = AudioConfig(max_duration_s=60, long_audio="split", window_s=600)
    df = list_inputs(str(bad_folder))
    rows = expand_segments(df[df.clip_id == "hour.wav"], cfg)
    assert len(rows) == 6 and rows["clip_id"].iloc[1] == "hour.wav#00001"
    assert (rows["parent_id"] == "hour.wav").all()


def test_short_file_is_empty(tmp_path):
    sf.write(tmp_path / "blip.wav", tone(0.01), SR)
    with pytest.raises(AudioError) as err:
        load_audio(str(tmp_path / "blip.wav"), AudioConfig())
    assert err.value.reason == EMPTY


def test_manifest_relative_paths_and_split(tmp_path):
    sf.write(tmp_path / "a.wav", tone(), SR)
    pd.DataFrame({"clip_id": ["a", "b"], "path": ["a.wav", "b.wav"], "split": ["adapt", "test"],
                  "label": [None, "sad"]}).to_parquet(tmp_path / "m.parquet")
    df = list_inputs(str(tmp_path / "m.parquet"), split="adapt")
    assert list(df["clip_id"]) == ["a"] and os.path.isabs(df["path"][0])
    with pytest.raises(FileNotFoundError):
        list_inputs(str(tmp_path / "missing.parquet"))


def test_crop_batch_crops_long_clips_and_pads_short_ones():
    from mifuse_ray.train.common import crop_batch
    wav, lengths = crop_batch([np.arange(10, dtype=np.float32), np.ones(2, dtype=np.float32)], 4, None)
    assert wav.shape == (2, 4) and lengths.tolist() == [4, 2]
    assert wav[0].tolist() == [3, 4, 5, 6] and wav[1].tolist() == [1, 1, 0, 0]      # centre crop; zero padding


def test_training_clips_come_in_manifest_order(ray_cluster, demo_root):
    """Sixteen decode blocks finish in whatever order the cluster runs them; the clips a training run
    sees are in manifest order all the same, so its seeded shuffles and batches repeat run to run."""
    from mifuse_ray.data import streamed_clips
    # podcast is stored at the model's rate: no resampling, so no decode worker imports torch (~3 s of CPU each)
    df = list_inputs(os.path.join(demo_root, "podcast", "manifest.parquet"), split="adapt").head(64)
    for _ in range(2):
        assert list(streamed_clips(df, AudioConfig(), batch_size=4).to_pandas()["clip_id"]) == list(df["clip_id"])
