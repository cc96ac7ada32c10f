"""Test-split evaluation of every model and teacher of a run, on the same clips."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .config import MiFuseConfig
from .metrics import bootstrap_ci, classification_report


def score(y_true, y_pred, num_classes: int) -> dict:
    report = classification_report(y_true, y_pred, num_classes)
    report["uar_ci95"] = bootstrap_ci(y_true, y_pred, num_classes, "uar", n_boot=500)
    return report


def evaluate_run(cfg: MiFuseConfig, inputs, students: dict, test_labels) -> dict:
    """UAR/WA/F1 (+95% bootstrap CI) on the test split for source, LALM, fused labels and students."""
    from .data import decoded_clips
    from .predict import predict_decoded
    C = len(cfg.labels)
    out = {"test": {}, "selection": {}}
    if inputs.test_df is None or inputs.test_df.empty:
        out["note"] = "no labelled test split: nothing evaluated"
        return out
    test = inputs.test_df
    truth = dict(zip(test["clip_id"], test["label_index"]))
    decoded = decoded_clips(test, cfg.audio)
    models = {"source_only": inputs.source_checkpoint}
    for name, res in students.items():
        models[f"{name}_student"] = res.student_dir
        models[f"{name}_ema"] = res.ema_dir
        out["selection"][name] = {"chosen": res.chosen, "dev_uar": res.best_metrics.get("dev_uar"),
                                  "ema_dev_uar": res.best_metrics.get("ema_dev_uar"),
                                  "epoch": res.best_metrics.get("epoch"), "train_seconds": res.seconds}
    for name, model_dir in models.items():
        pred = predict_decoded(decoded, model_dir, cfg)
        pred = pred[pred["error"].isna()]
        y = np.array([truth[c] for c in pred["clip_id"]])
        p = np.array([cfg.labels.index(label) for label in pred["pred"]])
        out["test"][name] = score(y, p, C)
    if test_labels is not None:
        t = test_labels.table
        t = t[t["clip_id"].isin(truth)]
        y = np.array([truth[c] for c in t["clip_id"]])
        for name, col in (("lalm_zero_shot", "lalm_pred"), ("fused_label", "fused_pred")):
            pred = t[col].to_numpy()
            # a clip a teacher could not answer counts as wrong, not as skipped
            out["test"][name] = score(y, np.where(pred >= 0, pred, (y + 1) % C), C)
    return out


def results_table(results: dict) -> pd.DataFrame:
    rows = []
    for name, m in results.get("test", {}).items():
        lo, hi = m["uar_ci95"]
        rows.append({"system": name, "UAR": m["uar"], "UAR 95% CI": f"[{lo:.3f}, {hi:.3f}]", "WA": m["wa"],
                     "macro-F1": m["macro_f1"], "clips": m["n"]})
    return pd.DataFrame(rows)
