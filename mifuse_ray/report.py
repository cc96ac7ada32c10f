"""``report.md``: the verdict first, then accuracy, training curves, the fusion and its diagnostics,
labelling and spend, stage times. Plots are PNGs beside it."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from .config import MiFuseConfig
from .evaluation import compare, results_table

TEACHERS_AND_LABELS = {"lalm_zero_shot": "the LALM (zero-shot)", "source_only": "the source model",
                       "fused_label": "the fused label"}
# The adaptation split size the benchmark measured more target audio at (docs/results.md,
# 'More target audio'): below it, a student under its teachers or labels gets that measurement as advice.
MEASURED_ADAPTATION_CLIPS = 1200


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def final_system(results: dict) -> str | None:
    """The MI-Fuse run's final model as a row name of the test table (its EMA when it has one)."""
    sel = results.get("selection", {}).get("mifuse")
    if not sel:
        return None
    name = f"mifuse_{'ema' if sel.get('final model') == 'ema' else 'student'}"
    return name if name in results.get("test", {}) else None


def verdict_lines(results: dict, num_classes: int) -> list[str]:
    """The student against each teacher, the fused label and the best baseline run: UAR difference
    with a paired bootstrap CI, and a plain warning where it is below one of them."""
    final = final_system(results)
    if final is None:
        return ["**Verdict:** no labelled test split, so nothing could be compared."]
    test = results["test"]
    others = dict(TEACHERS_AND_LABELS)
    baselines = {k: v for k, v in test.items()
                 if k.endswith(("_student", "_ema")) and k not in ("mifuse_student", "mifuse_ema")}
    if baselines:
        best = max(baselines, key=lambda k: baselines[k]["uar"])
        others[best] = f"the best baseline run ({best})"
    rows, below = [], []
    for name, what in others.items():
        diff = compare(results, final, name, num_classes)
        if diff is None:
            continue
        d, lo, hi = diff
        sign = "above" if d > 0 else "below" if d < 0 else "level with"
        sure = " (the 95% CI excludes 0)" if lo > 0 or hi < 0 else " (within noise: the 95% CI includes 0)"
        rows.append(f"- {sign} {what}: {d:+.3f} UAR, 95% CI [{lo:+.3f}, {hi:+.3f}]{sure}")
        if d < 0:
            below.append(what)
    lines = [f"**Verdict:** the adapted model (`{final}`, test UAR {test[final]['uar']:.3f}) is", *rows]
    lines += accuracy_gap_to_lalm(test, final)
    if below:
        lines += ["", f"> **Warning:** the student is below {', '.join(below)}. Read 'Fusion' below: each "
                  "teacher's predicted class distribution shows its bias, and the fused label's dev UAR says how "
                  "good the labels it learned from were."]
        clips = results.get("labeling", {}).get("labelled")
        if clips and clips < MEASURED_ADAPTATION_CLIPS:
            lines += ["", f"> It learnt from {clips} adaptation clips. More target audio is what moved students most "
                      f"in the benchmark: {MEASURED_ADAPTATION_CLIPS} clips instead of 300 (four times the speakers) "
                      "lifted them on all six demo transfers, by 2 to 18 points, and on both validation domains, by 1 "
                      "and 7 (docs/results.md, 'More target audio'). If you have more unlabelled target "
                      "audio, add it to the manifest and rerun into the same output folder: the LALM answers already "
                      "paid for come from the response cache."]
    return lines


# How far the adapted model's WA (plain accuracy) may fall under the LALM's before the verdict says so.
WA_GAP_NOTED = 0.05


def accuracy_gap_to_lalm(test: dict, final: str) -> list[str]:
    """UAR weighs every class alike; a user who counts right answers reads WA. Where the adapted model's
    WA is more than WA_GAP_NOTED under the LALM's, the verdict says so rather than let UAR hide it."""
    ours, lalm = test[final].get("wa"), test.get("lalm_zero_shot", {}).get("wa")
    if ours is None or lalm is None or not ours < lalm - WA_GAP_NOTED:
        return []
    return ["", f"> **Plain accuracy:** its WA is {ours:.3f} against the LALM's {lalm:.3f} ({ours - lalm:+.3f}): on "
                "this test split's class balance the LALM answers more clips right; the adapted model's lead, "
                "where it has one, is in the classes the LALM misses (UAR weighs every class alike)."]


