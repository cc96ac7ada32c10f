import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mifuse_ray.fusion import (EQUAL_WEIGHTS_SINGLE_DRAW, FUSED, NO_TEACHER, TEACHER_MISSING, draw_labels, entropy,
                               fuse, teacher_stats)


def direct_mi(soft):
    """BALD MI computed the slow, obvious way."""
    mean = soft.mean(0)
    H = lambda p: -sum(x * np.log(x) for x in p if x > 0)  # noqa: E731
    return H(mean) - np.mean([H(s) for s in soft])


def test_mi_matches_direct_computation():
    rng = np.random.default_rng(0)
    soft = rng.dirichlet(np.ones(4), size=(6, 10)).astype(np.float32)
    votes = soft.argmax(-1)
    stats = teacher_stats(votes, 4, soft)
    for b in range(6):
        assert stats.mi[b] == pytest.approx(direct_mi(soft[b].astype(np.float64)), abs=1e-5)


def test_hand_computed_cases():
    # 4 of 5 votes agree: H = -(0.8 ln 0.8 + 0.2 ln 0.2) = 0.5004 nats (docs/method.md §2)
    s = teacher_stats(np.array([[1, 1, 1, 1, 0]]), 4)
    assert s.vote_entropy[0] == pytest.approx(0.500402, abs=1e-5)
    np.testing.assert_allclose(s.hist[0], [0.2, 0.8, 0, 0])
    # identical soft draws: MI = 0; two opposite one-hot draws: MI = ln 2
    same = np.array([[[0.7, 0.1, 0.1, 0.1]] * 3], dtype=np.float32)
    assert teacher_stats(np.zeros((1, 3), int), 4, same).mi[0] == pytest.approx(0.0, abs=1e-6)
    opposite = np.array([[[1, 0, 0, 0], [0, 1, 0, 0]]], dtype=np.float32)
    assert teacher_stats(np.array([[0, 1]]), 4, opposite).mi[0] == pytest.approx(np.log(2), abs=1e-6)
    assert entropy(np.array([0.5, 0.5, 0.0]))[()] == pytest.approx(np.log(2))


def test_exp_weights_hand_computed():
    lalm = teacher_stats(np.array([[0, 0, 0, 0, 1]]), 4)            # U = 0.5004
    src = teacher_stats(np.array([[2] * 10]), 4)                      # U = 0
    r = fuse([lalm, src], tau=0.5)
    w_lalm = np.exp(-0.500402 / 0.5) / (np.exp(-0.500402 / 0.5) + 1.0)
    assert r.weights[0, 0] == pytest.approx(w_lalm, abs=1e-5)
    np.testing.assert_allclose(r.q[0], w_lalm * np.array([0.8, 0.2, 0, 0]) + (1 - w_lalm) * np.array([0, 0, 1, 0]),
                               atol=1e-5)
    inv = fuse([lalm, src], weighting="inverse", eps=1e-6)
    assert inv.weights[0, 1] > 0.999


def test_confident_teacher_dominates_and_fixed_weights_average():
    rng = np.random.default_rng(1)
    confident = teacher_stats(np.full((50, 8), 3), 4)
    uncertain = teacher_stats(rng.integers(0, 4, (50, 8)), 4)
    r = fuse([uncertain, confident])
    assert np.all(r.weights[:, 1] >= r.weights[:, 0])
    assert np.all(r.q.argmax(1) == 3)
    eq = fuse([uncertain, confident], weighting="fixed", fixed_weights=[0.5, 0.5])
    np.testing.assert_allclose(eq.q, 0.5 * uncertain.pbar + 0.5 * confident.pbar, atol=1e-6)


def test_edge_cases_missing_teacher_single_draw_ties():
    lalm = teacher_stats(np.array([[-1, -1, -1], [0, -1, -1], [0, 1, -1], [-1, -1, -1]]), 3)
    src = teacher_stats(np.array([[2, 2], [2, 2], [1, 1], [-1, -1]]), 3)
    r = fuse([lalm, src])
    assert list(r.status) == [TEACHER_MISSING, EQUAL_WEIGHTS_SINGLE_DRAW, FUSED, NO_TEACHER]
    np.testing.assert_allclose(r.q[0], [0, 0, 1])                    # LALM absent: source alone
    np.testing.assert_allclose(r.weights[1], [0.5, 0.5])             # one LALM draw: equal weights
    np.testing.assert_allclose(r.weights[2].sum(), 1.0, atol=1e-6)  # a tie (0/1) still fuses
    assert np.isnan(r.q[3]).all() and r.clip_weight[3] == 0
    r2 = fuse([src, lalm])
    assert r2.status[0] == TEACHER_MISSING


