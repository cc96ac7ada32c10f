"""Budgeted LALM queries: fused-label UAR against the share of clips the LALM is asked about.

    python -m benchmarks.budget [--runs outputs/benchmarks/transfers] [--budgets 0.1 0.2 0.3 0.5 1.0]
        [--random-seeds 0 1 2 3 4] [--out benchmarks/results/budget]

Reads the full-budget labels of the six-transfer benchmark (every clip asked, every draw stored),
then for each budget keeps the LALM answers of the selected clips only, exactly as the pipeline
records an unselected clip (no votes), and re-fuses with the shipped fusion (its unsupervised form:
balancing fitted on the split, no dev choice), as the pipeline's fusion stage does.
The selection is the pipeline's ``select_clips`` on the stored source MC draws and embeddings,
so no LALM call is needed. Metric: UAR of the fused label on the adaptation split against its
oracle labels (the label the student learns from); `mi_diverse` vs `random` (mean of seeds).
"""
import argparse
import os
import sys

import numpy as np
import pandas as pd

from benchmarks.common import results_dir, runs_dir


def fused_uar_at_budget(table: pd.DataFrame, cfg, budget: float, method: str, seed: int) -> tuple[float, int]:
    from mifuse_ray.labeling import fused_again, selection_uncertainty
    from mifuse_ray.metrics import uar
    from mifuse_ray.query_budget import budget_count, select_clips
    C = len(cfg.labels)
    t = table[table.error.isna()].reset_index(drop=True).copy()
    k = budget_count(budget, len(t))
    emb = np.stack([np.asarray(e, dtype=np.float32) for e in t.embedding])
    asked = select_clips(selection_uncertainty(t, C), emb, k, method, seed=seed)
    n = max(len(v) for v in t.lalm_votes)
    t["lalm_votes"] = [list(v) if a else [-1] * n for v, a in zip(t.lalm_votes, asked)]
    t["lalm_soft"] = [list(s) if a else [[np.nan] * C] * n for s, a in zip(t.lalm_soft, asked)]
    fused = fused_again(t, C, cfg.fusion)       # the shipped fusion, its balancing fitted on these clips
    y = np.array([list(cfg.labels).index(v) for v in fused.oracle_label])
    return uar(y, fused.fused_pred.to_numpy(), C), int(asked.sum())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=runs_dir("transfers"))
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 1.0])
    p.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default=results_dir("budget"))
    args = p.parse_args()
    from benchmarks.transfers import main_config, stored_labels
    from mifuse_ray.report import markdown_table
    cfg = main_config()
    rows = []
    for transfer, _, table in stored_labels(args.runs):
        for budget in args.budgets:
            u, asked = fused_uar_at_budget(table, cfg, budget, "mi_diverse", 0)
            rnd = [fused_uar_at_budget(table, cfg, budget, "random", s)[0] for s in args.random_seeds]
            rows.append({"transfer": transfer, "budget": budget, "clips_asked": asked, "mi_diverse": u,
                         "random": float(np.mean(rnd)), "random_std": float(np.std(rnd))})
    if not rows:
        sys.exit(f"no full-budget labels under {args.runs}: run benchmarks/transfers.py first")
    df = pd.DataFrame(rows).drop_duplicates(["transfer", "budget"])
    os.makedirs(args.out, exist_ok=True)
    df.to_csv(os.path.join(args.out, "budget.csv"), index=False)
    avg = df.groupby("budget")[["clips_asked", "mi_diverse", "random", "random_std"]].mean().reset_index()
    full = avg.loc[avg.budget == 1.0, "mi_diverse"].iloc[0] if (avg.budget == 1.0).any() else np.nan
    avg["mi_diverse − full"] = avg["mi_diverse"] - full
    avg["mi_diverse − random"] = avg["mi_diverse"] - avg["random"]
    lines = [f"# Fused-label UAR against the LALM budget ({df.transfer.nunique()} transfers: "
             f"{', '.join(sorted(df.transfer.unique()))})", "",
             "Average over transfers; `random` is the mean of seeds " + " ".join(map(str, args.random_seeds)) + ".",
             "", markdown_table(avg.round(3)), "", "## Per transfer", "", markdown_table(df.round(3)), ""]
    open(os.path.join(args.out, "budget.md"), "w").write("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(avg.budget, avg.mi_diverse, "o-", label="MI + k-center")
    ax.errorbar(avg.budget, avg.random, yerr=avg.random_std, fmt="s--", label="random")
    ax.set_xlabel("share of clips asked")
    ax.set_ylabel("fused-label UAR (adapt split)")
    ax.legend()
    plt.tight_layout()
    plt.savefig(os.path.join(args.out, "budget.png"), dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
