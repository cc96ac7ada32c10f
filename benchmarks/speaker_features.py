"""Speaker statistics in the student: centred trunk features against balanced outputs, chosen on dev.

    python -m benchmarks.speaker_features --cells 'outputs/benchmarks/encoders/*_paper/seed0/encoderwhisper_base*'
        [--seeds 0 1] [--out benchmarks/results/speaker_features]

What a student can do with a speaker's clips taken together (#41, item 5), on finished cells' stored
labels (the adaptation split's trunk output and fused label ``q``; the dev and test splits' trunk output
and true class), with no Ray and no LALM call. One learner for every arm: a fresh linear head on the
standardised trunk output, trained on ``q`` (cross-entropy to the soft label, AdamW 1e-3, 30 epochs,
batch 32; the mean of ``--seeds``). The arms differ only in what they use of a speaker:

- ``per_clip``: nothing, each clip alone (what every per-clip figure scores);
- ``balanced_outputs``: the head's distributions rebalanced within each speaker towards the prior
  (``evaluation.by_speaker``: what ``jobs/predict.py --by-speaker`` and every ``*_by_speaker`` figure do);
- ``centred_features``: each speaker's trunk output moved to the adaptation split's mean
  (x - mean_speaker + mean_all), in training and at dev/test, so the head never sees a speaker's offset;
- ``centred_and_balanced``: both.

The choice between them is made on the dev split (its true labels); the test split is scored for
every arm, once, and reported beside it.
"""
from __future__ import annotations

import argparse
import glob
import os

import numpy as np
import pandas as pd

from benchmarks.common import commit, machine, results_dir

ARMS = ["per_clip", "balanced_outputs", "centred_features", "centred_and_balanced"]


def read_split(cell: str, split: str, labels: list[str]) -> dict:
    """A split's stored trunk output, true class, speaker and (adaptation only) fused label."""
    from mifuse_ray.models.base import TRUNK_FEATURES
    table = pd.read_parquet(os.path.join(cell, split, "labels.parquet"))
    table = table[table[TRUNK_FEATURES].notna()]
    truth = "oracle_label" if split == "labels" else "label"
    return {"x": np.stack(table[TRUNK_FEATURES].to_numpy()).astype(np.float32),
            "y": table[truth].map(labels.index).to_numpy(),
            "speaker": table["speaker_id"].astype(str).to_numpy(),
            "q": np.stack(table["q"].to_numpy()).astype(np.float32) if split == "labels" else None}


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
    scores = {(arm, split): [] for arm in ARMS for split in ("dev", "test")}
    for seed in seeds:
        heads = {"raw": fit_head(adapt["x"], adapt["q"], seed), "centred": fit_head(shifted["adapt"], adapt["q"], seed)}
        for split_name, split in (("dev", dev), ("test", test)):
            raw, cen = heads["raw"](split["x"]), heads["centred"](shifted[split_name])
            preds = {"per_clip": raw.argmax(1), "balanced_outputs": by_speaker(list(raw), split["speaker"], cfg),
                     "centred_features": cen.argmax(1), "centred_and_balanced": by_speaker(list(cen), split["speaker"], cfg)}
            for arm, pred in preds.items():
                scores[(arm, split_name)].append(uar(split["y"], pred, C))
    transfer = os.path.basename(os.path.dirname(os.path.dirname(cell))).replace("__", "→").replace("_paper", "")
    return [{"transfer": transfer, "arm": arm, "dev_uar": float(np.mean(scores[(arm, "dev")])),
             "test_uar": float(np.mean(scores[(arm, "test")])), "dev_clips": len(dev["y"]), "test_clips": len(test["y"])}
            for arm in ARMS]


def main(argv=None) -> None:
    from mifuse_ray.config import MiFuseConfig
    from mifuse_ray.report import markdown_table
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
    wide = table.pivot_table(index="arm", columns="transfer", values="dev_uar").reindex(ARMS)
    average = table.groupby("arm")[["dev_uar", "test_uar"]].mean().reindex(ARMS)
    ranked = average["dev_uar"].sort_values(ascending=False)
    chosen, margin = ranked.index[0], ranked.iloc[0] - ranked.iloc[1]
    os.makedirs(args.out, exist_ok=True)
    table.to_csv(os.path.join(args.out, "speaker_features.csv"), index=False)
    text = (f"# Speaker statistics in the student (`python -m benchmarks.speaker_features --cells '{args.cells}'`)\n\n"
            f"{machine()}, commit {commit()}; {len(cells)} cells, head seeds {args.seeds}. Average over the cells "
            f"(dev: {table.dev_clips.iloc[0]} clips per cell; test: {table.test_clips.iloc[0]}):\n\n"
            + markdown_table(average.round(3).reset_index()) + f"\n\nChosen on dev: **{chosen}**, {margin:.3f} above the next ({ranked.index[1]}). Dev UAR by transfer:\n\n"
            + markdown_table(wide.round(3).reset_index()) + "\n")
    with open(os.path.join(args.out, "speaker_features.md"), "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
