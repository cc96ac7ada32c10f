"""Reuse fingerprints come from the config dataclasses: every result field counts, the marked ones do not."""
import copy
import dataclasses
import os

import pandas as pd
import pytest

from mifuse_ray.pipeline import labeling_fingerprint
from mifuse_ray.config import MiFuseConfig


def changed(value):
    """A different value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, dict):
        return {**value, "zz": "neutral"}
    if isinstance(value, (list, tuple)):
        return type(value)([*value, value[-1] if value else 1])
    if value is None:
        return 0.5
    raise TypeError(type(value))


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    return pd.DataFrame({"clip_id": ["a", "b"], "path": ["a.wav", "b.wav"]}), str(tmp_path)


@pytest.mark.parametrize("section", ["lalm", "source", "audio"])
def test_every_result_field_changes_the_labelling_fingerprint(section, inputs):
    df, ckpt = inputs
    base = MiFuseConfig()
    reference = labeling_fingerprint(base, df, ckpt, "http://127.0.0.1:1/v1")
    for f in dataclasses.fields(getattr(base, section)):
        if section == "source" and f.name == "checkpoint":
            continue                                  # the checkpoint counts by its bytes (below)
        cfg = copy.deepcopy(base)
        setattr(getattr(cfg, section), f.name, changed(getattr(getattr(cfg, section), f.name)))
        same = labeling_fingerprint(cfg, df, ckpt, "http://127.0.0.1:1/v1") == reference
        assert same == (not f.metadata.get("result", True)), f"{section}.{f.name}"


def test_checkpoint_bytes_and_clips_change_it(inputs, tmp_path):
    df, ckpt = inputs
    cfg = MiFuseConfig()
    reference = labeling_fingerprint(cfg, df, ckpt, "")
    assert labeling_fingerprint(cfg, df.iloc[:1], ckpt, "") != reference
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert labeling_fingerprint(cfg, df, ckpt, "") != reference


def test_a_stamp_hands_back_finished_work_only_at_its_fingerprint(tmp_path):
    """reuse.py: work is reused only under the fingerprint it was stamped with; other settings are
    told apart from no stamp at all (a run at other settings starts afresh, a new one just starts)."""
    import numpy as np

    from mifuse_ray import reuse
    work = str(tmp_path / "student")
    assert reuse.stamped(work, "a") is None and not reuse.stamp_differs(work, "a")
    reuse.stamp(work, "a", result={"seconds": 1.5})
    assert reuse.stamped(work, "a")["result"] == {"seconds": 1.5}
    assert reuse.stamped(work, "b") is None and reuse.stamp_differs(work, "b")
    assert sorted(os.listdir(work)) == [reuse.STAMP]                      # no temporary file left behind
    q = np.array([[0.25, 0.75]])
    assert reuse.digest({"q": q}) == reuse.digest({"q": q + 1e-9})       # float noise does not count
    assert reuse.digest({"q": q}) != reuse.digest({"q": q + 1e-3})
