"""Six-transfer accuracy benchmark (docs/method.md §5): every baseline and MI-Fuse on the demo domains.

    python -m benchmarks.transfers [--seeds 0 1 2] [--scale 1.0] [--runs outputs/benchmarks/transfers]
        [--out benchmarks/results/transfers]
        [--ablations balancing consistency refusion alpha ...] [--transfers acted_studio:call_centre ...]
        [--baselines lalm_labels source_labels shot_im mifuse_paper equal_weights no_ema]

Resumable: each (transfer, seed, variant) is an adapt run in its own folder under ``--runs``, reused
when finished (labels, LALM answers and checkpoints included); the tables go to ``--out``. LALM answers depend only on the target, and the
response cache is shared, so three label sets serve all six transfers. Writes transfers.md, .csv
and transfers.png from whatever cells are finished.
"""
import argparse
import dataclasses
import glob
import itertools
import json
import os
import sys

from benchmarks.common import mean_std, results_dir, runs_dir
from mifuse_ray.demo.domains import DEMO_DOMAINS

TRANSFER_DOMAINS = tuple(DEMO_DOMAINS)          # the six transfers run between the demo's domains
# The main cells fuse N = 5 of the 10 stored answers and K = 10 of the 20 MC passes; an ablation value
# equal to the main setting (or to the default, for the EMA decay and the uncertainty) is the main cell.
MAIN_SETTINGS = {"fusion.lalm_answers_used": 5, "fusion.source_passes_used": 10}
# A student from fresh weights (shrink 0, perturb 1) normalising by batch statistics, at a learning rate for
# training from scratch.
FRESH_START = (("train.trainable", "all"), ("train.init", "shrink_perturb"), ("train.init_shrink", 0.0),
               ("train.init_perturb", 1.0), ("train.batchnorm", "update"), ("train.lr", 2e-3), ("train.head_lr", 2e-3))
# The whole network trained, as the default did until the head-only student (every rate 3e-4).
WHOLE = (("train.trainable", "all"), ("train.head_lr", 3e-4))
# Each ablation is a list of runs; a run is one (key, value) or a tuple of them changed together.
ABLATIONS = {"balancing": [(("fusion.balance_teachers", "none"), ("fusion.balance_fused", "none"))],
             # the EMA-teacher consistency term turned on (off by default since it measured worse with mixup)
             "consistency": [("train.consistency_weight", 1.0)],
             "anchor_view": [("train.anchor_view", "strong")],
             "refusion": [("train.online_fusion_from_epoch", 1000)],
             "alpha": [("train.ema_decay", v) for v in (0.9, 0.99)],
             # the whole network learns (the default until the head-only student), then the same at a 1e-3 rate
             "whole": [WHOLE, WHOLE[:1] + (("train.lr", 1e-3),)],
             # the whole network with the trunk at a small rate and the head at the default 1e-3 (discriminative
             # fine-tuning): some of what the trunk gains on a→c and c→a, without unlearning the source's features
             "trunk_lr": [WHOLE[:1] + (("train.lr", v),) for v in (3e-5, 1e-4)],
             "init": [WHOLE + (("train.init", "shrink_perturb"), ("train.batchnorm", "update"))],
             "init_fresh": [FRESH_START],
             # the head at the trunk's rate: 16 epochs at 3e-4 barely move it from the source's weights
             "head_lr": [("train.head_lr", 3e-4)],
             "mixup_off": [("train.mixup_alpha", 0.0)],
             # no waveform augmentation: the head-only student then learns on the trunk output stored while
             # labelling (train.features auto, mixup of the stored vectors), and the same on the audio
             "stored_trunk": [("train.augment", False), (("train.augment", False), ("train.features", "waveform"))],
             # the fresh start trained three times as long: with the true labels it needs ~48 epochs to pass
             # the fused label (benchmarks/student_bound.py)
             "init_fresh_long": [FRESH_START + (("train.epochs", 48),)],
             # learn the label only where the fused label's top class reaches 0.5 (41–79 % of the clips by cell); the
             # rest still count in the consistency term
             "min_confidence": [("fusion.min_confidence", 0.5)],
             # the label term on mixed pairs of clips and labels (robustness to the labels' errors)
             "mixup": [("train.mixup_alpha", 0.4)],
             # the generalised cross-entropy instead of the KL in the label term (labels the student doubts pull less)
             "gce": [("train.label_loss", "gce")],
             # the fused label sharpened (q^(1/T), after balancing): its median top class is ~0.5 with a
             # ~0.2 margin, which the student matches in KL while its argmax agrees on only ~60 % of clips
             "sharpen": [("fusion.sharpen_temperature", v) for v in (0.5, 0.25)],
             # the learning rate kept after the warm-up, so that the EMA teacher averages a student still moving
             # (under the cosine the EMA equals the annealed final student), at the default α and a longer one
             "ema_average": [("train.lr_decay", "constant"),
                             (("train.lr_decay", "constant"), ("train.ema_decay", 0.99))],
             # augmentations that keep the emotion: speed perturbation moves F0 and the speaking rate by up to
             # 10 %, and a per-clip gain the loudness by up to 6 dB, the very cues that separate the classes
             # (happy and angry differ by ~8 % in F0 and rate); each off, then both
             "augment": [("train.speed_range", (1.0, 1.0)), ("train.gain_db", 0.0),
                         (("train.speed_range", (1.0, 1.0)), ("train.gain_db", 0.0))],
             # more optimiser steps from the source weights: with the true labels a fresh student needed ~48
             # epochs (benchmarks/student_bound.py), and the shipped one matches its labels' top class on ~60 %
             "epochs": [("train.epochs", v) for v in (32, 48)],
             # each speaker's labels balanced towards the prior as well as the split's (fusion_fit.speaker_scales)
             "speakers": [("fusion.balance_speakers", True)],
             # the model at the end of the best 3-epoch mean of dev UAR instead of the final EMA: on a→p the dev UAR
             # is best after epoch 0 and falls from there, on the other transfers it rises to the end
             "select": [("train.final_model", "smoothed_dev")],
             "uncertainty": [("fusion.uncertainty", v) for v in ("mi", "entropy")],
             "n": [("fusion.lalm_answers_used", v) for v in (1, 3, 5, 10)],
             "k": [("fusion.source_passes_used", v) for v in (1, 5, 10, 20)],
             # The main setting once more (max_failures acts only when a worker dies): the gap between a
             # cell and its repeat is the run-to-run noise at a fixed seed that every ablation carries.
             "repeat": [("train.max_failures", 3)]}
