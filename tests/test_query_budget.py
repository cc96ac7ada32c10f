"""Budgeted LALM queries: the selection functions by hand (no Ray)."""
import numpy as np
import pytest

from mifuse_ray.query_budget import budget_count, k_center_greedy, select_clips


def test_budget_count():
    assert budget_count(0.3, 100) == 30 and budget_count(1.0, 7) == 7
    assert budget_count(1.0, 100, budget_clips=25) == 25 and budget_count(0.5, 100, budget_clips=500) == 100
    assert budget_count(0.0, 10) == 0


def test_k_center_greedy_covers_every_cluster():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=float)
    points = np.concatenate([c + 0.1 * rng.standard_normal((20, 2)) for c in centres])
    chosen = k_center_greedy(points, 4, first=0)
    assert sorted(set(chosen // 20)) == [0, 1, 2, 3]                  # one point from each cluster
    assert len(set(chosen)) == 4


def test_mi_diverse_picks_uncertain_and_spread_clips():
    rng = np.random.default_rng(1)
    # 40 clips in two tight clusters; the 10 most uncertain are all in cluster A except two in B
    emb = np.concatenate([rng.normal(0, 0.05, (20, 3)), rng.normal(5, 0.05, (20, 3))])
    unc = np.linspace(0, 1, 40)[rng.permutation(40)] * 0.1
    unc[:8] = 1.0 + np.arange(8) * 0.01                                # cluster A: most uncertain
    unc[20:22] = 0.9                                                  # cluster B: next
    mask = select_clips(unc, emb, 4, "mi_diverse", pool_factor=3)
    assert mask.sum() == 4
    pool = np.argsort(-unc)[:12]
    assert set(np.flatnonzero(mask)) <= set(pool)                      # only uncertain clips
    assert mask[:20].any() and mask[20:].any()                        # and from both clusters
    assert mask[np.argmax(unc)]                                       # starting from the most uncertain
    top4 = np.zeros(40, bool)
    top4[np.argsort(-unc)[:4]] = True
    assert not top4[20:].any()                                        # pure top-k would miss cluster B


def test_random_baseline_and_edges():
    unc, emb = np.arange(10.0), np.zeros((10, 2))
    a, b = select_clips(unc, emb, 3, "random", seed=5), select_clips(unc, emb, 3, "random", seed=5)
    assert a.sum() == 3 and (a == b).all()
    assert select_clips(unc, emb, 0).sum() == 0 and select_clips(unc, emb, 10).all()
    assert select_clips(np.array([np.nan, 1.0, 0.5]), np.eye(3), 1)[1]                     # a clip without MI is never first
    with pytest.raises(ValueError):
        select_clips(unc, emb, 3, "top_secret")
