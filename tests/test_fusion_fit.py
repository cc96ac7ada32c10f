"""The fusion's global part (balancing, label model, temperatures) and every named variant."""
import numpy as np
import pytest
import torch

from mifuse_ray.fusion import VARIANTS, fuse, teacher_stats, temper
from mifuse_ray.fusion_fit import fit_fusion, fit_temperatures

C = 4


def simulated(seed=0, B=600, missing_lalm=0.0):
    """Two teachers with known confusion matrices (each biased towards its own classes) and true labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, B)
    lalm_conf = np.full((C, C), 0.05) + np.diag([0.55, 0.3, 0.3, 0.55])
    lalm_conf[2, 1] += 0.35                       # says "happy" for most angry clips
    lalm_conf[1, 1] += 0.25
    source_conf = np.full((C, C), 0.06) + np.diag([0.3, 0.6, 0.6, 0.5])
    source_conf[0, 3] += 0.34                     # says "sad" for most neutral clips
    source_conf[3, 3] += 0.1
    lalm_conf /= lalm_conf.sum(1, keepdims=True)
    source_conf /= source_conf.sum(1, keepdims=True)
    lalm = np.stack([rng.choice(C, 5, p=lalm_conf[k]) for k in y])
    source = np.stack([rng.choice(C, 10, p=source_conf[k]) for k in y])
    lalm[rng.random(B) < missing_lalm] = -1       # e.g. clips outside the LALM budget
    return y, lalm, source, lalm_conf, source_conf


def teachers(lalm, source, lib=np):
    wrap = torch.tensor if lib is torch else np.asarray
    return [teacher_stats(wrap(lalm), C), teacher_stats(wrap(source), C)]


def kwargs_of(name):
    fields = VARIANTS[name]
    keep = ("weighting", "combine", "fixed_weights")
    kwargs = {k: v for k, v in fields.items() if k in keep}
    if kwargs["weighting"] == "dev":           # resolved on a dev split into fixed weights (calibration.py)
        kwargs.update(weighting="fixed", fixed_weights=[0.35, 0.65])
    return kwargs, fields["balance_teachers"], fields["balance_fused"]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_numpy_and_torch_agree_on_every_variant(name):
    y, lalm, source, *_ = simulated(1, missing_lalm=0.1)
    kw, bt, bf = kwargs_of(name)
    fit = fit_fusion(lambda: iter([teachers(lalm, source)]), C, balance_teachers=bt, balance_fused=bf,
                     temperatures=[1.5, 0.8], **kw)
    n = fuse(teachers(lalm, source), fit=fit, **kw)
    t = fuse(teachers(lalm, source, torch), fit=fit, **kw)
    np.testing.assert_allclose(n.q, t.q.numpy(), atol=1e-5)
    np.testing.assert_allclose(n.weights, t.weights.numpy(), atol=1e-6)
    np.testing.assert_array_equal(n.status, t.status.numpy())


@pytest.mark.parametrize("stage", ["teachers", "fused"])
def test_sinkhorn_balancing_gives_the_prior_as_marginals(stage):
    y, lalm, source, *_ = simulated(2)
    prior = np.array([0.4, 0.2, 0.2, 0.2])
    bt, bf = ("sinkhorn", "none") if stage == "teachers" else ("mean", "sinkhorn")
    fit = fit_fusion(lambda: iter([teachers(lalm, source)]), C, prior=prior, balance_teachers=bt, balance_fused=bf,
                     sinkhorn_iters=60, weighting="equal")
    if stage == "teachers":
        from mifuse_ray.fusion import corrected_pbars
        for p in corrected_pbars(teachers(lalm, source), fit):
            np.testing.assert_allclose(np.asarray(p).mean(0), prior, atol=2e-3)
    else:
        q = fuse(teachers(lalm, source), fit=fit, weighting="equal").q
        np.testing.assert_allclose(q.mean(0), prior, atol=1e-3)


def test_balancing_beats_the_biased_teachers():
    y, lalm, source, *_ = simulated(3)
    ts = teachers(lalm[:, :1], source[:, :2])        # few draws: the teachers' biases show
    plain = fuse(ts, weighting="equal").q.argmax(1)
    fit = fit_fusion(lambda: iter([ts]), C, weighting="equal")
    balanced = fuse(ts, fit=fit, weighting="equal").q.argmax(1)
    recall = lambda p: np.mean([(p[y == k] == k).mean() for k in range(C)])  # noqa: E731
    assert recall(balanced) > recall(plain) + 0.03


def test_label_model_recovers_known_confusions():
    """Three annotators with one vote each (two are only weakly identified, as docs/method.md §3 says)."""
    rng = np.random.default_rng(4)
    B = 4000
    y = rng.integers(0, C, B)
    confusions = []
    for bias in range(3):
        conf = np.full((C, C), 0.08) + np.eye(C) * 0.5
        conf[:, bias] += 0.12                          # each over-predicts its own class
        confusions.append(conf / conf.sum(1, keepdims=True))
    votes = [np.array([rng.choice(C, p=conf[k]) for k in y])[:, None] for conf in confusions]
    ts = [teacher_stats(v, C) for v in votes]
    fit = fit_fusion(lambda: iter([ts]), C, balance_teachers="none", balance_fused="none", weighting="equal",
                     combine="label_model", label_model_iters=50)
    for estimated, true in zip(fit.log_confusion, confusions):
        assert np.abs(np.exp(estimated) - true).max() < 0.12
        assert (np.exp(estimated).argmax(1) == true.argmax(1)).all()
    q = fuse(ts, fit=fit, weighting="equal", combine="label_model").q
    single = max(np.mean(v[:, 0] == y) for v in votes)
    assert np.mean(np.asarray(q).argmax(1) == y) > single + 0.05     # three annotators beat the best one


def test_a_teacher_with_weight_zero_never_leaks_into_q():
    y, lalm, source, *_ = simulated(5, missing_lalm=0.2)
    ts = teachers(lalm, source)
    for combine in ("mean", "product"):
        kw = dict(weighting="fixed", fixed_weights=[1.0, 0.0], combine=combine)
        fit = fit_fusion(lambda: iter([ts]), C, balance_fused="sinkhorn", **kw)
        q = np.asarray(fuse(ts, fit=fit, **kw).q)
        answered = np.asarray(ts[0].n) > 0
        assert np.isnan(q[~answered]).all()                          # the source never stands in
        changed = teachers(lalm, np.roll(source, 7, axis=0))
        q2 = np.asarray(fuse(changed, fit=fit, **kw).q)
        np.testing.assert_allclose(q[answered], q2[answered], atol=1e-6)   # nor moves q where the LALM answered


def test_missing_teacher_and_a_class_nobody_predicts():
    y, lalm, source, *_ = simulated(6, missing_lalm=0.3)
    source[source == 2] = 1                                         # the source never says "angry"
    ts = teachers(lalm, source)
    fit = fit_fusion(lambda: iter([ts]), C, weighting="equal")
    assert all(np.isfinite(v).all() for v in fit.teacher_scales) and np.isfinite(fit.fused_scale).all()
    assert any("teacher 1" in note and "[2]" in note for note in fit.notes)
    q = np.asarray(fuse(ts, fit=fit, weighting="equal").q)
    assert np.isfinite(q).all()
    missing = np.asarray(ts[0].n) == 0
    # clips without the LALM keep the source alone, balanced
    assert np.allclose(q[missing].sum(1), 1.0)


def test_fit_streams_over_batches():
    y, lalm, source, *_ = simulated(7)
    whole = fit_fusion(lambda: iter([teachers(lalm, source)]), C, weighting="equal")
    parts = fit_fusion(lambda: (teachers(lalm[i:i + 100], source[i:i + 100]) for i in range(0, len(y), 100)), C,
                       weighting="equal")
    np.testing.assert_allclose(whole.fused_scale, parts.fused_scale, rtol=1e-6)


def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(8)
    logits = rng.normal(0, 2, (4000, C))
    y = np.array([rng.choice(C, p=p) for p in np.exp(logits) / np.exp(logits).sum(1, keepdims=True)])
    overconfident = np.exp(3 * logits) / np.exp(3 * logits).sum(1, keepdims=True)     # T = 1/3 too sharp
    soft = overconfident[:, None, :].astype(np.float32)
    stats = teacher_stats(overconfident.argmax(1)[:, None], C, soft)
    assert fit_temperatures([stats], y)[0] == pytest.approx(3.0, rel=0.15)
    np.testing.assert_allclose(temper(overconfident, 3.0), np.exp(logits) / np.exp(logits).sum(1, keepdims=True),
                               atol=1e-6)


def test_speaker_balancing_removes_what_is_constant_to_a_speaker():
    """Each speaker pulls the teacher towards one class (a high voice heard as happy in every clip):
    balancing within speakers gives each speaker the prior as marginal and recovers the classes;
    a speaker under ``min_clips`` and clips without a speaker are left as they were."""
    from mifuse_ray.fusion_fit import rescale_by_speaker, speaker_scales
    rng = np.random.default_rng(5)
    n_speakers, per = 6, 80
    y = rng.integers(0, C, n_speakers * per)
    speakers = np.repeat([f"spk{s}" for s in range(n_speakers)], per).astype(object)
    logits = 2.0 * np.eye(C)[y] + rng.normal(0, 1.0, (len(y), C))
    for s in range(n_speakers):                       # speaker s: +2 on class s % C, whatever the emotion
        logits[speakers == f"spk{s}", s % C] += 2.0
    q = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    speakers[:5] = None                               # no id
    speakers[5:15] = "rare"                           # 10 clips: under min_clips
    scales = speaker_scales(q, speakers, np.full(C, 1 / C), min_clips=20)
    assert set(scales) == {f"spk{s}" for s in range(n_speakers)}
    balanced = rescale_by_speaker(q, speakers, scales)
    np.testing.assert_array_equal(balanced[:15], q[:15])
    for s in range(1, n_speakers):
        np.testing.assert_allclose(balanced[speakers == f"spk{s}"].mean(0), 1 / C, atol=5e-3)
    recall = lambda p: np.mean([(p[y == k] == k).mean() for k in range(C)])  # noqa: E731
    assert recall(balanced.argmax(1)) > recall(q.argmax(1)) + 0.1
    assert rescale_by_speaker(q, speakers, {}) is q


def test_speaker_normalised_inference_scores_every_clip():
    """evaluation.by_speaker: per-speaker balancing of a model's distributions; a clip without a
    distribution stays unanswered (-1), a speaker under the minimum is predicted clip by clip."""
    from mifuse_ray.config import MiFuseConfig
    from mifuse_ray.evaluation import by_speaker
    cfg = MiFuseConfig()
    rng = np.random.default_rng(9)
    y = rng.integers(0, C, 60)
    logits = 1.5 * np.eye(C)[y] + rng.normal(0, 1.0, (60, C))
    logits[:40, 1] += 2.5                                    # speaker a: heard as happy whatever the emotion
    probs = list(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
    probs[3] = None
    speakers = ["a"] * 40 + ["b"] * 20                         # b: under the minimum set below
    cfg.fusion.speaker_min_clips = 21
    pred = by_speaker(probs, speakers, cfg)
    assert pred[3] == -1
    np.testing.assert_array_equal(pred[40:], np.argmax(logits[40:], 1))   # b: as the model said
    recall = lambda p, t: np.mean([(p[t == k] == k).mean() for k in range(C) if (t == k).any()])  # noqa: E731
    plain = np.argmax(logits, 1)
    keep = np.arange(40) != 3
    assert recall(pred[:40][keep], y[:40][keep]) > recall(plain[:40][keep], y[:40][keep]) + 0.1


def test_the_fusion_workers_never_import_torch():
    """The fusion map's tasks and the fit's holder actors are numpy only: torch in each of those worker
    processes was ~0.4 GB apiece, the largest part of a labelling run's memory peak."""
    import subprocess
    import sys
    code = ("import sys; import mifuse_ray.fused_shards, mifuse_ray.split_stats, mifuse_ray.labeling, "
            "mifuse_ray.fused_labels, mifuse_ray.label_shards; print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_one_holder_per_128_shards_and_at_most_one_per_two_cpus():
    from mifuse_ray.split_stats import holder_count
    assert [holder_count(n, 8) for n in (1, 128, 129, 196, 10_000)] == [1, 1, 2, 2, 4]
    assert holder_count(500, 1) == 1
