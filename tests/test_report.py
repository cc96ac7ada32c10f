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
