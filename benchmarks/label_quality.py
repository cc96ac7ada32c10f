"""Where the fused label gains or loses against its teachers: does a teacher's per-clip uncertainty
tell when it is wrong?

    python benchmarks/label_quality.py [--runs benchmarks/results/transfers] [--taus 0.1 0.5 2.0]
        [--out benchmarks/results/label_quality]

MI-Fuse rests on one premise: per clip, the less uncertain teacher is the more likely to be right,
so weighting by uncertainty beats either teacher. This re-fuses the stored draws of the six-transfer
benchmark's main cells (adaptation split, oracle labels; no LALM call) and measures the premise:
- UAR of the LALM's p̄, the source's p̄ and the fused label for each uncertainty measure and τ;
- each teacher's accuracy on the third of clips where it is least / most uncertain;
- the mean LALM weight on clips where only the LALM is right against clips where only the source is.
"""
import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

UNCERTAINTIES = ("vote_entropy", "mi", "entropy")


def accuracy_by_uncertainty(uncertainty: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """Accuracy on the least and on the most uncertain third of the clips (ties broken by order)."""
    order = np.argsort(uncertainty, kind="stable")
    third = max(1, len(order) // 3)
    return float(correct[order[:third]].mean()), float(correct[order[-third:]].mean())


def premise_row(table: pd.DataFrame, cfg, taus) -> dict:
    from mifuse_ray.labeling import fusion_columns
    from mifuse_ray.metrics import uar
    C = len(cfg.labels)
    t = table[table.error.isna()].reset_index(drop=True)
    base = fusion_columns(t, C, cfg.fusion)
    y = np.array([list(cfg.labels).index(v) for v in base.oracle_label])
    row = {"lalm": uar(y, base.lalm_pred.to_numpy(), C), "source": uar(y, base.source_pred.to_numpy(), C)}
    for unc in UNCERTAINTIES:
        for tau in taus:
            fused = fusion_columns(t, C, dataclasses.replace(cfg.fusion, uncertainty=unc, tau=tau))
            row[f"fused {unc} τ={tau}"] = uar(y, fused.fused_pred.to_numpy(), C)
    lalm_right, source_right = base.lalm_pred.to_numpy() == y, base.source_pred.to_numpy() == y
    for name, right in (("lalm", lalm_right), ("source", source_right)):
        low, high = accuracy_by_uncertainty(base[f"{name}_{cfg.fusion.uncertainty}"].to_numpy(), right)
        row[f"{name} acc, least uncertain third"], row[f"{name} acc, most uncertain third"] = low, high
    weight = base.weight_lalm.to_numpy()
    row["w_lalm where only the LALM is right"] = float(weight[lalm_right & ~source_right].mean())
    row["w_lalm where only the source is right"] = float(weight[~lalm_right & source_right].mean())
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="benchmarks/results/transfers")
    p.add_argument("--taus", type=float, nargs="+", default=[0.1, 0.5, 2.0])
    p.add_argument("--out", default="benchmarks/results/label_quality")
    args = p.parse_args()
    from mifuse_ray.report import markdown_table
    from transfers import main_config, stored_labels
    cfg = main_config()
    rows = [{"transfer": transfer, **premise_row(table, cfg, args.taus)}
            for transfer, _, table in stored_labels(args.runs)]
    if not rows:
        sys.exit(f"no labels under {args.runs}: run benchmarks/transfers.py first")
    df = pd.DataFrame(rows).set_index("transfer")
    df.loc["average"] = df.mean()
    os.makedirs(args.out, exist_ok=True)
    df.to_csv(os.path.join(args.out, "label_quality.csv"))
    wide = df.T.reset_index().rename(columns={"index": "quantity (adaptation split, seed 0)"})
    lines = [f"# Label quality and the MI-Fuse premise ({len(rows)} transfers, main-cell settings: "
             f"{cfg.fusion.uncertainty}, N = {cfg.fusion.lalm_answers}, K = {cfg.fusion.source_passes})", "",
             markdown_table(wide.round(3)), ""]
    open(os.path.join(args.out, "label_quality.md"), "w").write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