BASELINES = ["lalm_labels", "source_labels", "shot_im", "mifuse_paper", "equal_weights", "no_ema"]
# the suffix of a system scored with speaker-normalised inference (mifuse_ray.evaluation.by_speaker)
BY_SPEAKER = "_by_speaker"


def settings_tag(overrides) -> str:
    """A cell's settings as a folder-name tag (``augmentFalse``; ``""`` for none)."""
    return "_".join(f"{k.split('.')[-1]}{v}" for k, v in overrides)


def run_cell(source, target, seed, out_root, scale, overrides=(), baselines=()):
    from mifuse_ray.api import adapt
    from mifuse_ray.overrides import apply_overrides
    from mifuse_ray.reuse import settings_changed
    tag = settings_tag(overrides) or "main"
    out = os.path.join(out_root, f"{source}__{target}", f"seed{seed}", tag)
    done = os.path.join(out, "results.json")
    wanted = {f"{m}_student" for m in (baselines or [])} | {"mifuse_student"}
    cfg = cell_config(source, target, seed, out, out_root, scale)
    cfg.baselines, cfg.baseline_modes = bool(baselines), list(baselines)
    apply_overrides(cfg, dict(overrides))
    finished = json.load(open(done))["results"] if os.path.exists(done) else {}
    # a cell evaluated before speaker-normalised inference existed runs again: its labels and students are
    # reused, so only the evaluation is repeated
    if wanted <= set(finished.get("test", {})) and "test_by_speaker" in finished:
        changed = settings_changed(out, cfg)
        if not changed:
            return finished                             # finished with every system asked for, at these settings
        print(f"{out}: finished at other settings ({'; '.join(changed[:3])}{' …' if len(changed) > 3 else ''}); "
              "running it again (students whose settings did not change are reused)", flush=True)
    donor = _labelled_main_cell(out_root, source, target, seed, cfg)
    if donor is not None and donor != out:
        _share_labels(donor, out)
    results = adapt(cfg).results
    with open(os.path.join(out, "cell.json"), "w") as fh:
        json.dump({"transfer": f"{source}→{target}", "seed": seed,
                   "variant": ", ".join(f"{k}={v}" for k, v in overrides) or "main"}, fh)
    return results


