"""Classification metrics as pure functions on integer label arrays.

UAR (unweighted average recall) is the SER field's headline number ("UA"): it is
the mean of per-class recalls, so a majority-class guesser cannot look good on an
imbalanced corpus. Classes absent from ``y_true`` are left out of the averages
(their recall is undefined), matching scikit-learn's ``balanced_accuracy_score``.
"""
from __future__ import annotations

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts with true classes on rows and predictions on columns."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    flat = y_true * num_classes + y_pred
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def uar_from_confusion(cm: np.ndarray) -> float:
    recall = per_class_recall(cm)
    return float(np.nanmean(recall)) if np.any(~np.isnan(recall)) else float("nan")


def wa_from_confusion(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def macro_f1_from_confusion(cm: np.ndarray) -> float:
    """Macro-F1 over the classes that occur in the truth or the predictions."""
    tp = np.diag(cm).astype(float)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    if not present.any():
        return float("nan")
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1[present].mean())


def uar(y_true, y_pred, num_classes: int) -> float:
    return uar_from_confusion(confusion_matrix(y_true, y_pred, num_classes))


def counting_unanswered_as_wrong(y_true, y_pred, num_classes: int) -> np.ndarray:
    """A teacher's predictions where a clip it could not answer (-1) counts as wrong, not as
    skipped: a teacher must not look better by failing on the hard clips."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return np.where(y_pred >= 0, y_pred, (y_true + 1) % num_classes)


def macro_f1(y_true, y_pred, num_classes: int) -> float:
    return macro_f1_from_confusion(confusion_matrix(y_true, y_pred, num_classes))


def classification_report(y_true, y_pred, num_classes: int) -> dict:
    """All headline metrics at once, from one confusion matrix."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    return {
        "uar": uar_from_confusion(cm),
        "wa": wa_from_confusion(cm),
        "macro_f1": macro_f1_from_confusion(cm),
        "per_class_recall": per_class_recall(cm).tolist(),
        "confusion": cm.tolist(),
        "n": int(cm.sum()),
    }


def _bootstrap_confusions(y_true, y_pred, num_classes: int, idx: np.ndarray) -> np.ndarray:
    """The confusion matrix of each bootstrap resample (rows of ``idx``), from one bincount."""
    n_boot = len(idx)
    flat = y_true[idx] * num_classes + y_pred[idx]
    offsets = np.arange(n_boot)[:, None] * num_classes * num_classes
    counts = np.bincount((flat + offsets).ravel(), minlength=n_boot * num_classes ** 2)
    return counts.reshape(n_boot, num_classes, num_classes)


def bootstrap_ci(y_true, y_pred, num_classes: int, metric: str = "uar",
                 n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap over clips for UAR / WA / macro-F1."""
    fn = {"uar": uar_from_confusion, "wa": wa_from_confusion, "macro_f1": macro_f1_from_confusion}[metric]
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    n = len(y_true)
    if n == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    stats = np.array([fn(c) for c in _bootstrap_confusions(y_true, y_pred, num_classes, idx)])
    lo, hi = np.nanpercentile(stats, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def paired_uar_difference(y_true, pred_a, pred_b, num_classes: int, n_boot: int = 1000, level: float = 0.95,
                          seed: int = 0) -> tuple[float, float, float]:
    """UAR(a) − UAR(b) on the same clips, with a paired percentile bootstrap CI (the same
    resampled clips for both), so the clip-to-clip noise both share cancels."""
    y_true, pred_a, pred_b = (np.asarray(v, dtype=np.int64) for v in (y_true, pred_a, pred_b))
    diff = uar(y_true, pred_a, num_classes) - uar(y_true, pred_b, num_classes)
    if len(y_true) == 0:
        return float("nan"), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(y_true), size=(n_boot, len(y_true)))
    a = np.array([uar_from_confusion(c) for c in _bootstrap_confusions(y_true, pred_a, num_classes, idx)])
    b = np.array([uar_from_confusion(c) for c in _bootstrap_confusions(y_true, pred_b, num_classes, idx)])
    lo, hi = np.nanpercentile(a - b, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(diff), float(lo), float(hi)