def test_mi_requires_soft_draws():
    with pytest.raises(ValueError, match="soft draws"):
        fuse([teacher_stats(np.array([[0, 1]]), 2), teacher_stats(np.array([[0, 1]]), 2)], uncertainty="mi")


def test_sharpen_and_confidence_threshold():
    a = teacher_stats(np.array([[0, 0, 1, 1]]), 2)
    b = teacher_stats(np.array([[0, 0, 0, 1]]), 2)
    plain = fuse([a, b])
    sharp = fuse([a, b], sharpen_temperature=0.5)
    assert sharp.q[0].max() > plain.q[0].max()
    assert fuse([a, b], min_confidence=0.99).clip_weight[0] == 0


def test_torch_and_numpy_agree():
    rng = np.random.default_rng(2)
    soft = rng.dirichlet(np.ones(4), size=(32, 6)).astype(np.float32)
    votes = rng.integers(-1, 4, (32, 5))
    svotes = soft.argmax(-1)
    for unc in ("vote_entropy", "entropy"):
        n = fuse([teacher_stats(votes, 4), teacher_stats(svotes, 4, soft)], uncertainty=unc)
        t = fuse([teacher_stats(torch.tensor(votes), 4), teacher_stats(torch.tensor(svotes), 4, torch.tensor(soft))],
                 uncertainty=unc)
        np.testing.assert_allclose(n.q, t.q.numpy(), atol=1e-6)
        np.testing.assert_allclose(n.weights, t.weights.numpy(), atol=1e-6)
        np.testing.assert_array_equal(n.status, t.status.numpy())


def test_draw_labels_follows_distribution():
    soft = np.tile(np.array([0.1, 0.6, 0.3]), (1, 20000, 1))
    u = np.random.default_rng(0).random((1, 20000))
    counts = np.bincount(draw_labels(soft, u).ravel(), minlength=3) / 20000
    np.testing.assert_allclose(counts, [0.1, 0.6, 0.3], atol=0.02)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(2, 6), st.floats(0.05, 5.0), st.integers(0, 10_000),
       st.sampled_from(["vote_entropy", "mi", "entropy"]), st.sampled_from(["exp", "inverse"]))
def test_fused_labels_are_distributions(n, k, C, tau, seed, uncertainty, weighting):
    rng = np.random.default_rng(seed)
    lsoft = rng.dirichlet(np.ones(C) * 0.3, size=(8, n)).astype(np.float32)
    ssoft = rng.dirichlet(np.ones(C) * 0.3, size=(8, k)).astype(np.float32)
    lvotes = np.where(rng.random((8, n)) < 0.2, -1, lsoft.argmax(-1))
    lsoft[lvotes < 0] = np.nan
    if uncertainty == "mi":
        lvotes[:, 0] = lsoft[:, 0].argmax(-1) if not np.isnan(lsoft[:, 0]).any() else 0
        lsoft[:, 0] = np.where(np.isnan(lsoft[:, 0]), 1.0 / C, lsoft[:, 0])
        lvotes = np.where(lvotes < 0, -1, lvotes)
    r = fuse([teacher_stats(lvotes, C, lsoft), teacher_stats(ssoft.argmax(-1), C, ssoft)],
             uncertainty=uncertainty, weighting=weighting, tau=tau)
    assert np.all(np.isfinite(r.q))
    np.testing.assert_allclose(r.q.sum(1), 1.0, atol=1e-5)
    assert np.all(r.q >= -1e-7)
    np.testing.assert_allclose(r.weights.sum(1), 1.0, atol=1e-5)
    assert np.all((r.weights >= 0) & (r.weights <= 1 + 1e-6))


def test_zero_fixed_weight_means_absent():
    lalm = teacher_stats(np.array([[-1, -1], [1, 1]]), 3)
    src = teacher_stats(np.array([[2, 2], [2, 2]]), 3)
    r = fuse([lalm, src], weighting="fixed", fixed_weights=[1.0, 0.0])
    assert np.isnan(r.q[0]).all() and r.status[0] == NO_TEACHER     # the source does not stand in
    np.testing.assert_allclose(r.q[1], [0, 1, 0])