def cell_config(source, target, seed, out, out_root, scale):
    """The configuration of one cell: a demo transfer, or a demo source onto a validation domain or a
    domain with more adaptation speakers (``demo.domains.domain_named``), written under the same root."""
    from mifuse_ray.config import MiFuseConfig
    from mifuse_ray.overrides import apply_overrides
    cfg = MiFuseConfig(output=out)
    root = os.path.join(out_root, "_demo")
    cfg.demo = dataclasses.replace(cfg.demo, source_domain=source, target_domain=target, scale=scale, root=root)
    cfg.lalm.answers_per_clip, cfg.source.passes_per_clip = 10, 20
    cfg.lalm.cache_dir = os.path.join(out_root, "_lalm_cache")
    return apply_overrides(cfg, {"train.seed": seed, **MAIN_SETTINGS})


def label_cell(source, target, out_root, scale):
    """Only the labels of a cell (adaptation, dev and test splits, every draw stored), where the
    seed-0 main cell will find and reuse them: what the label-quality benchmark re-fuses."""
    from mifuse_ray.api import label_run, resolve_inputs
    out = os.path.join(out_root, f"{source}__{target}", "seed0", "main")
    cfg = cell_config(source, target, 0, out, out_root, scale)
    os.makedirs(out, exist_ok=True)
    return label_run(cfg, resolve_inputs(cfg), out)


def collect_cells(runs: str, out: str | None = None) -> dict:
    """Every finished cell under ``runs``, whichever command ran it, so that a table written by
    one part of the benchmark (a seed, the ablations) holds the parts that ran before it. Run folders
    stay local, so the committed ``transfers_cells.csv`` in ``out`` is read first: a fresh checkout adds
    cells to the record instead of replacing it; a cell finished on disk overrides its recorded row."""
    cells = _recorded_cells(out or runs)
    for done in sorted(glob.glob(os.path.join(runs, "*__*", "seed*", "*", "results.json"))):
        folder = os.path.dirname(done)
        if os.path.exists(os.path.join(folder, "cell.json")):
            cell = json.load(open(os.path.join(folder, "cell.json")))
        elif os.path.basename(folder) == "main":          # cells run before cell.json was written
            source, target = os.path.basename(os.path.dirname(os.path.dirname(folder))).split("__")
            cell = {"transfer": f"{source}→{target}", "seed": int(os.path.basename(os.path.dirname(folder))[4:]),
                    "variant": "main"}
        else:
            continue
        cells[(cell["transfer"], cell["seed"], cell["variant"])] = json.load(open(done))["results"]
    return cells


def _recorded_cells(out_root: str) -> dict:
    """The cells of the last written ``transfers_cells.csv`` (test metrics only, as the tables use)."""
    path = os.path.join(out_root, "transfers_cells.csv")
    if not os.path.exists(path):
        return {}
    import pandas as pd
    cells = {}
    recorded = pd.read_csv(path)
    for column in ("uar_ci_lo", "uar_ci_hi"):              # tables written before the CI was recorded
        if column not in recorded:
            recorded[column] = float("nan")
    for (transfer, seed, variant), rows in recorded.groupby(["transfer", "seed", "variant"]):
        cells[(transfer, int(seed), variant)] = {"test": {
            r.system: {"uar": r.uar, "wa": r.wa, "macro_f1": r.macro_f1, "uar_ci95": [r.uar_ci_lo, r.uar_ci_hi]}
            for r in rows.itertuples()}}
    return cells


def seed_tables(df, complete_seeds):
    """Per system: mean ± std over seeds for each transfer (every finished seed), and for the average
    over transfers (each complete seed's average over all transfers, then mean ± std over those seeds),
    so that the average compares every system over the same cells."""
    import pandas as pd
    transfers = sorted(df.transfer.unique())
    rows = []
    for system, sdf in df.groupby("system"):
        row = {"system": system}
        for t in transfers:
            row[t] = mean_std(sdf[sdf.transfer == t].uar.tolist())
        # a seed counts only where this system ran on every transfer (a partly rerun seed is not an average)
        covered = [seed for seed in complete_seeds if set(sdf[sdf.seed == seed].transfer) >= set(transfers)]
        for metric, name in (("uar", "UAR"), ("wa", "WA"), ("macro_f1", "macro-F1")):
            row[f"average {name}"] = mean_std([sdf[sdf.seed == seed][metric].mean() for seed in covered])
        row["one test split's 95% CI (clips)"] = clip_ci_half_width(sdf)
        rows.append(row)
    table = pd.DataFrame(rows)
    order = pd.to_numeric(table["average UAR"].str.split(" ").str[0], errors="coerce").sort_values(
        ascending=False, na_position="last").index
    return table.loc[order]


