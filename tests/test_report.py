"""report.md's verdict (pure: a results dict in, Markdown lines out)."""
from mifuse_ray.report import MEASURED_ADAPTATION_CLIPS, verdict_lines


def _results(adaptation_clips: int) -> dict:
    truth = {f"c{i}": i % 4 for i in range(40)}
    right = dict(truth)
    half = {c: (y if i % 2 else (y + 1) % 4) for i, (c, y) in enumerate(truth.items())}
    return {"selection": {"mifuse": {"final model": "ema"}}, "truth": truth,
            "test": {"mifuse_ema": {"uar": 0.5}, "fused_label": {"uar": 1.0}},
            "predictions": {"mifuse_ema": half, "fused_label": right},
            "labeling": {"labelled": adaptation_clips}}


def test_a_student_below_its_labels_on_a_small_split_is_told_what_more_audio_did():
    text = "\n".join(verdict_lines(_results(300), 4))
    assert "below the fused label" in text and "**Warning:**" in text
    assert "It learnt from 300 adaptation clips" in text and "'More target audio'" in text
    # at the size the benchmark measured (or above) there is no measurement to offer
    assert "adaptation clips" not in "\n".join(verdict_lines(_results(MEASURED_ADAPTATION_CLIPS), 4))


def test_a_student_above_everything_gets_no_warning():
    results = _results(300)
    for table in ("predictions", "test"):     # the student is now the one that is always right
        results[table]["mifuse_ema"], results[table]["fused_label"] = \
            results[table]["fused_label"], results[table]["mifuse_ema"]
    text = "\n".join(verdict_lines(results, 4))
    assert "above the fused label" in text and "Warning" not in text and "adaptation clips" not in text


def test_a_wa_far_under_the_lalms_is_said_in_the_verdict():
    """UAR can favour the student while plain accuracy (WA) favours the LALM: more than 0.05 under it, the
    verdict says so; within 0.05 it does not."""
    results = _results(MEASURED_ADAPTATION_CLIPS)
    results["test"]["mifuse_ema"]["wa"] = 0.433
    results["test"]["lalm_zero_shot"] = {"uar": 0.44, "wa": 0.527}
    text = "\n".join(verdict_lines(results, 4))
    assert "**Plain accuracy:** its WA is 0.433 against the LALM's 0.527 (-0.094)" in text
    results["test"]["lalm_zero_shot"]["wa"] = 0.47
    assert "Plain accuracy" not in "\n".join(verdict_lines(results, 4))


def test_the_choice_record_says_which_split_made_each_choice():
    """choices.json: the fusion chosen on the first dev half with its score, the epoch chosen on the second
    half only with train.final_model smoothed_dev, and the test split chosen on by nothing."""
    from types import SimpleNamespace

    from mifuse_ray.choice_record import choice_lines, choice_record
    from mifuse_ray.config import MiFuseConfig
    choice = SimpleNamespace(name="mean_balanced", note="chosen among …",
                             dev_scores={"mean_balanced": {"uar": 0.61, "ci95": [0.5, 0.7], "clips": 70},
                                         "paper": {"uar": 0.4, "ci95": [0.3, 0.5], "clips": 70}})
    students = {"mifuse": SimpleNamespace(chosen="ema", best_metrics={"epoch": 9, "smoothed_dev_uar": 0.58})}
    cfg = MiFuseConfig()
    cfg.train.final_model = "smoothed_dev"
    rows = {r["choice"]: r for r in choice_record(cfg, choice, students)}
    assert rows["fusion"]["value"] == "mean_balanced" and rows["fusion"]["score"]["fused_label_uar"] == 0.61
    assert rows["fusion"]["made_on"] == "dev, first half" and rows["fusion"]["clips"] == 70
    assert rows["mifuse student's final model"] == {**rows["mifuse student's final model"],
                                                    "value": "ema after epoch 9", "made_on": "dev, second half"}
    assert rows["test split"]["made_on"] == "test"
    unchosen = SimpleNamespace(name="configured", note="configured fusion, no dev split used", dev_scores={})
    cfg.train.final_model = "final"
    rows = {r["choice"]: r for r in choice_record(cfg, unchosen, students)}
    assert rows["fusion"]["made_on"].startswith("nothing") and rows["fusion"]["score"] is None
    assert rows["mifuse student's final model"]["made_on"] == "nothing (the last epoch)"
    assert "| fusion | configured | nothing (the configured fusion as is) |  |" in choice_lines(list(rows.values()))
