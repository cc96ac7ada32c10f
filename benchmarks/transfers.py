"""Six-transfer accuracy benchmark (METHOD.md §2): every baseline and MI-Fuse on the demo domains.

    python benchmarks/transfers.py [--seeds 0 1 2] [--scale 1.0] [--out benchmarks/results/transfers]
        [--ablations uncertainty n k alpha] [--transfers acted_studio:call_centre ...]

Resumable: each (transfer, seed, variant) is an adapt run in its own folder, reused when finished
(labels, LALM answers and checkpoints included). LALM answers depend only on the target, and the
response cache is shared, so three label sets serve all six transfers. Writes transfers.md, .csv
and transfers.png from whatever cells are finished.
"""
import argparse
import dataclasses
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DOMAINS = ("acted_studio", "call_centre", "podcast")
SYSTEMS = ("source_only", "lalm_zero_shot", "lalm_only_student", "source_only_student", "shot_im_student",
           "mifuse_student", "mifuse_ema", "equal_weights_student", "no_ema_student")
ABLATIONS = {"uncertainty": [("fusion.uncertainty", v) for v in ("mi", "entropy")],
             "n": [("fusion.lalm_answers", v) for v in (1, 3, 5, 10)],
             "k": [("fusion.source_passes", v) for v in (1, 5, 10, 20)],
             "alpha": [("train.ema_decay", v) for v in (0.99, 0.995, 0.999)]}


def run_cell(source, target, seed, out_root, scale, overrides=(), baselines=True):
    from mifuse_ray.api import adapt
    from mifuse_ray.config import MiFuseConfig, apply_overrides
    tag = "_".join(f"{k.split('.')[-1]}{v}" for k, v in overrides) or "main"
    out = os.path.join(out_root, f"{source}__{target}", f"seed{seed}", tag)
    done = os.path.join(out, "results.json")
    if os.path.exists(done):
        return json.load(open(done))["results"]
    cfg = MiFuseConfig(output=out, baselines=baselines)
    cfg.demo = dataclasses.replace(cfg.demo, source_domain=source, target_domain=target, scale=scale,
                                   root=os.path.join(out_root, "_demo"))
    cfg.lalm.n_answers, cfg.source.mc_passes = 10, 20
    cfg.lalm.cache_dir = os.path.join(out_root, "_lalm_cache")
    apply_overrides(cfg, {"train.seed": seed, "fusion.lalm_answers": 5, "fusion.source_passes": 10,
                          **dict(overrides)})
    return adapt(cfg).results


def summarize(cells, out_root):
    import numpy as np
    import pandas as pd
    rows = [{"transfer": t, "seed": s, "variant": v, "system": name, "uar": m["uar"], "wa": m["wa"],
             "macro_f1": m["macro_f1"]}
            for (t, s, v), res in cells.items() for name, m in res.get("test", {}).items()]
    if not rows:
        return
    df = pd.DataFrame(rows)
    df.to_csv(os.path.join(out_root, "transfers_cells.csv"), index=False)
    agg = df.groupby(["variant", "system", "transfer"]).uar.agg(["mean", "std", "count"]).reset_index()
    agg.to_csv(os.path.join(out_root, "transfers.csv"), index=False)
    main = agg[agg.variant == "main"].pivot(index="system", columns="transfer", values="mean")
    main["average"] = main.mean(1)
    from mifuse_ray.report import markdown_table
    lines = ["# Six-transfer benchmark (test UAR, mean over seeds)", "", markdown_table(main.round(3).reset_index()), ""]
    other = agg[agg.variant != "main"]
    if len(other):
        abl = other[other.system.isin(["mifuse_student", "mifuse_ema"])].groupby(["variant", "system"])["mean"].mean()
        lines += ["## Ablations (average over finished transfers)", "", markdown_table(abl.round(3).reset_index()), ""]
    open(os.path.join(out_root, "transfers.md"), "w").write("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ax = main["average"].sort_values().plot.barh(figsize=(6, 4))
    ax.set_xlabel("average test UAR over transfers")
    plt.tight_layout()
    plt.savefig(os.path.join(out_root, "transfers.png"), dpi=110)
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--out", default="benchmarks/results/transfers")
    p.add_argument("--ablations", nargs="*", default=[], choices=sorted(ABLATIONS))
    p.add_argument("--transfers", nargs="*", default=None, help="source:target pairs (default: all six)")
    args = p.parse_args()
    from mifuse_ray.ray_utils import init_ray
    init_ray()
    out_root = os.path.abspath(args.out)
    os.makedirs(out_root, exist_ok=True)
    transfers = [tuple(t.split(":")) for t in args.transfers] if args.transfers else \
        [(s, t) for s, t in itertools.permutations(DOMAINS, 2)]
    cells = {}
    for seed, (source, target) in itertools.product(args.seeds, transfers):   # a whole seed first
        name = f"{source}→{target}"
        cells[(name, seed, "main")] = run_cell(source, target, seed, out_root, args.scale)
        for ablation in args.ablations:
            for override in ABLATIONS[ablation]:
                cells[(name, seed, f"{override[0]}={override[1]}")] = run_cell(
                    source, target, seed, out_root, args.scale, (override,), baselines=False)
        summarize(cells, out_root)


if __name__ == "__main__":
    main()
