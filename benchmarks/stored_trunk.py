"""A head-only student's epoch on the trunk output stored while labelling, against the waveform path.

    python -m benchmarks.stored_trunk [--target call_centre_adapt48] [--epochs 2]
        [--runs outputs/benchmarks/stored_trunk] [--out benchmarks/results/stored_trunk]

One run, one machine: the demo source (acted_studio) onto a target with 2,400 adaptation clips
(``call_centre_adapt48``: the demo's call_centre with 48 adaptation speakers), labelled once through the
pipeline (the source stage stores each clip's trunk output as it labels), then the shipped student for
``--epochs`` epochs (≥ 2) three ways, one Train worker each, each run afresh:

- ``waveform, augmented``: today's default (``train.augment`` on, so the trunk runs on the audio);
- ``waveform``: the same without the augmentation (the natural alternative: the same work minus noise,
  gain, shift and speed), ``train.features waveform``;
- ``stored``: ``train.augment false``, so ``train.features auto`` reads the stored trunk output.

The table gives each way's epoch time as the training loop measures it (from its first batch to its
last, dev scoring excluded): the first epoch (where the stored way pulls its rows through Ray Data
once) and the later ones (mean), clips per second in those, the whole ``train_student`` call (Ray
Train's start, datasets, every epoch, dev scoring, the final model), and the ratios to the default's.
``final_dev_uar`` is a sanity column (a few epochs on the student's dev half), not an accuracy claim.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time

import numpy as np
import pandas as pd

from benchmarks.common import commit, machine, results_dir, runs_dir
from mifuse_ray.report import markdown_table

WAYS = {"waveform, augmented": {"train.augment": True},
        "waveform": {"train.augment": False, "train.features": "waveform"},
        "stored": {"train.augment": False, "train.features": "auto"}}


def labelled(target: str, runs: str, scale: float):
    """The target labelled once through the pipeline (reused on a rerun): (cfg, tables, choice, inputs)."""
    from mifuse_ray.config import MiFuseConfig
    from mifuse_ray.inputs import prepare
    from mifuse_ray.pipeline import label_run
    cfg = MiFuseConfig(output=os.path.join(runs, target))
    cfg.demo = dataclasses.replace(cfg.demo, target_domain=target, root=os.path.join(runs, "_demo"), scale=scale)
    inputs = prepare(cfg, verbose=False)
    split_labels, choice = label_run(cfg, inputs, cfg.output)
    return cfg, {split: res.table for split, res in split_labels.items()}, choice, inputs


def one_way(cfg, tables, choice, inputs, name: str, settings: dict, epochs: int) -> dict:
    from mifuse_ray.overrides import apply_overrides
    from mifuse_ray.pipeline import student_dev_half
    from mifuse_ray.train.student import train_student
    run_cfg = apply_overrides(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train)),
                              {**settings, "train.epochs": epochs, "train.cpus_per_worker": 1.0})
    tag = name.replace(", ", "_")
    out = os.path.join(cfg.output, "ways", tag)
    shutil.rmtree(out, ignore_errors=True)              # timed afresh: a finished run would be reused
    start = time.time()
    res = train_student(run_cfg, tables["adapt"], student_dev_half(inputs.dev_df), inputs.source_checkpoint,
                        out, run_name=tag, choice=choice, dev_labels=tables.get("dev"))
    wall = time.time() - start
    seconds = [h["epoch_seconds"] for h in res.history]
    return {"way": name, "clips": int(len(tables["adapt"])), "epochs": epochs, "first_epoch_s": seconds[0],
            "later_epoch_s": float(np.mean(seconds[1:])), "later_clips_per_s": len(tables["adapt"]) / np.mean(seconds[1:]),
            "train_student_s": wall, "final_dev_uar": res.history[-1].get("final_dev_uar")}


VARIANTS = {"main": "waveform, augmented", "train.augment=False": "stored",
            "train.augment=False, train.features=waveform": "waveform"}


def compare_cells(runs: str) -> pd.DataFrame:
    """Per finished (transfer, seed): the shipped model's dev UAR (the student's dev half, the split a
    choice between the ways is made on) and test UAR with its 95% clip-bootstrap CI, for each way, from the
    cells ``benchmarks.transfers --ablations stored_trunk`` wrote under ``runs``."""
    import glob
    import json
    rows = []
    for done in sorted(glob.glob(os.path.join(runs, "*__*", "seed*", "*", "results.json"))):
        folder = os.path.dirname(done)
        meta = os.path.join(folder, "cell.json")
        cell = json.load(open(meta)) if os.path.exists(meta) else None
        if cell is None or cell["variant"] not in VARIANTS:
            continue
        res = json.load(open(done))["results"]
        test = res["test"].get("mifuse_ema") or res["test"]["mifuse_student"]
        chosen = res["selection"]["mifuse"]
        rows.append({"transfer": cell["transfer"], "seed": cell["seed"], "way": VARIANTS[cell["variant"]],
                     "dev_uar": chosen["ema_dev_uar"] if chosen["ema_dev_uar"] is not None else chosen["dev_uar"],
                     "test_uar": test["uar"], "test_ci_half": (test["uar_ci95"][1] - test["uar_ci95"][0]) / 2,
                     "fused_label_test_uar": res["test"]["fused_label"]["uar"],
                     "train_seconds": chosen["train_seconds"]})
    return pd.DataFrame(rows)


def comparison_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Each way over the (transfer, seed) cells every way finished: mean dev and test UAR, the mean
    paired difference to the default per cell (and its spread over cells), training seconds."""
    complete = cells.groupby(["transfer", "seed"]).way.nunique() == len(VARIANTS)
    keys = set(complete[complete].index)
    cells = cells[[k in keys for k in zip(cells.transfer, cells.seed)]]
    default = cells[cells.way == "waveform, augmented"].set_index(["transfer", "seed"])
    rows = []
    for way, w in cells.groupby("way", sort=False):
        w = w.set_index(["transfer", "seed"])
        d_dev, d_test = w.dev_uar - default.dev_uar, w.test_uar - default.test_uar
        rows.append({"way": way, "cells": len(w), "dev_uar": w.dev_uar.mean(), "test_uar": w.test_uar.mean(),
                     "dev_minus_default": d_dev.mean(), "dev_diff_sd": d_dev.std(ddof=1),
                     "test_minus_default": d_test.mean(), "test_diff_sd": d_test.std(ddof=1),
                     "test_ci_half": w.test_ci_half.mean(), "fused_label_test_uar": w.fused_label_test_uar.mean(),
                     "train_seconds": w.train_seconds.mean()})
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="call_centre_adapt48")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--runs", default=runs_dir("stored_trunk"))
    ap.add_argument("--out", default=results_dir("stored_trunk"))
    ap.add_argument("--compare", default="", help="a transfers run tree: tabulate its stored_trunk ablation instead")
    args = ap.parse_args(argv)
    if args.compare:
        cells = compare_cells(args.compare)
        table = comparison_table(cells)
        os.makedirs(args.out, exist_ok=True)
        cells.to_csv(os.path.join(args.out, "ways_cells.csv"), index=False)
        text = (f"# Stored trunk output against the waveform path, the six transfers\n\n`python -m benchmarks.transfers "
                f"--seeds 0 1 2 --baselines --ablations stored_trunk`, then `python -m benchmarks.stored_trunk --compare "
                f"<its runs>` on {machine()}, commit {commit()}.\n\n" + markdown_table(table) + "\n")
        with open(os.path.join(args.out, "ways.md"), "w") as fh:
            fh.write(text)
        print(text)
        return
    cfg, tables, choice, inputs = labelled(args.target, args.runs, args.scale)
    rows = [one_way(cfg, tables, choice, inputs, name, settings, args.epochs) for name, settings in WAYS.items()]
    table = pd.DataFrame(rows)
    default = table.loc[table.way == "waveform, augmented"].iloc[0]
    table["later_epoch_speedup"] = default.later_epoch_s / table.later_epoch_s
    table["train_student_speedup"] = default.train_student_s / table.train_student_s
    table["machine"], table["commit"] = machine(), commit()
    os.makedirs(args.out, exist_ok=True)
    table.to_csv(os.path.join(args.out, "stored_trunk.csv"), index=False)
    shown = table.drop(columns=["machine", "commit"])
    text = (f"# A head-only student's epoch: stored trunk output against the waveform path\n\n"
            f"`python -m benchmarks.stored_trunk --target {args.target} --epochs {args.epochs}` on {machine()}, "
            f"commit {commit()}; {int(default.clips)} adaptation clips, one Train worker.\n\n"
            + markdown_table(shown) + "\n")
    with open(os.path.join(args.out, "stored_trunk.md"), "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
