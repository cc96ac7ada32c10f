"""What a run chose, on which split, and the score it chose by: choose on dev, score on test.

A run makes its data-driven choices on the labelled dev split only: the fusion (its dev-fitted teacher
weights and temperatures, and a variant with ``fusion.choose_on_dev``) on the first half, a student's
epoch (``train.final_model smoothed_dev``) on the second, so no dev clip does both. The test split is
scored once, after every choice. ``choices.json`` (and the report's 'Choices' section) says so per run, so a
reviewer can check that no figure in the report was chosen on the split it is reported on.
"""
from __future__ import annotations


def choice_record(cfg, choice, students: dict) -> list[dict]:
    """One row per choice: what was chosen, the split it was made on, its clips and its score there."""
    scores = choice.dev_scores.get(choice.name) if choice.dev_scores else None
    rows = [{"choice": "fusion", "value": choice.name,
             "made_on": "dev, first half" if scores else "nothing (the configured fusion as is)",
             "clips": scores["clips"] if scores else 0,
             "score": {"fused_label_uar": scores["uar"], "ci95": scores["ci95"]} if scores else None,
             "note": choice.note}]
    for name, res in students.items():
        epoch = res.best_metrics.get("epoch")
        if cfg.train.final_model == "smoothed_dev":
            rows.append({"choice": f"{name} student's final model", "value": f"{res.chosen} after epoch {epoch}",
                         "made_on": "dev, second half", "clips": None,
                         "score": {"smoothed_dev_uar": res.best_metrics.get("smoothed_dev_uar")},
                         "note": "the best 3-epoch mean of dev UAR"})
        else:
            rows.append({"choice": f"{name} student's final model", "value": f"{res.chosen} after epoch {epoch}",
                         "made_on": "nothing (the last epoch)", "clips": 0, "score": None,
                         "note": "train.final_model final: the dev half only monitors the run"})
    rows.append({"choice": "test split", "value": "scored once, after every choice", "made_on": "test",
                 "clips": None, "score": None, "note": "no setting of this run was chosen on it"})
    return rows


def choice_lines(rows: list[dict]) -> list[str]:
    """The report's 'Choices' section."""
    lines = ["## Choices: what was chosen on which split", "", "| choice | value | made on | score there |",
             "|---|---|---|---|"]
    for r in rows:
        score = ", ".join(f"{k} {v:.3f}" for k, v in (r["score"] or {}).items() if isinstance(v, float))
        lines.append(f"| {r['choice']} | {r['value']} | {r['made_on']} | {score} |")
    return lines + [""]