def clip_ci_half_width(rows) -> str:
    """'±h': the mean half-width of the cells' clip-bootstrap 95% CIs of test UAR (how far the clips
    of one test split alone move a score, beside the seed spread); '' where no cell recorded one."""
    widths = (rows["uar_ci_hi"] - rows["uar_ci_lo"]) / 2 if "uar_ci_hi" in rows else []
    widths = [w for w in widths if w == w]
    return f"±{sum(widths) / len(widths):.3f}" if widths else ""


SHIPPED = "mifuse_ema"          # the model the shipped recipe ends with (the EMA teacher at the last epoch)
TEACHERS = ("lalm_zero_shot", "source_only")


def _is_baseline_student(system: str) -> bool:
    """A baseline's trained model: not the shipped recipe's two, not the no_ema ablation (reported beside
    the baselines, not one of them), not a teacher or the fused label."""
    return system.endswith(("_student", "_ema")) and system not in ("mifuse_student", SHIPPED) \
        and not system.startswith("no_ema")


def target_checks(main_df, complete_seeds):
    """The shipped model's margins over the seeds that finished every transfer: against its fused labels
    (target +2 points), the LALM (+5), the best other student (+3), and on how many transfers it is
    above both teachers (all)."""
    import pandas as pd
    df = main_df[main_df.seed.isin(complete_seeds)]
    cells = df.groupby("system").size()
    df = df[df.system.isin(cells[cells == cells.max()].index)]   # only systems that ran in every cell
    mean = df.groupby("system").uar.mean()           # over transfers and seeds alike (every cell counts once)
    if SHIPPED not in mean:
        return pd.DataFrame()
    students = [s for s in mean.index if _is_baseline_student(s)]
    best_other = max(students, key=lambda s: mean[s]) if students else None
    per_transfer = df.groupby(["transfer", "system"]).uar.mean().unstack()
    above = (per_transfer[SHIPPED] > per_transfer[list(TEACHERS)].max(axis=1)).sum()
    rows = [("fused labels", "fused_label", 0.02), ("LALM zero-shot", "lalm_zero_shot", 0.05)]
    rows += [(f"best other student ({best_other})", best_other, 0.03)] if best_other else []
    out = [{"check": f"{SHIPPED} − {name}", "margin": f"{mean[SHIPPED] - mean[system]:+.3f}",
            "target": f"≥ +{need:.2f}", "met": bool(mean[SHIPPED] - mean[system] >= need)}
           for name, system, need in rows if system in mean]
    out.append({"check": f"transfers where {SHIPPED} is above both teachers", "margin": f"{above} of {len(per_transfer)}",
                "target": "all", "met": bool(above == len(per_transfer))})
    # A partial rerun: a system that ran on only some cells is compared on those cells, and says so,
    # rather than being dropped silently or averaged against cells it never ran on.
    ran = main_df[main_df.seed.isin(complete_seeds)]
    for system in [s for s, n in cells.items() if n < cells.max()]:
        theirs = ran[ran.system == system]
        ours = ran[ran.system == SHIPPED].merge(theirs[["transfer", "seed"]])
        margin = ours.uar.mean() - theirs.uar.mean()
        student = _is_baseline_student(system)
        out.append({"check": f"{SHIPPED} − {system}, on the {len(theirs)} of {cells.max()} cells it ran",
                    "margin": f"{margin:+.3f}", "target": "≥ +0.03" if student else "",
                    "met": f"{bool(margin >= 0.03)} (partial)" if student else ""})
    return pd.DataFrame(out)


def main_config():
    """The configuration the main cells fuse with (for scripts that re-fuse their stored labels)."""
    from mifuse_ray.config import MiFuseConfig
    from mifuse_ray.overrides import apply_overrides
    cfg = MiFuseConfig()
    apply_overrides(cfg, dict(MAIN_SETTINGS))
    return cfg


