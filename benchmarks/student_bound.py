"""How far can the student get? The student's test UAR on each transfer when it learns the
adaptation split's ground truth (an oracle only the demo has), beside the same student on the fused
labels it really gets, and the fused label's and the LALM's own test UAR.

    python -m benchmarks.student_bound [--transfers podcast:call_centre ...] [--epochs 16 48]
        [--labels oracle fused fused_speakers] [--inits source fresh head] [--seeds 0 1 2]
        [--out benchmarks/results/student_bound]

Both students use the `lalm_labels` recipe (fixed soft labels, KL + diversity, no EMA, no
consistency): only the labels differ. For the oracle, every stored LALM answer is replaced by the
clip's true class, so `lalm_labels` learns one-hot truth. If the oracle student stays below the
fused label's test UAR, no recipe that only learns from labels on these clips can pass the labels
by much: the student and the amount of target audio limit it, not the labels. If it passes them
(as from fresh weights at 48 epochs: 0.696 against 0.643, results README), the labels are the limit.

`fused_speakers` learns the fused labels balanced per speaker as well (`fusion.balance_speakers`: 0.740
against 0.633 on the test clips, results README 'Speakers'), the best labels the demo gets without
ground truth: does a student that can learn the truth also learn more from labels right more often?

`--inits fresh` starts the student from fresh weights instead of the source model's (the
`init_fresh` ablation in `transfers.py`: batch statistics, lr 2e-3): it separates what the
source weights cost the student from what the labels cost it. `--inits head` trains what the shipped
default trains (a head on the source model's fixed trunk, its rates, mixup and augmentation): the
default recipe's own ceiling.

Resumable: one CSV row per (transfer, labels, init, epochs, seed), skipped when present. The labels are the
six-transfer benchmark's seed-0 cells (`benchmarks/transfers.py`), labelled here if missing.
"""
import argparse
import dataclasses
import os
import sys
import time

import numpy as np
import pandas as pd

from benchmarks.common import results_dir, runs_dir
from benchmarks.transfers import (
    ABLATIONS,
    TRANSFER_DOMAINS,
    WHOLE,
    cell_config,
    label_cell,
)

# the student's start (train.* settings): the whole network from the source weights, as the committed rows were
# measured; the init ablation's fresh start; or the shipped student (`head`: the default's head on the source
# trunk, every train.* setting at its default but the mode and the length)
INITS = {name: {key.split(".")[1]: value for key, value in run}
         for name, run in (("source", WHOLE), ("fresh", ABLATIONS["init_fresh"][0]), ("head", ()))}
COLUMNS = ["transfer", "labels", "init", "epochs", "seed", "student_test_uar", "student_dev_uar", "fused_label_test_uar",
           "lalm_test_uar", "train_label_uar", "clips", "seconds"]


def oracle_table(table: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """The labels table with every LALM answer replaced by the clip's true class."""
    out = table.copy()
    truth = [labels.index(v) for v in out["oracle_label"]]
    out["lalm_votes"] = [np.full(len(v), t) for v, t in zip(out["lalm_votes"], truth)]
    out["lalm_soft"] = [np.stack([np.eye(len(labels))[t]] * len(v)) for v, t in zip(out["lalm_votes"], truth)]
    out["lalm_error"] = None
    return out


def test_uar(cfg, test_df: pd.DataFrame, model_dir: str) -> float:
    from mifuse_ray.data import training_clips
    from mifuse_ray.metrics import uar
    from mifuse_ray.predict import predict_decoded
    pred = predict_decoded(training_clips(test_df, cfg.audio), model_dir, cfg)
    truth = dict(zip(test_df["clip_id"], test_df["label_index"]))
    y = np.array([truth[c] for c in pred["clip_id"]])
    return uar(y, np.array([cfg.labels.index(v) for v in pred["pred"]]), len(cfg.labels))


def speaker_choice(split_labels: dict, cfg):
    """The dev-chosen fusion refitted with ``fusion.balance_speakers`` on (the `speakers` ablation's labels)."""
    from mifuse_ray.calibration import choose_fusion
    dev = split_labels.get("dev")
    return choose_fusion(split_labels["adapt"].table, dev.table if dev else None,
                         dataclasses.replace(cfg.fusion, balance_speakers=True), cfg.labels)


def teacher_uar(table: pd.DataFrame, column: str, labels: list[str]) -> float:
    from mifuse_ray.metrics import counting_unanswered_as_wrong, uar
    y = np.array([labels.index(v) for v in table["label"]])
    return uar(y, counting_unanswered_as_wrong(y, table[column].to_numpy(), len(labels)), len(labels))


def run_transfer(source, target, out_root, bench_root, scale, epochs_list, seed, rows, labels=("oracle", "fused"),
                 inits=("source",)):
    from mifuse_ray.api import resolve_inputs
    from mifuse_ray.metrics import uar
    from mifuse_ray.pipeline import student_dev_half
    from mifuse_ray.train.labels import mode_labels, training_table
    from mifuse_ray.train.student import train_student
    transfer = f"{source}→{target}"
    todo = [(lab, init, ep) for lab in labels for init in inits for ep in epochs_list
            if not ((rows["transfer"] == transfer) & (rows["labels"] == lab) & (rows["init"] == init)
                    & (rows["epochs"] == ep) & (rows["seed"] == seed)).any()]
    if not todo:
        return rows
    split_labels, choice = label_cell(source, target, bench_root, scale)
    cfg = cell_config(source, target, seed, os.path.join(runs_dir("student_bound"), f"{source}__{target}"), bench_root, scale)
    inputs = resolve_inputs(cfg)
    student_dev = student_dev_half(inputs.dev_df)
    fused_uar, lalm_uar = (teacher_uar(split_labels["test"].table, c, cfg.labels) for c in ("fused_pred", "lalm_pred"))
    adapt = split_labels["adapt"].table
    adapt = adapt[adapt["error"].isna()].reset_index(drop=True)
    y = np.array([cfg.labels.index(v) for v in adapt["oracle_label"]])
    # fitted once per transfer: the speaker scales do not depend on the start, the length or the seed
    speakers = speaker_choice(split_labels, cfg) if any(lab == "fused_speakers" for lab, _, _ in todo) else None
    for lab, init, ep in todo:
        # oracle: lalm_labels learns the replaced answers; fused: no_ema learns the dev-chosen fusion;
        # fused_speakers: the same choice made with each speaker's labels balanced too.
        # All are fixed soft labels with KL + diversity, no EMA, no consistency.
        table = oracle_table(adapt, cfg.labels) if lab == "oracle" else adapt
        mode = "lalm_labels" if lab == "oracle" else "no_ema"
        lab_choice = speakers if lab == "fused_speakers" else choice
        run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mode=mode, epochs=ep, seed=seed,
                                                                     **INITS[init]))
        q = np.stack(training_table(table, run_cfg, *mode_labels(run_cfg, table, lab_choice))["q"])
        t = time.time()
        res = train_student(run_cfg, table, student_dev, inputs.source_checkpoint, cfg.output,
                            run_name=f"{lab}_e{ep}_s{seed}" + ("" if init == "source" else f"_{init}"),
                            choice=lab_choice)
        row = {"transfer": transfer, "labels": lab, "init": init, "epochs": ep, "seed": seed,
               "student_test_uar": test_uar(cfg, inputs.test_df, res.student_dir),
               "student_dev_uar": res.best_metrics.get("dev_uar"), "fused_label_test_uar": fused_uar,
               "lalm_test_uar": lalm_uar, "train_label_uar": uar(y, q.argmax(1), len(cfg.labels)), "clips": len(table),
               "seconds": time.time() - t}
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        rows = pd.concat([rows, pd.DataFrame([row])], ignore_index=True)
        rows.to_csv(os.path.join(out_root, "student_bound.csv"), index=False)
    return rows


