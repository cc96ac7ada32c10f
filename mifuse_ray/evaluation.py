"""Test-split evaluation of every model and teacher of a run, on the same clips."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .config import MiFuseConfig
from .metrics import bootstrap_ci, classification_report, counting_unanswered_as_wrong


def score(y_true, y_pred, num_classes: int) -> dict:
    report = classification_report(y_true, y_pred, num_classes)
    report["uar_ci95"] = bootstrap_ci(y_true, y_pred, num_classes, "uar", n_boot=500)
    return report


def evaluate_run(cfg: MiFuseConfig, inputs, students: dict, test_labels) -> dict:
    """UAR/WA/F1 (+95% bootstrap CI) on the test split for source, LALM, fused labels and students."""
    from .data import training_clips
    from .fused_labels import source_teacher_name
    from .predict import predict_decoded
    C = len(cfg.labels)
    out = {"test": {}, "selection": {}, "predictions": {}, "truth": {}}
    if inputs.test_df is None or inputs.test_df.empty:
        out["note"] = "no labelled test split: nothing evaluated"
        return out
    test = inputs.test_df
    truth = dict(zip(test["clip_id"], test["label_index"]))
    decoded = training_clips(test, cfg.audio)     # read once per model: small splits stay decoded
    models = {"source_only": inputs.source_checkpoint}
    for i, checkpoint in enumerate(cfg.source.extra_checkpoints):      # extra source-model teachers
        models[f"{source_teacher_name(i + 1)}_only"] = checkpoint
    for name, res in students.items():
        models[f"{name}_student"] = res.student_dir
        if res.ema_dir:
            models[f"{name}_ema"] = res.ema_dir
        out["selection"][name] = {"final model": res.chosen, "epoch": res.best_metrics.get("epoch"),
                                  "dev_uar": res.best_metrics.get("dev_uar"),
                                  "ema_dev_uar": res.best_metrics.get("ema_dev_uar"),
                                  "fused_label_dev_uar": res.fused_dev_uar, "train_seconds": res.seconds}
    for name, model_dir in models.items():
        pred = predict_decoded(decoded, model_dir, cfg)
        pred = pred[pred["error"].isna()]
        y = np.array([truth[c] for c in pred["clip_id"]])
        p = np.array([cfg.labels.index(label) for label in pred["pred"]])
        out["test"][name] = score(y, p, C)
        out["predictions"][name] = dict(zip(pred["clip_id"], p.tolist()))
    if test_labels is not None:
        t = test_labels.table
        t = t[t["clip_id"].isin(truth)]
        y = np.array([truth[c] for c in t["clip_id"]])
        for name, col in (("lalm_zero_shot", "lalm_pred"), ("fused_label", "fused_pred")):
            pred = counting_unanswered_as_wrong(y, t[col].to_numpy(), C)
            out["test"][name] = score(y, pred, C)
            out["predictions"][name] = dict(zip(t["clip_id"], pred.tolist()))
    out["truth"] = {k: int(v) for k, v in truth.items()}
    return out


def compare(results: dict, a: str, b: str, num_classes: int) -> tuple[float, float, float] | None:
    """UAR(a) − UAR(b) on the test clips both were scored on, with a paired bootstrap 95% CI."""
    from .metrics import paired_uar_difference
    pa, pb = results.get("predictions", {}).get(a), results.get("predictions", {}).get(b)
    if not pa or not pb:
        return None
    clips = sorted(set(pa) & set(pb))
    y = [results["truth"][c] for c in clips]
    return paired_uar_difference(y, [pa[c] for c in clips], [pb[c] for c in clips], num_classes, n_boot=500)


def results_table(results: dict) -> pd.DataFrame:
    rows = []
    for name, m in results.get("test", {}).items():
        lo, hi = m["uar_ci95"]
        rows.append({"system": name, "UAR": m["uar"], "UAR 95% CI": f"[{lo:.3f}, {hi:.3f}]", "WA": m["wa"],
                     "macro-F1": m["macro_f1"], "clips": m["n"]})
    return pd.DataFrame(rows)