def _plot_confusions(results: dict, labels, path: str) -> None:
    plt = _pyplot()
    items = list(results.get("test", {}).items())
    if not items:
        return
    cols = min(4, len(items))
    rows = int(np.ceil(len(items) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, m) in zip(axes.ravel(), items):
        cm = np.asarray(m["confusion"], dtype=float)
        ax.imshow(cm / np.maximum(cm.sum(1, keepdims=True), 1), vmin=0, vmax=1, cmap="Blues")
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7)
        ax.set_title(f"{name}\nUAR {m['uar']:.3f}", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=45)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    for ax in axes.ravel()[len(items):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(students: dict, path: str) -> bool:
    """Per epoch: dev UAR of each run's student and EMA, the fused label's dev UAR as a line, and the
    MI-Fuse run's loss terms."""
    runs = {name: s for name, s in students.items() if s.history}
    if not runs:
        return False
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    for i, (name, s) in enumerate(runs.items()):
        epochs = [h["epoch"] for h in s.history]
        left.plot(epochs, [h.get("dev_uar") for h in s.history], color=f"C{i}", label=f"{name} student")
        if s.ema_dir:
            left.plot(epochs, [h.get("ema_dev_uar") for h in s.history], color=f"C{i}", ls="--", label=f"{name} EMA")
    fused = runs.get("mifuse", next(iter(runs.values()))).fused_dev_uar
    if fused is not None:
        left.axhline(fused, color="k", ls=":", label="fused label")
    left.set(xlabel="epoch", ylabel="dev UAR (student's half of dev)", title="dev UAR per epoch")
    left.legend(fontsize=6)
    main = runs.get("mifuse", next(iter(runs.values())))
    for key in sorted(k for k in main.history[0] if k.startswith("train_") and k != "train_loss"):
        right.plot([h["epoch"] for h in main.history], [h.get(key) for h in main.history], label=key[6:])
    right.set(xlabel="epoch", title="loss terms (mifuse run)")
    right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_fusion(table: pd.DataFrame, labels, path: str) -> None:
    """Each teacher's and the fused label's predicted class distribution (bias at a glance), and
    the LALM's fusion weight and each teacher's uncertainty."""
    plt = _pyplot()
    ok = table[table["error"].isna()] if "error" in table else table
    from .fused_labels import teacher_names
    teachers = teacher_names(ok)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    width = 0.8 / (len(teachers) + 1)
    for i, name in enumerate((*teachers, "fused")):
        pred = ok[f"{name}_pred"][ok[f"{name}_pred"] >= 0].astype(int)
        share = np.bincount(pred, minlength=len(labels)) / max(len(pred), 1)
        axes[0].bar(np.arange(len(labels)) + (i - len(teachers) / 2) * width, share, width, label=name)
    axes[0].set_xticks(range(len(labels)), labels, fontsize=7)
    axes[0].set(title="predicted class share (adaptation split)", ylabel="share of clips")
    axes[0].legend(fontsize=7)
    for name in teachers:
        axes[1].hist(ok[f"{name}_vote_entropy"].dropna(), bins=20, alpha=0.6, label=name)
    axes[1].set(title="vote entropy (nats)")
    axes[1].legend(fontsize=7)
    axes[2].hist(ok["weight_lalm"].dropna(), bins=20, color="C2")
    axes[2].set(title="fusion weight of the LALM")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_none_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def fusion_lines(lab: dict) -> list[str]:
    fusion = lab.get("fusion") or {}
    lines = ["## Fusion", "", f"- fusion used: **{fusion.get('chosen', '?')}** — {fusion.get('note', '')}"]
    if fusion.get("temperatures"):
        lines.append("- teacher temperatures fitted on dev (LALM, source): "
                     + ", ".join(f"{t:.2f}" for t in fusion["temperatures"]))
    for note in fusion.get("fit_notes", []) + lab.get("warnings", []):
        lines.append(f"- note: {note}")
    if fusion.get("dev_scores"):
        rows = [{"fusion": k, "dev UAR": v["uar"], "95% CI": f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]",
                 "dev clips": v["clips"]} for k, v in fusion["dev_scores"].items()]
        lines += ["", "Fused-label UAR on the dev half that chose the fusion (the teachers alone and the paper's "
                  "MI-Fuse for comparison):", "", markdown_table(pd.DataFrame(rows).sort_values("dev UAR",
                                                                                              ascending=False))]
    if lab.get("predicted_classes"):
        share = pd.DataFrame(lab["predicted_classes"]).T
        lines += ["Predicted class share on the adaptation split (a teacher far from the others is biased):", "",
                  markdown_table(share.reset_index().rename(columns={"index": "teacher"}))]
    if "uar_fused" in lab:
        lines.append(f"UAR on the adaptation split ({lab.get('truth_column')}, diagnostics only): LALM "
                     f"{lab['uar_lalm']:.3f}, source {lab['uar_source']:.3f}, fused label {lab['uar_fused']:.3f}")
    return lines + ["", "![fusion diagnostics](fusion.png)", ""]


