"""Choosing the fusion on the dev split: dev weights, temperatures, halves, and the fallback without dev."""
import dataclasses

import numpy as np
import pandas as pd

from mifuse_ray.calibration import choose_fusion, dev_halves
from mifuse_ray.config import FusionConfig
from mifuse_ray.labeling import fusion_columns

LABELS = ["neutral", "happy", "angry", "sad"]


def table(n, seed, lalm_acc=0.7, source_acc=0.3, labelled=True):
    """A labels table as the pipeline stores it: a good LALM and a source near chance."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    lalm = np.where(rng.random((n, 5)) < lalm_acc, y[:, None], rng.integers(0, 4, (n, 5)))
    source = np.where(rng.random((n, 10)) < source_acc, y[:, None], rng.integers(0, 4, (n, 10)))
    probs = np.eye(4)[source] * 0.7 + 0.075
    return pd.DataFrame({"clip_id": [f"c{seed}_{i}" for i in range(n)], "error": None,
                         "lalm_votes": list(lalm), "lalm_soft": [[[np.nan] * 4] * 5] * n,
                         "source_votes": list(source), "source_probs": list(probs),
                         "label": [LABELS[k] for k in y] if labelled else None,
                         "oracle_label": [LABELS[k] for k in y]})


def test_dev_weights_follow_the_better_teacher_and_the_halves_do_not_overlap():
    adapt, dev = table(400, 0), table(120, 1)
    choice = choose_fusion(adapt, dev, FusionConfig(), LABELS)
    assert choice.config.weighting == "fixed"
    w_lalm, w_source = choice.config.fixed_weights
    assert w_lalm > w_source                              # the LALM is the better teacher here
    assert "dev clips" in choice.note and choice.dev_scores["configured"]["clips"] < len(dev)
    first, second = dev_halves(dev)
    assert not (first & second).any() and (first | second).all() and 0.3 < first.mean() < 0.7


def test_without_a_dev_split_the_unsupervised_default_applies():
    adapt = table(400, 2)
    choice = choose_fusion(adapt, None, FusionConfig(), LABELS)
    assert choice.config.weighting == "equal" and not choice.config.calibrate
    assert "unsupervised default" in choice.note
    q = np.stack(fusion_columns(adapt, 4, choice.config, choice.fit)["q"])
    np.testing.assert_allclose(q.mean(0), 0.25, atol=2e-3)        # Sinkhorn-balanced to the uniform prior


def test_dev_without_lalm_answers_falls_back():
    adapt, dev = table(400, 3), table(60, 4)
    dev["lalm_votes"] = [[-1] * 5] * len(dev)              # e.g. the spend cap hit before the dev split
    choice = choose_fusion(adapt, dev, FusionConfig(), LABELS)
    assert "unsupervised default" in choice.note


def test_select_on_dev_picks_among_candidates_and_reports_each():
    adapt, dev = table(300, 5), table(120, 6)
    cfg = dataclasses.replace(FusionConfig(), choose_on_dev=True, calibrate=True,
                              candidates=["mean_balanced", "lalm_balanced"])
    choice = choose_fusion(adapt, dev, cfg, LABELS)
    assert choice.name in ("mean_balanced", "lalm_balanced")
    assert {"mean_balanced", "lalm_balanced", "paper", "lalm", "source"} <= set(choice.dev_scores)
    assert len(choice.fit.temperatures) == 2


def test_speaker_balancing_goes_from_the_fit_into_the_labels_and_is_off_without_speakers():
    """fusion.balance_speakers: the fit holds one scale per speaker of the split, fusion_columns applies
    it (each speaker's labels average to the prior), and a table without speaker ids fuses as before."""
    adapt = table(480, 7, source_acc=0.25)
    y = np.array([LABELS.index(v) for v in adapt["label"]])
    speakers = np.repeat([f"s{i}" for i in range(6)], 80)
    rng = np.random.default_rng(8)
    logits = 1.5 * np.eye(4)[y] + rng.normal(0, 0.5, (len(y), 4))
    for i in range(6):                                 # each speaker heard as one class more, whatever the emotion
        logits[speakers == f"s{i}", i % 4] += 1.5
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    lalm = np.stack([rng.choice(4, 5, p=row) for row in p])
    adapt["lalm_votes"] = list(lalm)
    adapt["speaker_id"] = speakers
    on = dataclasses.replace(FusionConfig(), balance_speakers=True)
    plain = choose_fusion(adapt, None, FusionConfig(), LABELS)
    balanced = choose_fusion(adapt, None, on, LABELS)
    assert sorted(balanced.fit.speaker_scales) == [f"s{i}" for i in range(6)] and plain.fit.speaker_scales is None
    fused = fusion_columns(adapt, 4, balanced.config, balanced.fit)
    q = np.stack(fused["q"])
    for i in range(6):
        np.testing.assert_allclose(q[speakers == f"s{i}"].mean(0), 0.25, atol=5e-3)
    no_ids = adapt.drop(columns=["speaker_id"])
    without = choose_fusion(no_ids, None, on, LABELS)
    assert without.fit.speaker_scales is None
    np.testing.assert_allclose(np.stack(fusion_columns(no_ids, 4, without.config, without.fit)["q"]),
                               np.stack(fusion_columns(no_ids, 4, plain.config, plain.fit)["q"]), atol=1e-6)
