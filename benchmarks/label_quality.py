"""Fused-label quality of every fusion variant, on the adaptation and the test split of every transfer.

    python -m benchmarks.label_quality [--runs outputs/benchmarks/transfers] [--label]
        [--out benchmarks/results/label_quality]

Re-fuses the stored draws (every LALM answer and MC pass; no LALM call) of each transfer's seed-0
main cell: the fusion's global part is fitted on the adaptation split, temperatures and the dev
choice on half of the dev split, and the fused label's argmax is scored against the true labels of
the adaptation split (``oracle_label``, diagnostics only) and of the test split. ``--label`` first
labels the splits that are missing (the six demo transfers and the six onto the validation domains).
Rows: ``default`` (the shipped config, dev choice included), ``paper`` (the paper's fusion),
``lalm`` and ``source`` (each teacher alone) and every other named variant.
"""
import argparse
import itertools
import os
import sys

import numpy as np
import pandas as pd

from benchmarks.common import results_dir, runs_dir
from mifuse_ray.pipeline import LABEL_STAGES


def stored_splits(runs: str, transfer_dir: str) -> dict | None:
    folder = os.path.join(runs, transfer_dir, "seed0", "main")
    paths = {split: os.path.join(folder, name, "labels.parquet") for split, name in LABEL_STAGES.items()}
    if not all(os.path.exists(p) for p in paths.values()):
        return None
    return {split: pd.read_parquet(p) for split, p in paths.items()}


def score_variants(tables: dict, fusion_cfg, labels) -> list[dict]:
    """UAR of each variant's fused label on the adaptation and test splits, fitted as the pipeline fits."""
    from mifuse_ray.calibration import choose_fusion, dev_half, fit_with_dev, variant
    from mifuse_ray.fusion import VARIANTS
    from mifuse_ray.labeling import fit_table, fusion_columns
    from mifuse_ray.metrics import counting_unanswered_as_wrong, uar
    C = len(labels)
    adapt = tables["adapt"]
    choice = choose_fusion(adapt, tables["dev"], fusion_cfg, labels)
    half = dev_half(tables["dev"], fusion_cfg, labels)
    fusions = {"default": (choice.config, choice.fit)}
    fusions.update({name: fit_with_dev(adapt, half, variant(fusion_cfg, name), labels) for name in VARIANTS})
    rows = []
    for (name, (cfg, fit)), split in itertools.product(fusions.items(), ("adapt", "test")):
        t = tables[split]
        t = t[t["error"].isna()].reset_index(drop=True)
        if split != "adapt":        # each split balanced on its own clips, as the pipeline labels it
            fit = fit_table(t, C, cfg, fit.temperatures)
        y = np.array([labels.index(v) for v in (t["oracle_label"] if "oracle_label" in t else t["label"])])
        pred = fusion_columns(t, C, cfg, fit)["fused_pred"].to_numpy()
        rows.append({"variant": name, "split": split, "uar": uar(y, counting_unanswered_as_wrong(y, pred, C), C),
                     "chosen": choice.name if name == "default" else ""})
    return rows


def label_missing(runs: str, transfers, scale: float) -> None:
    from benchmarks.transfers import label_cell
    from mifuse_ray.ray_utils import init_ray
    init_ray()
    for source, target in transfers:
        if stored_splits(runs, f"{source}__{target}") is None:
            print(f"labelling {source}→{target}", flush=True)
            label_cell(source, target, runs, scale)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=runs_dir("transfers"))
    p.add_argument("--out", default=results_dir("label_quality"))
    p.add_argument("--label", action="store_true", help="label the transfers whose splits are missing first")
    p.add_argument("--scale", type=float, default=1.0)
    args = p.parse_args()
    from benchmarks.transfers import TRANSFER_DOMAINS, main_config
    from mifuse_ray.demo.domains import VALIDATION_DOMAINS
    demo = [(s, t) for s, t in itertools.permutations(TRANSFER_DOMAINS, 2)]
    validation = [(s, t) for s in TRANSFER_DOMAINS for t in VALIDATION_DOMAINS]
    if args.label:
        label_missing(args.runs, demo + validation, args.scale)
    cfg = main_config()
    rows = []
    for (source, target), group in [(t, "demo") for t in demo] + [(t, "validation") for t in validation]:
        tables = stored_splits(args.runs, f"{source}__{target}")
        if tables is None:
            print(f"skipping {source}→{target}: no stored labels (run with --label)")
            continue
        for row in score_variants(tables, cfg.fusion, list(cfg.labels)):
            rows.append({"transfer": f"{source}→{target}", "domains": group, **row})
    if not rows:
        sys.exit(f"no labels under {args.runs}: run with --label")
    df = pd.DataFrame(rows)[["variant", "transfer", "split", "uar", "domains", "chosen"]]
    os.makedirs(args.out, exist_ok=True)
    df.to_csv(os.path.join(args.out, "label_quality.csv"), index=False)
    write_markdown(df, args.out, cfg)


def write_markdown(df: pd.DataFrame, out: str, cfg) -> None:
    from mifuse_ray.report import markdown_table
    lines = [f"# Fused-label UAR by fusion variant (N = {cfg.fusion.lalm_answers_used}, K = {cfg.fusion.source_passes_used}; "
             "fitted on the adaptation split, calibrated and chosen on half the dev split)", ""]
    for group, gdf in df.groupby("domains", sort=False):
        wide = gdf.pivot_table(index="variant", columns="split", values="uar", aggfunc="mean")
        teachers = gdf[gdf.variant.isin(["lalm", "source"])].groupby(["transfer", "split"]).uar.max()
        d = gdf[gdf.variant == "default"].set_index(["transfer", "split"]).uar
        beats = (d >= teachers.reindex(d.index) - 1e-9)
        wide["transfers × splits where ≥ the better teacher"] = [
            f"{int((g.set_index(['transfer', 'split']).uar >= teachers.reindex(g.set_index(['transfer', 'split']).index) - 1e-9).sum())}"
            f" / {len(g)}" for _, g in gdf.groupby("variant")]
        wide = wide.sort_values("adapt", ascending=False).reset_index()
        lines += [f"## {group} transfers ({gdf.transfer.nunique()}), average UAR", "", markdown_table(wide.round(3)), ""]
        per = gdf[gdf.variant.isin(["default", "paper", "lalm", "source"])].pivot_table(
            index=["transfer", "split"], columns="variant", values="uar").reset_index()
        chosen = gdf[gdf.variant == "default"].drop_duplicates("transfer").set_index("transfer").chosen
        per["dev choice"] = per.transfer.map(chosen)
        lines += [f"Per transfer ({group}); the default is ≥ the better teacher on {int(beats.sum())} of {len(beats)}:",
                  "", markdown_table(per.round(3)), ""]
    open(os.path.join(out, "label_quality.md"), "w").write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