def labelling_lines(lab: dict, spend: dict) -> list[str]:
    if lab.get("reused"):
        requests = (f"- labels reused from an earlier run: 0 requests sent now (the earlier run sent "
                    f"{lab.get('lalm_requests')}, {lab.get('lalm_cache_hits')} answers came from the cache)")
    else:
        requests = (f"- LALM requests sent: {lab.get('lalm_requests')}, answers served from cache: "
                    f"{lab.get('lalm_cache_hits')}")
    return ["## Labelling (adaptation split)", "",
            f"- clips: {lab.get('clips')}, labelled: {lab.get('labelled')}, failures: {lab.get('failures')}",
            requests, budget_line(lab.get("lalm_budget")),
            f"- estimated cost of asking every clip: ${spend.get('estimated_usd', 0):.2f} for "
            f"{spend.get('requests')} requests, {spend.get('audio_seconds_sent', 0):.0f} s of audio",
            f"- teacher agreement: {lab.get('teacher_agreement', float('nan')):.3f}, mean LALM weight: "
            f"{lab.get('mean_weight_lalm', float('nan')):.3f}, fusion outcomes: {lab.get('fusion_status')}", ""]


def write_report(cfg: MiFuseConfig, out_dir: str, results: dict, times: dict, labels_table: pd.DataFrame,
                 students: dict | None = None) -> str:
    _plot_confusions(results, cfg.labels, os.path.join(out_dir, "confusion_matrices.png"))
    plot_fusion(labels_table, cfg.labels, os.path.join(out_dir, "fusion.png"))
    has_curves = plot_training(students or {}, os.path.join(out_dir, "training.png"))
    lab = results.get("labeling", {})
    table = results_table(results).sort_values("UAR", ascending=False) if results.get("test") else pd.DataFrame()
    selection = pd.DataFrame(results.get("selection", {})).T.reset_index().rename(columns={"index": "run"}) \
        if results.get("selection") else pd.DataFrame()
    lines = ["# MI-Fuse adaptation report", "", *verdict_lines(results, len(cfg.labels)), "",
             f"Target: `{cfg.target or f'demo {cfg.demo.source_domain} → {cfg.demo.target_domain}'}` · "
             f"labels: {', '.join(cfg.labels)} · LALM answers N = {cfg.lalm.answers_per_clip} · MC passes K = "
             f"{cfg.source.passes_per_clip} ({cfg.source.mc_scope} scope)", "",
             "## Test-split accuracy", "",
             "`source_only` is the source model, `lalm_zero_shot` the argmax of the LALM's mean answer, "
             "`fused_label` the soft label itself (no training; its class balancing is fitted on these test clips, so "
             "it is scored as a set where the others are scored clip by clip); `<run>_student` / `<run>_ema` the "
             "trained models (docs/configuration.md 'Training modes' says what each run changes).", "", markdown_table(table),
             "![confusion matrices](confusion_matrices.png)", "",
             *speaker_lines(results),
             "## Training", "",
             f"The final model of each run is its EMA teacher when it has one, else its student, at the "
             f"{'last epoch' if cfg.train.final_model == 'final' else 'best 3-epoch mean of dev UAR'} "
             "(train.final_model); dev UAR is measured on the half of the dev split that did not choose the fusion.",
             "", markdown_table(selection)]
    if has_curves:
        lines += ["![training curves](training.png)", ""]
    lines += fusion_lines(lab) + labelling_lines(lab, results.get("estimated_spend", {}))
    if results.get("choices"):
        from .choice_record import choice_lines
        lines += choice_lines(results["choices"])
    lines += ["## Wall time per stage", "",
              markdown_table(pd.DataFrame([{"stage": k, "seconds": float(v)} for k, v in times.items()])),
              "Files: `labels/labels.parquet` (every clip, every draw), `labels_dev/`, `labels_test/`, "
              "`models/<run>/{student,ema}` (checkpoints in the source format), `tensorboard/`, `run.json` "
              "(config, commit, versions, hashes), `results.json`, `choices.json` (what was chosen on which split)."]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def speaker_lines(results: dict) -> list[str]:
    """The same systems with speaker-normalised inference (evaluation.by_speaker), where the test split
    names speakers with enough clips."""
    if not results.get("test_by_speaker"):
        return []
    table = results_table(results, "test_by_speaker").sort_values("UAR", ascending=False)
    return ["### With speaker-normalised inference", "",
            "The same models and teachers, each speaker's predictions balanced towards the class prior over "
            "that speaker's test clips (`evaluation.by_speaker`): inference over a set of clips, not one at a "
            "time, which removes what stays constant over a speaker (their pitch, loudness, rate).", "",
            markdown_table(table)]


def budget_line(budget: dict | None) -> str:
    if not budget or budget.get("budget", 1.0) == 1.0 or budget.get("clips_asked") == budget.get("clips_decoded"):
        return "- LALM budget: every decoded clip asked"
    return (f"- LALM budget {budget['budget']:g} ({budget['selection']}): {budget['clips_asked']} of "
            f"{budget['clips_decoded']} decoded clips asked, the rest fused from the source teacher alone")