def stored_labels(runs: str, seeds=(0,)):
    """(transfer, seed, adaptation-split labels table) of every finished main cell under ``runs``:
    each holds every LALM answer and MC draw, so other analyses re-fuse them without any call."""
    import pandas as pd
    for seed in seeds:
        for path in sorted(glob.glob(os.path.join(runs, "*__*", f"seed{seed}", "main", "labels", "labels.parquet"))):
            yield path.split(os.sep)[-5].replace("__", "→"), seed, pd.read_parquet(path)


def _pairs(run) -> tuple:
    """An ablation run as a tuple of (key, value) pairs."""
    return run if isinstance(run[0], tuple) else (run,)


def _is_main_setting(run) -> bool:
    values = _main_values()
    return all(values[key] == value for key, value in _pairs(run))


def _main_values() -> dict:
    """The main cells' value of every setting an ablation varies."""
    cfg = main_config()
    return {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
            for runs in ABLATIONS.values() for run in runs for key, _ in _pairs(run)}


LABEL_SECTIONS = ("audio", "lalm", "source", "source_train")    # what a cell's stored draws depend on


def _labelled_main_cell(out_root: str, source: str, target: str, seed: int, cfg=None) -> str | None:
    """A finished cell of this transfer to take the labels from, this seed's first: with ``cfg``, one
    labelled at its settings of what the draws depend on (``LABEL_SECTIONS``: not the student's
    ``train.*``, nor the fusion, which is fitted again); else, or without one, a main cell."""
    from mifuse_ray.reuse import settings_changed
    cells = os.path.join(out_root, f"{source}__{target}")
    finished = [c for pattern in (f"seed{seed}", "seed*") for c in sorted(glob.glob(os.path.join(cells, pattern, "*")))
                if os.path.exists(os.path.join(c, "results.json"))]
    if cfg is not None:
        same = next((c for c in finished if not settings_changed(c, cfg, LABEL_SECTIONS)), None)
        if same is not None:
            return same
    return next((c for c in finished if os.path.basename(c) == "main"), None)


def _share_labels(main_out: str, out: str) -> None:
    """An ablation changes only the fusion or the training, and another seed only the student, while
    the stored labels hold every LALM and MC draw: such a cell starts from a main cell's labels (hard
    links). adapt() still checks their fingerprint, and labels afresh if anything that changes them
    differs."""
    import shutil
    for name in ("labels", "labels_dev", "labels_test"):
        src, dst = os.path.join(main_out, name), os.path.join(out, name)
        if os.path.isdir(src) and not os.path.exists(dst):
            shutil.copytree(src, dst, copy_function=os.link)


def ablation_table(df):
    """Each ablation (variant) of the shipped model beside the main setting on the very cells (transfer,
    seed) it ran on: ablations run on different cells, so one main average for all would compare unlike
    cells."""
    import pandas as pd
    shipped = df[df.system.isin(["mifuse_student", SHIPPED, SHIPPED + BY_SPEAKER])]
    main = shipped[shipped.variant == "main"].set_index(["transfer", "seed", "system"]).uar
    rows = []
    for (variant, system), g in shipped[shipped.variant != "main"].groupby(["variant", "system"], sort=True):
        ref = main.reindex(list(zip(g.transfer, g.seed, g.system)))
        rows.append({"variant": variant, "system": system, "uar": float(g.uar.mean()),
                     "main, same cells": float(ref.mean()), "Δ": float(g.uar.mean() - ref.mean()),
                     "cells": len(g), "transfers": ", ".join(sorted(set(g.transfer)))})
    return pd.DataFrame(rows)


