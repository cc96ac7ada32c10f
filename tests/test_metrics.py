import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, accuracy_score, confusion_matrix as sk_cm, f1_score

from mifuse_ray.metrics import bootstrap_ci, classification_report, confusion_matrix, macro_f1, uar


@pytest.mark.parametrize("seed", range(20))
def test_metrics_agree_with_sklearn(seed):
    rng = np.random.default_rng(seed)
    C = int(rng.integers(2, 8))
    n = int(rng.integers(5, 300))
    y = rng.integers(0, C, n)
    p = np.where(rng.random(n) < 0.5, y, rng.integers(0, C, n))
    assert uar(y, p, C) == pytest.approx(balanced_accuracy_score(y, p))
    assert classification_report(y, p, C)["wa"] == pytest.approx(accuracy_score(y, p))
    present = np.union1d(y, p)
    assert macro_f1(y, p, C) == pytest.approx(f1_score(y, p, average="macro", labels=present))
    np.testing.assert_array_equal(confusion_matrix(y, p, C), sk_cm(y, p, labels=list(range(C))))


def test_report_and_bootstrap():
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    p = np.array([0, 1, 1, 1, 2, 0, 3, 3])
    r = classification_report(y, p, 4)
    assert r["uar"] == pytest.approx((0.5 + 1 + 0.5 + 1) / 4)
    assert r["per_class_recall"] == [0.5, 1.0, 0.5, 1.0]
    lo, hi = bootstrap_ci(y, p, 4, n_boot=200)
    assert 0 <= lo <= r["uar"] <= hi <= 1


def test_an_unanswered_clip_counts_as_wrong():
    from mifuse_ray.metrics import counting_unanswered_as_wrong
    y, pred = np.array([0, 1, 2, 3]), np.array([0, -1, 2, -1])
    fixed = counting_unanswered_as_wrong(y, pred, 4)
    assert fixed.tolist() == [0, 2, 2, 0] and (fixed[pred < 0] != y[pred < 0]).all()
