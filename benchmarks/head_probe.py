"""A head on the source model's fixed features: what it learns from the fused labels, outside the loop.

    python -m benchmarks.head_probe --bench-root <a six-transfer tree> [--transfers acted_studio:podcast ...]
        [--out benchmarks/results/head_probe]

For each transfer (its seed-0 main cell's stored labels; no LALM call, no Ray), the source model's
trunk embeds every adaptation and test clip once (the pooled statistics its head reads, clean clips,
eval mode), and a head is fitted on those fixed features:

- `source_head`: the source model's own head fine-tuned on the fused labels (KL to q + diversity,
  AdamW 3e-4, 16 epochs, batch 32; mean of two seeds): what `train.trainable head` trains, without the
  loop's augmentation, mixup, EMA and re-fusion;
- `source_head_dropout`: the same, its training features drawn with the trunk's dropout on (three
  draws per clip; test features without): what a frozen trunk left in train mode feeds its head;
- `linear`: a fresh linear classifier on the features standardised with the adaptation split's mean
  and spread (class-balanced cross-entropy on the fused label's top class, L2 as scikit-learn's C = 0.1, L-BFGS);
- `linear_by_speaker`: the same with each speaker's clips standardised by that speaker's own mean and
  spread, in training and at test: inference over a speaker's clips together (transductive within a
  speaker), so it compares with the teachers' by-speaker figures (`transfers.py`'s `*_by_speaker`),
  never with their per-clip ones.

- `linear_raw`: `linear` on the features as the head sees them (not standardised);
- `mlp`: a fresh head of the source head's shape on the standardised features (its layers re-initialised;
  the source head's loss, AdamW 1e-3, 48 epochs; mean of two seeds).

Every head also learns the true classes of the adaptation clips (`*_oracle`, a label only the demo has,
one-hot for the source head and `mlp`): how much of what is left is the labels', and how much the learner's.
"""
import argparse
import copy
import os
import sys

import numpy as np
import pandas as pd
import torch

from benchmarks.common import results_dir, runs_dir
from benchmarks.transfers import TRANSFER_DOMAINS, cell_config, main_config
from mifuse_ray.pipeline import LABEL_STAGES


def pooled_features(model, wavs, dropout: bool = False, batch: int = 50) -> np.ndarray:
    """The pooled trunk statistics of every decoded clip (the head's input), trunk in eval mode unless
    ``dropout`` (then its dropout layers only are on: BatchNorm keeps the source's statistics, as in training)."""
    from mifuse_ray.data import pad_batch
    model.eval()
    if dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.train()
    out = []
    with torch.no_grad():
        for i in range(0, len(wavs), batch):
            wav, lengths = pad_batch(wavs[i:i + batch], None)
            out.append(model.trunk(torch.from_numpy(wav), torch.from_numpy(lengths))["pooled"].numpy())
    model.eval()
    return np.concatenate(out)