def summarize(cells, out_root, command: str = ""):
    import pandas as pd
    nan = float("nan")
    rows = [{"transfer": t, "seed": s, "variant": v, "system": name + suffix, "uar": m["uar"], "wa": m["wa"],
             "macro_f1": m["macro_f1"], "uar_ci_lo": (m.get("uar_ci95") or [nan, nan])[0],
             "uar_ci_hi": (m.get("uar_ci95") or [nan, nan])[1]}
            for (t, s, v), res in cells.items()
            for key, suffix in (("test", ""), ("test_by_speaker", BY_SPEAKER))
            for name, m in res.get(key, {}).items()]
    if not rows:
        return
    df = pd.DataFrame(rows)
    df.to_csv(os.path.join(out_root, "transfers_cells.csv"), index=False)
    agg = df.groupby(["variant", "system", "transfer"])[["uar", "wa", "macro_f1"]].agg(["mean", "std", "count"])
    agg.columns = ["_".join(c) for c in agg.columns]
    agg.reset_index().to_csv(os.path.join(out_root, "transfers.csv"), index=False)
    main_df = df[df.variant == "main"]
    transfers = main_df.transfer.unique()
    complete = sorted(int(s) for s, g in main_df.groupby("seed") if set(g.transfer) == set(transfers))
    seeds_per_transfer = main_df.groupby("transfer").seed.nunique()
    from mifuse_ray.report import markdown_table
    title = "Six-transfer benchmark" if len(transfers) == 6 else f"Transfer benchmark, {len(transfers)} transfers"
    lines = [f"# {title} (test UAR, mean ± std over seeds)", "",
             f"Last written by `{command}` from every finished cell in this folder: {len(transfers)} transfers, seeds finished per transfer "
             f"{', '.join(f'{t} {n}' for t, n in seeds_per_transfer.items())}. The averages are over the seeds "
             f"that finished every transfer ({complete}): each seed's average over the transfers, then mean ± std.",
             "", markdown_table(seed_tables(main_df, complete)), ""]
    per_clip = main_df[~main_df.system.str.endswith(BY_SPEAKER)]
    if complete:
        lines += ["## The shipped model against the targets (issue #14)", "",
                  markdown_table(target_checks(per_clip, complete)), ""]
    by_speaker = main_df[main_df.system.str.endswith(BY_SPEAKER)]
    by_speaker_seeds = [s for s in complete if set(by_speaker[by_speaker.seed == s].transfer) == set(transfers)]
    if by_speaker_seeds:
        lines += ["### The same checks with speaker-normalised inference for every system "
                  "(`mifuse_ray.evaluation.by_speaker`; seeds " + ", ".join(map(str, by_speaker_seeds)) + ")", "",
                  markdown_table(target_checks(by_speaker.assign(system=by_speaker.system.str[:-len(BY_SPEAKER)]),
                                               by_speaker_seeds)), ""]
    if (df.variant != "main").any():
        lines += ["## Ablations, one factor at a time (test UAR; each against the main setting on the same cells)", "",
                  markdown_table(ablation_table(df)), ""]
    open(os.path.join(out_root, "transfers.md"), "w").write("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    per_seed = main_df[main_df.seed.isin(complete)].groupby(["system", "seed"]).uar.mean().groupby("system")
    means, stds = per_seed.mean().sort_values(), per_seed.std().fillna(0.0)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.barh(means.index, means.values, xerr=stds[means.index].values, capsize=3)
    ax.set_xlabel(f"average test UAR over {len(transfers)} transfers (± std over {len(complete)} seeds)")
    plt.tight_layout()
    plt.savefig(os.path.join(out_root, "transfers.png"), dpi=110)
    plt.close(fig)
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--runs", default=runs_dir("transfers"), help="the cells' run trees (audio, labels, models)")
    p.add_argument("--out", default=results_dir("transfers"), help="the tables and figure (committed)")
    p.add_argument("--ablations", nargs="*", default=[], choices=sorted(ABLATIONS))
    p.add_argument("--transfers", nargs="*", default=None, help="source:target pairs (default: all six)")
    p.add_argument("--baselines", nargs="*", default=BASELINES, choices=BASELINES,
                   help="baseline students per main cell (a later run with more adds them, reusing the rest)")
    args = p.parse_args()
    command = "python " + " ".join(["-m benchmarks.transfers", *sys.argv[1:]])
    from mifuse_ray.ray_utils import init_ray
    init_ray()
    runs, out = os.path.abspath(args.runs), os.path.abspath(args.out)
    os.makedirs(runs, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    transfers = [tuple(t.split(":")) for t in args.transfers] if args.transfers else \
        [(s, t) for s, t in itertools.permutations(TRANSFER_DOMAINS, 2)]
    for seed, (source, target) in itertools.product(args.seeds, transfers):   # a whole seed first
        run_cell(source, target, seed, runs, args.scale, baselines=args.baselines)
        for ablation in args.ablations:
            for run in ABLATIONS[ablation]:
                if not _is_main_setting(run):
                    run_cell(source, target, seed, runs, args.scale, _pairs(run))
        summarize(collect_cells(runs, out), out, command)


if __name__ == "__main__":
    main()
