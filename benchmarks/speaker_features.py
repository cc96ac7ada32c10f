"""Speaker statistics in the student: centred trunk features, balanced outputs, balanced targets, chosen on dev.

    python -m benchmarks.speaker_features --cells 'outputs/benchmarks/encoders/*_paper/seed0/encoderwhisper_base*'
        [--seeds 0 1] [--out benchmarks/results/speaker_features]

What a student can do with a speaker's clips taken together (#41, item 5), on finished cells' stored
labels (the adaptation split's trunk output and fused label ``q``; the dev and test splits' trunk output
and true class), with no Ray and no LALM call. One learner for every arm: a fresh linear head on the
standardised trunk output, trained on soft labels (cross-entropy, AdamW 1e-3, 30 epochs, batch 32; the
mean of ``--seeds``). Two factors differ, only in what they use of a speaker. What the head learns from
(``targets``):

- ``fused``: the fused label ``q`` as the run stored it;
- ``speaker_balanced``: ``q`` balanced within each adaptation speaker towards the prior (what
  ``fusion.balance_speakers`` makes; ``fusion_fit.speaker_scales``): the training labels use the speakers,
  the head still hears one clip at a time, so with ``per_clip`` inference it needs no speaker id at test.

And how it is used (``arm``):

- ``per_clip``: nothing, each clip alone (what every per-clip figure scores);
- ``balanced_outputs``: the head's distributions rebalanced within each speaker towards the prior
  (``evaluation.by_speaker``: what ``jobs/predict.py --by-speaker`` and every ``*_by_speaker`` figure do);
- ``centred_features``: each speaker's trunk output moved to the adaptation split's mean
  (x - mean_speaker + mean_all), in training and at dev/test, so the head never sees a speaker's offset;
- ``centred_and_balanced``: both.

The choice is made on the dev split (its true labels), twice: among every arm, and among the arms
that predict a clip alone (``per_clip``, what a model deployed without speaker ids does). The test split
is scored for every arm, once, and reported beside it, with the fused label's own score on both splits
(``fused_label``, per clip and balanced within each speaker) to say whether a head passes its labels.
"""
from __future__ import annotations

import argparse
import glob
import itertools
import os

import numpy as np
import pandas as pd

from benchmarks.common import commit, machine, results_dir

ARMS = ["per_clip", "balanced_outputs", "centred_features", "centred_and_balanced"]
TARGETS = ["fused", "speaker_balanced"]
PER_CLIP = "per_clip"          # the one arm that uses no speaker at inference


def read_split(cell: str, split: str, labels: list[str]) -> dict:
    """A split's stored trunk output, true class, speaker and fused label."""
    from mifuse_ray.models.base import TRUNK_FEATURES
    table = pd.read_parquet(os.path.join(cell, split, "labels.parquet"))
    table = table[table[TRUNK_FEATURES].notna()]
    truth = "oracle_label" if split == "labels" else "label"
    return {"x": np.stack(table[TRUNK_FEATURES].to_numpy()).astype(np.float32),
            "y": table[truth].map(labels.index).to_numpy(),
            "speaker": table["speaker_id"].astype(str).to_numpy(),
            "q": np.stack(table["q"].to_numpy()).astype(np.float32)}


def speaker_balanced(q: np.ndarray, speakers: np.ndarray, cfg) -> np.ndarray:
    """``q`` balanced within each speaker towards the fusion's prior (speakers under
    ``fusion.speaker_min_clips`` clips unchanged): the labels ``fusion.balance_speakers`` makes."""
    from mifuse_ray.fused_labels import fusion_prior
    from mifuse_ray.fusion_fit import rescale_by_speaker, speaker_scales
    q = q.astype(np.float64)
    scales = speaker_scales(q, speakers, fusion_prior(cfg.fusion, q.shape[1]), cfg.fusion.speaker_min_clips)
    return rescale_by_speaker(q, speakers, scales).astype(np.float32)


def centred(x: np.ndarray, speakers: np.ndarray, to: np.ndarray) -> np.ndarray:
    """Each speaker's vectors shifted so that their mean is ``to``."""
    out = x.copy()
    for s in np.unique(speakers):
        mine = speakers == s
        out[mine] = x[mine] - x[mine].mean(0) + to
    return out


