"""Every system of a six-transfer tree scored on the fused label's footing: balanced over the test split.

    python -m benchmarks.balanced_scoring --bench-root <a transfers tree> [--seeds 0 1 2]
        [--out benchmarks/results/balanced_scoring]

Why: the test split's fused label is labelled as if it were an adaptation split, so its global
balancing (the Sinkhorn scale that makes the mean label the prior) is fitted on the very test clips it
is scored on; students, the source model and the LALM's own answers are scored clip by clip. The
issue's first target compares the two. Here every system's test distributions are also balanced over
the test split with that same Sinkhorn step (`evaluation.balanced_over_clips`), so that each is
scored as the fused label is. No LALM call, no training, no Ray: the stored models of each finished
main cell predict the test clips again (the pipeline's own inference stage), and the LALM's and the
fused label's distributions come from the stored test labels.

Columns: `per_clip` (as `transfers.md`; recomputed, and checked against the cell's results.json),
`balanced` (over the test split), `by_speaker` (each speaker's clips balanced, from results.json).
Resumable: each cell's rows are kept in `<out>/cells/` and not recomputed.
"""
import argparse
import json
import os
import sys

import numpy as np
import pandas as pd

from benchmarks.common import results_dir, runs_dir
from benchmarks.transfers import cell_config

SCORINGS = ["per_clip", "balanced", "by_speaker"]


def cell_rows(cell: str, source: str, target: str, seed: int, bench_root: str) -> list[dict]:
    """One row per (system, scoring) of a finished main cell."""
    from mifuse_ray.audio import load_audio
    from mifuse_ray.evaluation import balanced_over_clips
    from mifuse_ray.inputs import resolve_inputs
    from mifuse_ray.metrics import counting_unanswered_as_wrong, uar
    from mifuse_ray.predict import ModelsStage
    results = json.load(open(os.path.join(cell, "results.json")))["results"]
    cfg = cell_config(source, target, seed, cell, bench_root, 1.0)
    inputs = resolve_inputs(cfg)
    C = len(cfg.labels)
    test = inputs.test_df.reset_index(drop=True)
    clips = test[["clip_id"]].assign(audio=[load_audio(p, cfg.audio) for p in test["path"]], error=None)
    truth = np.array([results["truth"][c] for c in test["clip_id"]])
    models = {"source_only": inputs.source_checkpoint}
    for mode in sorted(os.listdir(os.path.join(cell, "models"))):
        for kind in ("student", "ema"):
            if os.path.isdir(os.path.join(cell, "models", mode, kind)):
                models[f"{mode}_{kind}"] = os.path.join(cell, "models", mode, kind)
    predicted = ModelsStage(models, amp=False)(clips)        # the pipeline's own inference, every model
    probs = {name: np.stack(predicted.loc[predicted["model"] == name, "probs"].to_numpy()) for name in models}
    labels = pd.read_parquet(os.path.join(cell, "labels_test", "labels.parquet")).set_index("clip_id")
    labels = labels.loc[test["clip_id"]]
    answered = labels["error"].isna().to_numpy()
    for name, column in (("lalm_zero_shot", "lalm_pbar"), ("fused_label", "q")):
        probs[name] = np.stack([np.asarray(v, dtype=np.float64) if ok else np.full(C, np.nan)
                                for v, ok in zip(labels[column], answered)])

    def score(pred):        # a clip the LALM could not answer counts as wrong, as in transfers.md
        return uar(truth, counting_unanswered_as_wrong(truth, pred, C), C)
    rows = []
    for name, p in probs.items():
        per_clip = score(np.where(np.isfinite(p).all(1), np.nan_to_num(p).argmax(1), -1))
        stored = results["test"].get(name, {}).get("uar")
        if stored is not None and abs(per_clip - stored) > 0.02:
            print(f"note: {cell} {name}: per-clip UAR {per_clip:.3f} here, {stored:.3f} stored")
        scores = {"per_clip": per_clip, "balanced": score(balanced_over_clips(p, cfg)),
                  "by_speaker": results.get("test_by_speaker", {}).get(name, {}).get("uar", np.nan)}
        rows += [{"transfer": f"{source}→{target}", "seed": seed, "system": name, "scoring": k, "uar": v}
                 for k, v in scores.items()]
    return rows


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per system and scoring: the mean over transfers of each seed, then mean ± std (sample) over seeds."""
    per_seed = df.groupby(["system", "scoring", "seed"])["uar"].mean().unstack("scoring")
    mean, std = per_seed.groupby("system").mean(), per_seed.groupby("system").std().fillna(0.0)
    out = pd.DataFrame({k: [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean[k], std[k])] for k in SCORINGS},
                       index=mean.index)
    out["balanced − per_clip"] = (mean["balanced"] - mean["per_clip"]).round(3)
    return out.loc[mean["balanced"].sort_values(ascending=False).index].reset_index()


def by_transfer(df: pd.DataFrame) -> pd.DataFrame:
    """Per system and transfer, "per clip → balanced" (means over seeds)."""
    means = df.groupby(["system", "transfer", "scoring"])["uar"].mean().unstack("scoring")
    arrows = means["per_clip"].map("{:.3f}".format) + " → " + means["balanced"].map("{:.3f}".format)
    return arrows.unstack("transfer").reset_index()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench-root", default=runs_dir("transfers"), help="a transfers.py tree")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=results_dir("balanced_scoring"))
    args = p.parse_args()
    import torch
    torch.set_num_threads(2)
    os.makedirs(os.path.join(args.out, "cells"), exist_ok=True)
    frames = []
    for pair in sorted(os.listdir(args.bench_root)):
        if "__" not in pair:
            continue
        source, target = pair.split("__")
        for seed in args.seeds:
            cell = os.path.join(args.bench_root, pair, f"seed{seed}", "main")
            if not os.path.exists(os.path.join(cell, "results.json")):
                continue
            kept = os.path.join(args.out, "cells", f"{pair}_seed{seed}.csv")
            if not os.path.exists(kept):
                pd.DataFrame(cell_rows(cell, source, target, seed, args.bench_root)).to_csv(kept, index=False)
                print(f"scored {pair} seed {seed}", flush=True)
            frames.append(pd.read_csv(kept))
    if not frames:
        sys.exit(f"no finished main cells under {args.bench_root}: run benchmarks/transfers.py first")
    df = pd.concat(frames, ignore_index=True)
    df.to_csv(os.path.join(args.out, "balanced_scoring.csv"), index=False)
    from benchmarks.common import commit, machine
    from mifuse_ray.report import markdown_table
    text = "\n".join([f"# Every system scored as the test split's fused label is (test UAR; `python "
                      f"benchmarks/balanced_scoring.py {' '.join(sys.argv[1:])}`)", "",
                      f"On {machine()}, commit {commit()}. Cells: {df.groupby(['transfer', 'seed']).ngroups}; per "
                      "system, the mean over transfers of each seed, then mean ± std over seeds.", "",
                      markdown_table(summary(df)), "",
                      "## By transfer: per clip → balanced over the test split (mean over seeds)", "",
                      markdown_table(by_transfer(df)), ""])
    open(os.path.join(args.out, "balanced_scoring.md"), "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