def fine_tune_head(head, x, q, seed: int, lr=3e-4, epochs=16, batch=32, weight_decay=1e-2) -> torch.nn.Module:
    """The source head trained on fixed features: KL to the soft label + diversity (uniform prior)."""
    from mifuse_ray.train.losses import diversity_kl, soft_label_kl
    torch.manual_seed(seed)
    head = copy.deepcopy(head).train()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    x, q = torch.tensor(x, dtype=torch.float32), torch.tensor(q, dtype=torch.float32)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i:i + batch]
            logits = head(x[idx])
            loss = soft_label_kl(q[idx], logits, torch.ones(len(idx))) + \
                diversity_kl(torch.softmax(logits, -1), torch.full((q.shape[1],), 1.0 / q.shape[1]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


def reinitialised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``module`` with every layer's parameters drawn afresh: the source head's shape without its weights."""
    torch.manual_seed(seed)
    fresh = copy.deepcopy(module)
    for layer in fresh.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    return fresh


def fit_linear(x, y, num_classes: int, l2: float = 10.0):
    """Multinomial logistic regression, classes weighted equally, L2 on the weights (L-BFGS; l2 = 10 is
    scikit-learn's C = 0.1 with class_weight=balanced)."""
    x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y)
    counts = torch.bincount(y, minlength=num_classes).clamp_min(1).double()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        nll = torch.nn.functional.cross_entropy(x @ w + b, y, reduction="none")
        loss = (nll / counts[y]).sum() / num_classes + 0.5 * l2 * (w ** 2).sum() / len(y)
        loss.backward()
        return loss
    opt.step(closure)
    return lambda z: (torch.tensor(z, dtype=torch.float64) @ w + b).detach().numpy()


def standardised(x, groups, reference=None):
    """Each group's rows standardised by that group's mean and spread (``reference``: one group's
    statistics for every row, the adaptation split's)."""
    x = np.asarray(x, dtype=np.float64).copy()
    if reference is not None:
        return (x - reference.mean(0)) / (reference.std(0) + 1e-3)
    for g in np.unique(groups):
        rows = groups == g
        x[rows] = (x[rows] - x[rows].mean(0)) / (x[rows].std(0) + 1e-3)
    return x


def probe_transfer(source: str, target: str, bench_root: str) -> dict | None:
    from mifuse_ray.audio import load_audio
    from mifuse_ray.calibration import choose_fusion
    from mifuse_ray.fused_labels import fit_table, fusion_columns
    from mifuse_ray.inputs import resolve_inputs
    from mifuse_ray.metrics import uar
    from mifuse_ray.models.base import load_model
    cell = os.path.join(bench_root, f"{source}__{target}", "seed0", "main")
    paths = {split: os.path.join(cell, name, "labels.parquet") for split, name in LABEL_STAGES.items()}
    if not all(os.path.exists(p) for p in paths.values()):
        print(f"skipping {source}→{target}: no stored labels under {cell}")
        return None
    cfg = cell_config(source, target, 0, cell, bench_root, 1.0)
    inputs = resolve_inputs(cfg)
    labels, C = list(cfg.labels), len(cfg.labels)
    tables = {split: pd.read_parquet(p) for split, p in paths.items()}
    choice = choose_fusion(tables["adapt"], tables["dev"], main_config().fusion, labels)
    model = load_model(inputs.source_checkpoint)
    splits = {}
    for split, df in (("adapt", inputs.adapt.to_pandas()), ("test", inputs.test_df)):
        t = tables[split][tables[split]["error"].isna()].reset_index(drop=True)
        fit = choice.fit if split == "adapt" else fit_table(t, C, choice.config, choice.fit.temperatures)
        fused = fusion_columns(t, C, choice.config, fit).set_index("clip_id")
        df = df[df["clip_id"].isin(fused.index)].reset_index(drop=True)
        wavs = [load_audio(path, cfg.audio) for path in df["path"]]     # decoded once per split
        splits[split] = {"df": df, "wavs": wavs, "x": pooled_features(model, wavs),
                         "speaker": df["speaker_id"].astype(str).to_numpy(),
                         "truth": np.array([labels.index(v) for v in df["oracle_label"]]),
                         "q": np.stack(fused.loc[df["clip_id"], "q"].to_numpy()),
                         "lalm": fused.loc[df["clip_id"], "lalm_pred"].to_numpy()}
    a, t = splits["adapt"], splits["test"]
    row = {"transfer": f"{source}→{target}", "clips": len(a["df"]),
           "fused_label": uar(t["truth"], t["q"].argmax(1), C), "lalm_zero_shot": uar(t["truth"], t["lalm"], C)}
    test_x = torch.tensor(t["x"])

    def mean_test_uar(train_x, q, epochs, test_x=test_x, fresh=False, lr=3e-4):
        """A head fine-tuned at two seeds (the source head, or a re-initialised one), scored on the test clips."""
        heads = [fine_tune_head(reinitialised(model.head_module(), seed) if fresh else model.head_module(),
                                train_x, q, seed, lr=lr, epochs=epochs) for seed in (0, 1)]
        with torch.no_grad():
            return np.mean([uar(t["truth"], h(test_x).argmax(1).numpy(), C) for h in heads])
    one_hot_truth = np.eye(C)[a["truth"]]
    row["source_head"] = mean_test_uar(a["x"], a["q"], 16)
    row["source_head_oracle"] = mean_test_uar(a["x"], one_hot_truth, 16)
    noisy = np.concatenate([pooled_features(model, a["wavs"], dropout=True) for _ in range(3)])
    row["source_head_dropout"] = mean_test_uar(noisy, np.tile(a["q"], (3, 1)), 6)
    adapt_std, test_std = standardised(a["x"], None, a["x"]), standardised(t["x"], None, a["x"])
    for name, train_x, test_x_linear in (
            ("linear", adapt_std, test_std),
            ("linear_raw", a["x"], t["x"]),
            ("linear_by_speaker", standardised(a["x"], a["speaker"]), standardised(t["x"], t["speaker"]))):
        for suffix, y in (("", a["q"].argmax(1)), ("_oracle", a["truth"])):
            row[name + suffix] = uar(t["truth"], fit_linear(train_x, y, C)(test_x_linear).argmax(1), C)
    for suffix, q in (("", a["q"]), ("_oracle", one_hot_truth)):
        row["mlp" + suffix] = mean_test_uar(adapt_std, q, 48, torch.tensor(test_std, dtype=torch.float32),
                                            fresh=True, lr=1e-3)
    print(row, flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench-root", default=runs_dir("transfers"), help="the six-transfer cells")
    p.add_argument("--transfers", nargs="*", default=None, help="source:target pairs (default: all six)")
    p.add_argument("--out", default=results_dir("head_probe"))
    args = p.parse_args()
    torch.set_num_threads(2)
    pairs = [t.split(":") for t in args.transfers] if args.transfers else \
        [(s, t) for s in TRANSFER_DOMAINS for t in TRANSFER_DOMAINS if s != t]
    rows = [r for r in (probe_transfer(s, t, args.bench_root) for s, t in pairs) if r is not None]
    if not rows:
        sys.exit(f"no stored labels under {args.bench_root}: run benchmarks/transfers.py first")
    from mifuse_ray.report import markdown_table
    df = pd.DataFrame(rows)
    df = pd.concat([df, pd.DataFrame([{"transfer": "average", **df.mean(numeric_only=True)}])], ignore_index=True)
    df["clips"] = df["clips"].round().astype(int)
    os.makedirs(args.out, exist_ok=True)
    df.to_csv(os.path.join(args.out, "head_probe.csv"), index=False)
    text = "\n".join([f"# A head on the source model's fixed features (test UAR; `python -m benchmarks.head_probe "
                      f"{' '.join(sys.argv[1:])}`)", "", markdown_table(df.round(3)), ""])
    open(os.path.join(args.out, "head_probe.md"), "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
