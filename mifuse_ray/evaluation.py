"""Test-split evaluation of every model and teacher of a run, on the same clips."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .config import MiFuseConfig
from .metrics import bootstrap_ci, classification_report, counting_unanswered_as_wrong
from .models.base import TRUNK_FEATURES


def score(y_true, y_pred, num_classes: int) -> dict:
    report = classification_report(y_true, y_pred, num_classes)
    report["uar_ci95"] = bootstrap_ci(y_true, y_pred, num_classes, "uar", n_boot=500)
    return report


def by_speaker(probs, speakers, cfg: MiFuseConfig) -> np.ndarray:
    """Predictions with each speaker's distributions balanced towards the prior over that speaker's
    clips (``fusion_fit.speaker_scales``; speakers with fewer than ``fusion.speaker_min_clips`` clips, or
    without an id, are predicted clip by clip). -1 where a clip has no distribution.

    Why: the cues of emotion (pitch, loudness, rate) differ between speakers as much as between
    emotions, and a model that hears one clip cannot tell a high voice from an excited one; given a
    speaker's clips together, what stays constant over them is the speaker. This is inference over
    a set of clips (transductive within each speaker), so it is scored beside the per-clip figures,
    for every system alike, never instead of them."""
    from .fused_labels import fusion_prior
    from .fusion_fit import rescale_by_speaker, speaker_scales
    C = len(cfg.labels)
    p = np.array([np.asarray(v, dtype=np.float64) if v is not None and len(v) == C else np.full(C, np.nan)
                  for v in probs]).reshape(-1, C)
    speakers = np.asarray(speakers, dtype=object)
    scales = speaker_scales(p, speakers, fusion_prior(cfg.fusion, C), cfg.fusion.speaker_min_clips)
    balanced = rescale_by_speaker(p, speakers, scales)
    ok = np.isfinite(balanced).all(1)
    return np.where(ok, np.nan_to_num(balanced).argmax(1), -1)


def balanced_over_clips(probs, cfg: MiFuseConfig) -> np.ndarray:
    """Predictions with the distributions balanced towards the prior over all the clips given, as one
    group (``by_speaker`` with a single speaker). This is the footing of the test split's fused label,
    whose global balancing is fitted on the clips it labels (docs/method.md §3): a per-clip model scored
    this way is compared with that label on equal terms. Transductive over the clips, like ``by_speaker``;
    fewer clips than ``fusion.speaker_min_clips`` stay predicted clip by clip."""
    return by_speaker(probs, ["all clips"] * len(probs), cfg)


def _speakers_to_balance(test: pd.DataFrame, cfg: MiFuseConfig) -> bool:
    if "speaker_id" not in test:
        return False
    counts = test["speaker_id"].dropna().astype(str).value_counts()
    return bool((counts[counts.index != ""] >= cfg.fusion.speaker_min_clips).any())


def test_trunk_stored(test_labels, test: pd.DataFrame) -> bool:
    """Whether labelling stored the source model's trunk output for every test clip, one row each: every
    model with that trunk (the source model, each head-only student, their EMAs) is then scored on it
    with its head alone, and the trunk runs on none of them (``predict.ModelsStage``). Not where a clip
    was labelled in segments, or has no stored output (those are scored on the audio)."""
    if test_labels is None or TRUNK_FEATURES not in test_labels.table:
        return False
    t = test_labels.table
    if "parent_id" in t and t["parent_id"].notna().any():
        return False
    t = t[t["clip_id"].isin(set(test["clip_id"]))]
    return len(t) == len(test) and not t["clip_id"].duplicated().any() and not t[TRUNK_FEATURES].isna().any()


def evaluate_run(cfg: MiFuseConfig, inputs, students: dict, test_labels) -> dict:
    """UAR/WA/F1 (+95% bootstrap CI) on the test split for source, LALM, fused labels and students;
    where the test split names speakers, also with speaker-normalised inference (``by_speaker``)
    under ``test_by_speaker``."""
    from .data import training_clips
    from .fused_labels import source_teacher_name
    from .predict import predict_models
    C = len(cfg.labels)
    out = {"test": {}, "test_by_speaker": {}, "selection": {}, "predictions": {}, "truth": {}}
    if inputs.test_df is None or inputs.test_df.empty:
        out["note"] = "no labelled test split: nothing evaluated"
        return out
    test = inputs.test_df
    truth = dict(zip(test["clip_id"], test["label_index"]))
    speaker_of = dict(zip(test["clip_id"], test["speaker_id"])) if _speakers_to_balance(test, cfg) else None

    def score_by_speaker(name, clip_ids, probs, y):
        if speaker_of is not None:
            pred = counting_unanswered_as_wrong(y, by_speaker(probs, [speaker_of.get(c) for c in clip_ids], cfg), C)
            out["test_by_speaker"][name] = score(y, pred, C)

    stored = test_trunk_stored(test_labels, test)
    if stored:
        from .train.labels import with_stored_trunk
        test = with_stored_trunk(test, test_labels.table)
    decoded = training_clips(test, cfg.audio)     # every model in one pass over the audio
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
    stored_of = inputs.source_checkpoint if stored else None
    for name, pred in predict_models(decoded, models, cfg, stored_trunk_of=stored_of).items():
        pred = pred[pred["error"].isna()]
        y = np.array([truth[c] for c in pred["clip_id"]])
        p = np.array([cfg.labels.index(label) for label in pred["pred"]])
        out["test"][name] = score(y, p, C)
        out["predictions"][name] = dict(zip(pred["clip_id"], p.tolist()))
        score_by_speaker(name, pred["clip_id"], pred["probs"], y)
    if test_labels is not None:
        t = test_labels.table
        t = t[t["clip_id"].isin(truth)]
        y = np.array([truth[c] for c in t["clip_id"]])
        for name, col, dist in (("lalm_zero_shot", "lalm_pred", "lalm_pbar"), ("fused_label", "fused_pred", "q")):
            pred = counting_unanswered_as_wrong(y, t[col].to_numpy(), C)
            out["test"][name] = score(y, pred, C)
            out["predictions"][name] = dict(zip(t["clip_id"], pred.tolist()))
            answered = np.where(t[col].to_numpy() >= 0, t[dist].to_numpy(dtype=object), None)
            score_by_speaker(name, t["clip_id"], answered, y)
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


def results_table(results: dict, key: str = "test") -> pd.DataFrame:
    rows = []
    for name, m in results.get(key, {}).items():
        lo, hi = m["uar_ci95"]
        rows.append({"system": name, "UAR": m["uar"], "UAR 95% CI": f"[{lo:.3f}, {hi:.3f}]", "WA": m["wa"],
                     "macro-F1": m["macro_f1"], "clips": m["n"]})
    return pd.DataFrame(rows)