def fit_head(x: np.ndarray, q: np.ndarray, seed: int, epochs: int = 30, batch: int = 32):
    """A linear head on standardised vectors learnt from soft labels; returns a function giving distributions."""
    import torch
    torch.manual_seed(seed)
    mean, spread = x.mean(0), x.std(0) + 1e-6
    X, Q = torch.tensor((x - mean) / spread), torch.tensor(q)
    head = torch.nn.Linear(x.shape[1], q.shape[1])
    opt = torch.optim.AdamW(head.parameters(), 1e-3, weight_decay=1e-2)
    for _ in range(epochs):
        for idx in torch.randperm(len(X)).split(batch):
            loss = -(Q[idx] * torch.log_softmax(head(X[idx]), -1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def distributions(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(head(torch.tensor((z - mean) / spread)), -1).numpy()
    return distributions


def cell_rows(cell: str, seeds, cfg) -> list[dict]:
    from mifuse_ray.evaluation import by_speaker
    from mifuse_ray.metrics import uar
    C = len(cfg.labels)
    adapt, dev, test = (read_split(cell, s, cfg.labels) for s in ("labels", "labels_dev", "labels_test"))
    centre = adapt["x"].mean(0)
    shifted = {name: centred(split["x"], split["speaker"], centre) for name, split in
               (("adapt", adapt), ("dev", dev), ("test", test))}
    targets = {"fused": adapt["q"], "speaker_balanced": speaker_balanced(adapt["q"], adapt["speaker"], cfg)}
    scores = {(t, arm, split): [] for t in TARGETS for arm in ARMS for split in ("dev", "test")}
    for seed, target in itertools.product(seeds, TARGETS):
        heads = {"raw": fit_head(adapt["x"], targets[target], seed),
                 "centred": fit_head(shifted["adapt"], targets[target], seed)}
        for split_name, split in (("dev", dev), ("test", test)):
            raw, cen = heads["raw"](split["x"]), heads["centred"](shifted[split_name])
            preds = {"per_clip": raw.argmax(1), "balanced_outputs": by_speaker(list(raw), split["speaker"], cfg),
                     "centred_features": cen.argmax(1), "centred_and_balanced": by_speaker(list(cen), split["speaker"], cfg)}
            for arm, pred in preds.items():
                scores[(target, arm, split_name)].append(uar(split["y"], pred, C))
    transfer = os.path.basename(os.path.dirname(os.path.dirname(cell))).replace("__", "→").replace("_paper", "")
    common = {"transfer": transfer, "dev_clips": len(dev["y"]), "test_clips": len(test["y"])}
    rows = [{**common, "targets": t, "arm": arm, "dev_uar": float(np.mean(scores[(t, arm, "dev")])),
             "test_uar": float(np.mean(scores[(t, arm, "test")]))} for t in TARGETS for arm in ARMS]
    label = {name: {s: uar(split["y"], pred(split), C) for s, split in (("dev", dev), ("test", test))}
             for name, pred in (("per_clip", lambda split: split["q"].argmax(1)),
                                ("balanced_outputs", lambda split: by_speaker(list(split["q"]), split["speaker"], cfg)))}
    return rows + [{**common, "targets": "fused_label", "arm": arm, "dev_uar": label[arm]["dev"],
                    "test_uar": label[arm]["test"]} for arm in label]


def main(argv=None) -> None:
    from mifuse_ray.config import MiFuseConfig
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", required=True, help="a glob of finished cells' output folders")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default=results_dir("speaker_features"))
    args = p.parse_args(argv)
    cells = sorted(glob.glob(args.cells))
    if not cells:
        raise SystemExit(f"--cells {args.cells!r} matches no folder: give finished cells' output folders")
    cfg = MiFuseConfig()
    table = pd.DataFrame([row for cell in cells for row in cell_rows(cell, args.seeds, cfg)])
    os.makedirs(args.out, exist_ok=True)
    table.to_csv(os.path.join(args.out, "speaker_features.csv"), index=False)
    text = (f"# Speaker statistics in the student (`python -m benchmarks.speaker_features --cells '{args.cells}'`)\n\n"
            f"{machine()}, commit {commit()}; {len(cells)} cells, head seeds {args.seeds}. " + summary_text(table))
    with open(os.path.join(args.out, "speaker_features.md"), "w") as fh:
        fh.write(text)
    print(text)


def summary_text(table: pd.DataFrame) -> str:
    """The average over the cells, the two choices made on dev, and dev UAR by transfer."""
    from mifuse_ray.report import markdown_table
    order = [*TARGETS, "fused_label"]
    average = table.groupby(["targets", "arm"], sort=False)[["dev_uar", "test_uar"]].mean().reset_index()
    average = average.sort_values("targets", key=lambda t: t.map(order.index), kind="stable")
    students = average[average.targets != "fused_label"]
    lines = []
    for what, pool in (("among every arm", students), ("among the per-clip arms (no speaker at inference)",
                                                        students[students.arm == PER_CLIP])):
        ranked = pool.sort_values("dev_uar", ascending=False)
        best, second = ranked.iloc[0], ranked.iloc[1]
        alike = PER_CLIP if best.arm == PER_CLIP else "balanced_outputs"   # an arm that uses speakers: the label too
        label = average[(average.targets == "fused_label") & (average.arm == alike)].iloc[0]
        lines.append(f"- Chosen on dev {what}: **{best.targets} / {best.arm}**, dev {best.dev_uar:.3f} "
                     f"({best.dev_uar - second.dev_uar:+.3f} on the next, {second.targets} / {second.arm}); test "
                     f"{best.test_uar:.3f}, against {label.test_uar:.3f} for the fused label scored alike "
                     f"({best.test_uar - label.test_uar:+.3f}).")
    wide = table.pivot_table(index=["targets", "arm"], columns="transfer", values="dev_uar", sort=False)
    return (f"Average over the cells (dev: {table.dev_clips.iloc[0]} clips per cell; test: "
            f"{table.test_clips.iloc[0]}):\n\n" + markdown_table(average.round(3)) + "\n\n" + "\n".join(lines)
            + "\n\nThe fused label's dev score is not a fair mark: its teacher weights were fitted on the first dev half "
            "(`fusion.weighting dev`). Its test score is, and it is the one the choices are compared with."
            + "\n\nDev UAR by transfer:\n\n" + markdown_table(wide.round(3).reset_index()) + "\n")


if __name__ == "__main__":
    main()
