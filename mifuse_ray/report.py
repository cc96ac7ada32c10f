"""``report.md``: accuracy table, confusion matrices, MI/weight plots, LALM spend, stage times."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from .config import MiFuseConfig
from .evaluation import results_table


def _plot_confusions(results: dict, labels, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    items = list(results.get("test", {}).items())
    if not items:
        return
    cols = min(4, len(items))
    rows = int(np.ceil(len(items) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, m) in zip(axes.ravel(), items):
        cm = np.asarray(m["confusion"], dtype=float)
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7)
        ax.set_title(f"{name}\nUAR {m['uar']:.3f}", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=45)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
    for ax in axes.ravel()[len(items):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_uncertainty(table: pd.DataFrame, path: str) -> None:
    """Histograms of each teacher's uncertainty and of the LALM's fusion weight."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = table[table["error"].isna()] if "error" in table else table
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    for name in ("lalm", "source"):
        axes[0].hist(ok[f"{name}_vote_entropy"].dropna(), bins=20, alpha=0.6, label=name)
        axes[1].hist(ok[f"{name}_mi"].dropna(), bins=20, alpha=0.6, label=name)
    axes[0].set_title("vote entropy (nats)")
    axes[1].set_title("BALD mutual information (nats)")
    axes[2].hist(ok["weight_lalm"].dropna(), bins=20, color="C2")
    axes[2].set_title("fusion weight of the LALM")
    for ax in axes[:2]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_none_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_report(cfg: MiFuseConfig, out_dir: str, results: dict, times: dict, labels_table: pd.DataFrame) -> str:
    _plot_confusions(results, cfg.labels, os.path.join(out_dir, "confusion_matrices.png"))
    plot_uncertainty(labels_table, os.path.join(out_dir, "uncertainty.png"))
    lab = results.get("labeling", {})
    spend = results.get("estimated_spend", {})
    table = results_table(results).sort_values("UAR", ascending=False) if results.get("test") else pd.DataFrame()
    lines = ["# MI-Fuse adaptation report", "",
             f"Target: `{cfg.target or f'demo {cfg.demo.source_domain} → {cfg.demo.target_domain}'}` · "
             f"labels: {', '.join(cfg.labels)} · LALM answers N = {cfg.lalm.n_answers} · MC passes K = "
             f"{cfg.source.mc_passes} ({cfg.source.mc_scope} scope) · uncertainty `{cfg.fusion.uncertainty}`, "
             f"τ = {cfg.fusion.tau}", "",
             "## Test-split accuracy", "",
             "Students are chosen on the labelled dev split (never the test split). `source_only` is the source "
             "model, `lalm_zero_shot` the argmax of the LALM's mean answer, `fused_label` the MI-Fuse soft label "
             "itself (no training).", "", markdown_table(table),
             "![confusion matrices](confusion_matrices.png)", "",
             "## Model selection (dev split)", "", markdown_table(pd.DataFrame(results.get("selection", {})).T.reset_index()
                                                            .rename(columns={"index": "run"})
                                                            if results.get("selection") else pd.DataFrame()),
             "## Labeling (adaptation split)", "",
             f"- clips: {lab.get('clips')}, labelled: {lab.get('labelled')}, failures: {lab.get('failures')}",
             f"- LALM requests sent: {lab.get('lalm_requests')}, answers served from cache: {lab.get('lalm_cache_hits')}"
             f"{' (labels reused from an earlier run)' if lab.get('reused') else ''}",
             _budget_line(lab.get("lalm_budget")),
             f"- estimated cost of asking every clip: ${spend.get('estimated_usd', 0):.2f} for "
             f"{spend.get('requests')} requests, {spend.get('audio_seconds_sent', 0):.0f} s of audio",
             f"- teacher agreement: {lab.get('teacher_agreement', float('nan')):.3f}, mean LALM weight: "
             f"{lab.get('mean_weight_lalm', float('nan')):.3f}, fusion outcomes: {lab.get('fusion_status')}",
             ]
    if "uar_fused" in lab:
        lines.append(f"- UAR on the adaptation split ({lab.get('truth_column')}, diagnostics only): LALM "
                     f"{lab['uar_lalm']:.3f}, source {lab['uar_source']:.3f}, fused label {lab['uar_fused']:.3f}")
    lines += ["", "![uncertainty and weights](uncertainty.png)", "", "## Wall time per stage", "",
              markdown_table(pd.DataFrame([{"stage": k, "seconds": float(v)} for k, v in times.items()])),
              "Files: `labels/labels.parquet` (every clip, every draw), `models/<run>/{student,ema}` (checkpoints "
              "in the source format), `tensorboard/`, `run.json` (config, commit, versions, hashes), `results.json`."]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def _budget_line(budget: dict | None) -> str:
    if not budget:
        return "- LALM budget: every decoded clip asked"
    return (f"- LALM budget {budget['budget']:g} ({budget['selection']}): {budget['clips_asked']} of "
            f"{budget['clips_decoded']} decoded clips asked, the rest fused from the source teacher alone")
