"""Is the student's gap to its labels variance or bias? Three seeds' students of every transfer,
scored alone, as a probability ensemble and as one weight-averaged model (a "soup": they all start
from the source weights, so their weights average), beside how often each agrees with the top class
of the fused label it learnt, on its own adaptation clips and on the test clips.

    python -m benchmarks.seed_ensemble --bench-root /tmp/tb/transfers [--variant main] [--seeds 0 1 2]
        [--out benchmarks/results/seed_ensemble]

If the seeds' errors were independent, averaging them would lift the student toward its labels; if
the ensemble ties the single students, the gap is what every seed learns alike from the labels.
Reads a finished `benchmarks/transfers.py` tree (each cell's final model, labels and test split); no
Ray, nothing is trained or asked of the LALM. A few minutes on 2 cores.
"""
import argparse
import glob
import os

import numpy as np
import pandas as pd

from benchmarks.common import commit, machine, results_dir
from mifuse_ray.config import AudioConfig
from mifuse_ray.data import DecodeAudio
from mifuse_ray.metrics import uar
from mifuse_ray.report import markdown_table
from mifuse_ray.source_teacher import SourceTeacherStage


def decoded(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a labels table whose clip decoded, in clip-id order, with their ``audio``."""
    table = table[table["error"].isna()].sort_values("clip_id").reset_index(drop=True)
    batch = DecodeAudio(AudioConfig())(table)
    return batch[batch["error"].isna()].reset_index(drop=True)


def averaged_state(states: list[dict]) -> dict:
    """The mean of floating-point tensors; integer buffers (BatchNorm's step count) from the first."""
    return {k: (sum(s[k].float() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}


def transfer_row(cell: str, variant: str, seeds: list[int]) -> dict | None:
    dirs = [os.path.join(cell, f"seed{s}", variant) for s in seeds]
    models = [os.path.join(d, "models", "mifuse", "ema") for d in dirs]
    if not all(os.path.exists(os.path.join(m, "model.safetensors")) for m in models):
        return None
    stages = [SourceTeacherStage(m, passes_per_clip=0, keep_audio=False) for m in models]
    labels = stages[0].model.labels
    splits = {}
    for split, folder in (("adapt", "labels"), ("test", "labels_test")):
        clips = decoded(pd.read_parquet(os.path.join(dirs[0], folder, "labels.parquet")))
        truth = np.array([labels.index(v) for v in clips["oracle_label"]])
        splits[split] = (list(clips["clip_id"]), list(clips["audio"]), truth, clips["fused_pred"].to_numpy(np.int64))
    soup = SourceTeacherStage(models[0], passes_per_clip=0, keep_audio=False)
    soup.model.load_state_dict(averaged_state([s.model.state_dict() for s in stages]))
    C = len(labels)
    row = {"transfer": os.path.basename(cell).replace("__", "→"), "seeds": len(seeds)}
    for split, (ids, audio, truth, fused) in splits.items():
        probs = [s.predict(ids, audio)["det"] for s in stages]
        row[f"{split}_student_uar"] = float(np.mean([uar(truth, p.argmax(1), C) for p in probs]))
        row[f"{split}_ensemble_uar"] = uar(truth, np.mean(probs, 0).argmax(1), C)
        row[f"{split}_soup_uar"] = uar(truth, soup.predict(ids, audio)["det"].argmax(1), C)
        row[f"{split}_fused_label_uar"] = uar(truth, fused, C)
        row[f"{split}_agrees_with_label"] = float(np.mean([(p.argmax(1) == fused).mean() for p in probs]))
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench-root", required=True, help="a benchmarks/transfers.py output folder")
    p.add_argument("--variant", default="main")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=results_dir("seed_ensemble"))
    a = p.parse_args()
    rows = []
    for cell in sorted(glob.glob(os.path.join(a.bench_root, "*__*"))):
        row = transfer_row(cell, a.variant, a.seeds)
        if row is None:
            print(f"{os.path.basename(cell)}: not every seed has a final model; skipped")
            continue
        rows.append(row)
        print(f"{row['transfer']}: test student {row['test_student_uar']:.3f}, "
              f"ensemble {row['test_ensemble_uar']:.3f}, soup {row['test_soup_uar']:.3f}", flush=True)
    if not rows:
        raise SystemExit(f"no transfer under {a.bench_root} has final models for seeds {a.seeds}")
    df = pd.DataFrame(rows)
    mean = df.drop(columns=["transfer"]).mean().to_dict()
    df = pd.concat([df, pd.DataFrame([{"transfer": f"average ({len(rows)})", **mean}])], ignore_index=True)
    os.makedirs(a.out, exist_ok=True)
    df.to_csv(os.path.join(a.out, "seed_ensemble.csv"), index=False)
    shown = df[["transfer", "test_student_uar", "test_ensemble_uar", "test_soup_uar", "test_fused_label_uar",
                "adapt_agrees_with_label", "test_agrees_with_label", "adapt_student_uar", "adapt_fused_label_uar"]]
    text = "\n".join([
        "# Seeds averaged: variance or bias? (test UAR of the final model, `mifuse_ema`)", "",
        f"`python -m benchmarks.seed_ensemble --bench-root {a.bench_root} --variant {a.variant} --seeds "
        f"{' '.join(map(str, a.seeds))}` on {machine()}, commit {commit()}.", "",
        "`test_student_uar`: the seeds' mean; `ensemble`: their mean probabilities; `soup`: one model with their "
        "mean weights. `agrees_with_label`: how often a student's top class is the fused label's, on the "
        "adaptation clips it learnt and on the test clips (mean over seeds).", "",
        markdown_table(shown.round(3)), ""])
    with open(os.path.join(a.out, "seed_ensemble.md"), "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