def summarize(rows: pd.DataFrame, out_root: str, command: str) -> None:
    from benchmarks.common import commit, machine
    lines = ["# The student's ceiling: ground-truth labels vs fused labels (test UAR)", "",
             f"`{command}` on {machine()}, commit {commit()}.", "",
             "Student recipe `lalm_labels` (fixed soft labels, no EMA, no consistency) on the adaptation split; "
             "`oracle` learns the true class of every adaptation clip, `fused` the shipped fused labels "
             "(`no_ema`), `fused_speakers` the fused labels balanced per speaker too. `train_label_uar` is the UAR "
             "of the labels the student learnt, on the adaptation clips.", "",
             "| transfer | labels | init | epochs | seed | student test UAR | fused label test UAR | LALM test UAR | "
             "train-label UAR | clips |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows.sort_values(["transfer", "epochs", "labels", "init", "seed"]).itertuples():
        lines.append(f"| {r.transfer} | {r.labels} | {r.init} | {r.epochs} | {r.seed} | {r.student_test_uar:.3f} | "
                     f"{r.fused_label_test_uar:.3f} | {r.lalm_test_uar:.3f} | {r.train_label_uar:.3f} | {r.clips} |")
    # the mean over the transfers run at each seed, then its mean and spread over seeds
    per_seed = rows.groupby(["labels", "init", "epochs", "seed"]).agg(
        student=("student_test_uar", "mean"), fused=("fused_label_test_uar", "mean"), transfers=("transfer", "nunique"))
    lines += ["", "Mean over the transfers run (± the std of that mean over seeds):", "",
              "| labels | init | epochs | transfers | seeds | student test UAR | fused label test UAR |",
              "|---|---|---|---|---|---|---|"]
    for (lab, init, ep), m in per_seed.groupby(level=[0, 1, 2]):
        spread = f" ± {m['student'].std():.3f}" if len(m) > 1 else ""
        lines.append(f"| {lab} | {init} | {ep} | {'/'.join(str(n) for n in sorted(set(m['transfers'])))} | {len(m)} | "
                     f"{m['student'].mean():.3f}{spread} | {m['fused'].mean():.3f} |")
    with open(os.path.join(out_root, "student_bound.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transfers", nargs="*", default=None, help="source:target pairs (default: all six)")
    p.add_argument("--epochs", type=int, nargs="+", default=[16])
    p.add_argument("--labels", nargs="+", default=["oracle", "fused"], choices=["oracle", "fused", "fused_speakers"])
    p.add_argument("--inits", nargs="+", default=["source"], choices=sorted(INITS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--out", default=results_dir("student_bound"))
    p.add_argument("--bench-root", default=runs_dir("transfers"), help="the six-transfer cells")
    args = p.parse_args()
    from mifuse_ray.ray_utils import init_ray
    init_ray()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "student_bound.csv")
    rows = pd.read_csv(path) if os.path.exists(path) else pd.DataFrame(columns=COLUMNS)
    if "init" not in rows.columns:                         # rows written before --inits existed
        rows.insert(2, "init", "source")
    pairs = [t.split(":") for t in args.transfers] if args.transfers else \
        [(s, t) for s in TRANSFER_DOMAINS for t in TRANSFER_DOMAINS if s != t]
    for seed in args.seeds:
        for source, target in pairs:
            rows = run_transfer(source, target, args.out, args.bench_root, args.scale, args.epochs, seed, rows,
                                args.labels, args.inits)
    summarize(rows, args.out, "python -m benchmarks.student_bound " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
