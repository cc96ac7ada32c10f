"""train.targets speaker_balanced: the student's targets balanced within each adaptation speaker, the
fused label it is scored against left as the fusion made it, and re-fusion keeping the balancing."""
import dataclasses

import numpy as np
import pytest
import torch

from mifuse_ray.config import MiFuseConfig, result_fields
from mifuse_ray.labeling import fusion_columns
from mifuse_ray.train.labels import mode_labels, training_table
from mifuse_ray.train.refusion import speaker_scale_rows
from tests.test_calibration import LABELS, table


def speaker_table():
    """Six speakers, each heard by the LALM as one class more than they act, whatever the emotion."""
    adapt = table(480, 7, source_acc=0.25)
    y = np.array([LABELS.index(v) for v in adapt["label"]])
    speakers = np.repeat([f"s{i}" for i in range(6)], 80)
    rng = np.random.default_rng(8)
    logits = 1.5 * np.eye(4)[y] + rng.normal(0, 0.5, (len(y), 4))
    for i in range(6):
        logits[speakers == f"s{i}", i % 4] += 1.5
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    adapt["lalm_votes"] = [rng.choice(4, 5, p=row) for row in p]
    adapt["speaker_id"] = speakers
    return adapt, speakers


@pytest.mark.parametrize("mode", ["mifuse", "lalm_labels"])
def test_speaker_balanced_targets_average_to_the_prior_within_each_speaker(mode):
    adapt, speakers = speaker_table()
    cfg = MiFuseConfig()
    cfg.labels, cfg.train.mode = LABELS, mode
    plain_fusion, plain_fit = mode_labels(cfg, adapt)
    cfg.train.targets = "speaker_balanced"
    fusion, fit = mode_labels(cfg, adapt)
    assert fusion == plain_fusion and not (plain_fit.speaker_scales or {})
    assert sorted(fit.speaker_scales) == [f"s{i}" for i in range(6)]
    rows = training_table(adapt, cfg, fusion, fit)
    q = np.stack(rows["q"])
    assert list(rows["speaker_id"]) == list(speakers)
    for i in range(6):
        np.testing.assert_allclose(q[speakers == f"s{i}"].mean(0), 0.25, atol=5e-3)
    plain_q = np.stack(training_table(adapt, cfg, plain_fusion, plain_fit)["q"])
    assert np.abs(plain_q[speakers == "s0"].mean(0) - 0.25).max() > 0.05     # the offset the balancing removes
    # the labels the student is scored against are the fusion's, whatever the student learns from
    np.testing.assert_allclose(np.stack(fusion_columns(adapt, 4, plain_fusion, plain_fit)["q"]), plain_q, atol=1e-6)


def test_without_speaker_ids_the_targets_are_the_fused_labels():
    adapt, _ = speaker_table()
    adapt = adapt.drop(columns=["speaker_id"])
    cfg = MiFuseConfig()
    cfg.labels = LABELS
    plain = training_table(adapt, cfg, *mode_labels(cfg, adapt))
    cfg.train.targets = "speaker_balanced"
    fusion, fit = mode_labels(cfg, adapt)
    assert fit.speaker_scales is None
    np.testing.assert_allclose(np.stack(training_table(adapt, cfg, fusion, fit)["q"]), np.stack(plain["q"]))


def test_the_option_at_its_default_leaves_finished_runs_reused():
    """A field added after runs were finished is left out of their fingerprints at its default."""
    train = MiFuseConfig().train
    assert "targets" not in result_fields(train)
    assert result_fields(dataclasses.replace(train, targets="speaker_balanced"))["targets"] == "speaker_balanced"


def test_refusion_rows_take_each_speakers_scale_and_ones_for_the_rest():
    scales = {"a": np.array([0.4, 0.3, 0.2, 0.1]), "b": np.array([0.1, 0.2, 0.3, 0.4])}
    rows = speaker_scale_rows(scales, np.array(["b", "zz", "a"], dtype=object), 4)
    assert rows.dtype == torch.float32
    np.testing.assert_allclose(rows.numpy(), [[0.1, 0.2, 0.3, 0.4], [1, 1, 1, 1], [0.4, 0.3, 0.2, 0.1]], rtol=1e-6)
