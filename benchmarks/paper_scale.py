"""The paper-scale tier: every system on targets the size of real SER corpora, in one long table.

    python -m benchmarks.paper_scale [--seeds 0 1 2] [--transfers acted_studio:call_centre ...]
        [--baselines lalm_labels source_labels shot_im mifuse_paper equal_weights no_ema]
        [--curve 6 12 24 48 96] [--curve-baselines lalm_labels] [--set train.augment=false ...]
        [--runs outputs/benchmarks/paper_scale] [--out benchmarks/results/paper_scale]

Each cell is the six-transfer benchmark's cell (``transfers.run_cell``: an adapt run with the baselines,
resumable, its labels and students reused) onto ``<target>_paper`` (``demo.domains.at_paper_scale``:
2,400 adaptation, 400 dev and 1,000 test clips, speakers disjoint), for the six demo transfers and the
two validation domains (named as such), a whole seed at a time. ``--curve`` adds the learning curve:
the shipped recipe and ``--curve-baselines`` on ``<target>_paper_adapt<N>`` for N adaptation speakers
(50 clips each) at seed 0, the same dev and test clips for every N. ``--set`` changes a setting in every
cell (it is part of the cells' folder names, so cells at other settings are kept apart).

Writes ``paper_scale.csv`` (``system,transfer,seed,n_adapt,split,uar,uar_ci_lo,uar_ci_hi,wa``, one row per
system, transfer, seed, adaptation size and split: ``test`` for every system, speaker-normalised scores as
``<system>_by_speaker``; ``dev`` for each student and the fused label, on the dev half that monitors the
students) from whatever cells are finished, after every cell, and ``paper_scale_dev_ranking.md``: the
students ranked on dev, the recipe to ship chosen there.
"""
from __future__ import annotations

import argparse
import itertools
import os

import pandas as pd
import yaml

from benchmarks.common import mean_std, merge_record, results_dir, runs_dir
from benchmarks.transfers import BASELINES, BY_SPEAKER, TEACHERS, TRANSFER_DOMAINS, run_cell, settings_tag
from mifuse_ray.demo.domains import PAPER_SPEAKERS, DomainConfig

VALIDATION_TRANSFERS = [("acted_studio", "meeting_room"), ("call_centre", "voice_notes")]
COLUMNS = ["system", "transfer", "seed", "n_adapt", "split", "uar", "uar_ci_lo", "uar_ci_hi", "wa"]
# the paper tier's adaptation clips: the summary and the dev ranking are about these cells, the learning
# curve's smaller and larger adaptation sets are the curve's
PAPER_N_ADAPT = PAPER_SPEAKERS["adapt"] * DomainConfig.clips_per_speaker
CURVE_SYSTEMS = ("adapted", "fused_label", *TEACHERS)


def transfer_name(source: str, target: str) -> str:
    validation = any(target.startswith(t) for _, t in VALIDATION_TRANSFERS)
    return f"{source}→{target}" + (" (validation domain)" if validation else "")


def shipped_systems(test: dict, baselines) -> dict[str, str]:
    """{record name: the run's result key}: what ``jobs/adapt.py`` ships is the mifuse run's final model
    (its EMA where it keeps one), and a baseline is likewise its run's final model."""
    def final(run):
        return f"{run}_ema" if f"{run}_ema" in test else f"{run}_student"
    systems = {"adapted": final("mifuse"), "fused_label": "fused_label", "lalm_zero_shot": "lalm_zero_shot",
               "source_only": "source_only"}
    systems.update({f"{b}_student": final(b) for b in baselines})
    return {name: key for name, key in systems.items() if key in test}


def long_rows(results: dict, transfer: str, seed: int, baselines) -> list[dict]:
    """One row per system (and per speaker-normalised system) of a finished cell's results."""
    n_adapt = int(results.get("labeling", {}).get("clips", 0))
    rows = []
    for key, suffix in (("test", ""), ("test_by_speaker", BY_SPEAKER)):
        scores = results.get(key) or {}
        for name, result_key in shipped_systems(results.get("test", {}), baselines).items():
            m = scores.get(result_key)
            if m is None:
                continue
            lo, hi = m.get("uar_ci95", [float("nan")] * 2)
            rows.append({"system": name + suffix, "transfer": transfer, "seed": seed, "n_adapt": n_adapt,
                         "split": "test", "uar": m["uar"], "uar_ci_lo": lo, "uar_ci_hi": hi, "wa": m["wa"]})
    return rows + dev_rows(results, transfer, seed, n_adapt, baselines)


def dev_rows(results: dict, transfer: str, seed: int, n_adapt: int, baselines) -> list[dict]:
    """Each student's final model, and the fused label, on the dev half that monitors the students
    (``results['selection']``): the split on which the recipe to ship is chosen (``dev_ranking``).
    No CI: the run keeps the dev half's score, not its predictions."""
    rows, selection = [], results.get("selection", {})
    for name, key in shipped_systems(results.get("test", {}), baselines).items():
        run, _, final = key.rpartition("_")            # mifuse_ema -> the mifuse run's EMA
        got = selection.get(run)
        if got is None or not (name == "adapted" or name.endswith("_student")):
            continue
        rows.append({"system": name, "uar": got.get("ema_dev_uar" if final == "ema" else "dev_uar")})
        if name == "adapted":
            rows.append({"system": "fused_label", "uar": got.get("fused_label_dev_uar")})
    nan = float("nan")
    return [dict(r, transfer=transfer, seed=seed, n_adapt=n_adapt, split="dev", uar_ci_lo=nan, uar_ci_hi=nan, wa=nan)
            for r in rows if r["uar"] is not None]


def dev_ranking(table: pd.DataFrame) -> pd.DataFrame:
    """Per system, the mean dev and test UAR over the (transfer, seed) cells where it has both, ranked by
    dev: the first student is the recipe this tier would ship, chosen without looking at test."""
    both = table[table.split.isin(["dev", "test"]) & ~table.system.str.endswith(BY_SPEAKER)]
    wide = both.pivot_table(index=["system", "transfer", "seed", "n_adapt"], columns="split", values="uar").dropna()
    ranked = wide.groupby("system").agg(dev=("dev", "mean"), test=("test", "mean"), cells=("dev", "size"))
    return ranked.sort_values("dev", ascending=False).reset_index()


DIFFERENCE_COLUMNS = ["comparison", "transfer", "seed", "n_adapt", "diff", "ci_lo", "ci_hi"]


def difference_rows(results: dict, transfer: str, seed: int, baselines, num_classes: int = 4) -> list[dict]:
    """The differences the targets name, each on the same test clips with its paired bootstrap 95% CI
    (``evaluation.compare``): the adapted model against its labels, each teacher and the best baseline."""
    from mifuse_ray.evaluation import compare
    test = results.get("test", {})
    systems = shipped_systems(test, baselines)
    students = [name for name in systems if name.endswith("_student")]
    others = ["fused_label", "lalm_zero_shot", "source_only"]
    if students:
        others.append(max(students, key=lambda name: test[systems[name]]["uar"]))
    rows = []
    for other in others:
        got = compare(results, systems["adapted"], systems[other], num_classes) if other in systems else None
        if got is not None:
            rows.append({"comparison": f"adapted - {other}", "transfer": transfer, "seed": seed,
                         "n_adapt": int(results.get("labeling", {}).get("clips", 0)),
                         "diff": got[0], "ci_lo": got[1], "ci_hi": got[2]})
    return rows


def record_name(settings=(), stem: str = "paper_scale") -> str:
    """``paper_scale.csv`` for the shipped recipe; a run with ``--set`` writes its own record
    (``paper_scale__augmentFalse.csv``), so its ``adapted`` rows never pass for what ``jobs/adapt.py`` ships."""
    tag = settings_tag(settings)
    return f"{stem}__{tag}.csv" if tag else f"{stem}.csv"


def write_record(rows: list[dict], out: str, settings=()) -> pd.DataFrame:
    """The committed record with ``rows`` added: a row of a cell run again replaces its old one, and
    rows of cells this invocation did not run (another seed, the curve) stay."""
    return merge_record(os.path.join(out, record_name(settings)), rows, COLUMNS, ["system", "transfer", "seed", "n_adapt", "split"])


def parse_settings(items) -> tuple:
    """``key=value`` strings as the (key, value) pairs ``run_cell`` takes (values read as YAML)."""
    pairs = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: write it as key=value, e.g. train.augment=false")
        pairs.append((key, yaml.safe_load(value)))
    return tuple(pairs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--transfers", nargs="*", default=None, help="source:target pairs (default: six + two validation)")
    p.add_argument("--baselines", nargs="*", default=BASELINES, choices=BASELINES)
    p.add_argument("--curve", type=int, nargs="*", default=[], help="adaptation speakers per learning-curve point")
    p.add_argument("--curve-baselines", nargs="*", default=["lalm_labels"], choices=BASELINES)
    p.add_argument("--set", nargs="*", default=[], help="key=value settings for every cell")
    p.add_argument("--runs", default=runs_dir("paper_scale"))
    p.add_argument("--out", default=results_dir("paper_scale"))
    args = p.parse_args(argv)
    from mifuse_ray.ray_utils import init_ray
    init_ray()
    settings, runs = parse_settings(args.set), os.path.abspath(args.runs)
    transfers = [tuple(t.split(":")) for t in args.transfers] if args.transfers else \
        [*itertools.permutations(TRANSFER_DOMAINS, 2), *VALIDATION_TRANSFERS]
    rows, differences = [], []
    cells = [(seed, source, f"{target}_paper", args.baselines) for seed, (source, target)
             in itertools.product(args.seeds, transfers)]
    cells += [(0, source, f"{target}_paper_adapt{n}", args.curve_baselines) for n in args.curve
              for source, target in transfers]
    for seed, source, target, baselines in cells:
        results = run_cell(source, target, seed, runs, 1.0, settings, baselines=baselines)
        name = transfer_name(source, target.split("_paper")[0])
        rows += long_rows(results, name, seed, baselines)
        differences += difference_rows(results, name, seed, baselines)
        table = write_record(rows, args.out, settings)
        paired = merge_record(os.path.join(args.out, record_name(settings, "paper_scale_differences")),
                              differences, DIFFERENCE_COLUMNS, ["comparison", "transfer", "seed", "n_adapt"])
        write_ranking(table, args.out, settings)
        write_summary(table, args.out, settings)
        write_curve(table, args.out, settings, paired)
        print(f"{len(table)} rows in {os.path.join(args.out, record_name(settings))}", flush=True)


def system_table(test: pd.DataFrame, seeds: list[int]) -> pd.DataFrame:
    """Per system, its test UAR per transfer (mean over seeds), and its average over the transfers as
    mean ± std over ``seeds`` (each seed's average over every transfer), WA likewise, beside the mean
    half-width of one test split's clip-bootstrap 95% CI."""
    transfers = sorted(test.transfer.unique())
    rows = []
    for system, g in test.groupby("system"):
        per_seed = g[g.seed.isin(seeds)].groupby("seed")
        complete = [seed for seed, s in per_seed if set(s.transfer) >= set(transfers)]
        done = g[g.seed.isin(complete)]
        row = {"system": system, **{t: round(float(g[g.transfer == t].uar.mean()), 3) for t in transfers}}
        row["average UAR"] = mean_std(done.groupby("seed").uar.mean().tolist())
        row["average WA"] = mean_std(done.groupby("seed").wa.mean().tolist())
        row["seeds"] = len(complete)
        row["test CI (clips)"] = f"±{((g.uar_ci_hi - g.uar_ci_lo) / 2).mean():.3f}"
        rows.append(row)
    table = pd.DataFrame(rows)
    # per-clip systems first, then the speaker-normalised ones, each by average UAR
    table["_key"] = table.system.str.endswith(BY_SPEAKER).map({False: 0, True: 1}) * 10 - \
        pd.to_numeric(table["average UAR"].str.split(" ").str[0], errors="coerce").fillna(-1)
    return table.sort_values("_key").drop(columns="_key")


def target_checks(test: pd.DataFrame, dev: pd.DataFrame, seeds: list[int]) -> pd.DataFrame:
    """Issue #41's targets on the cells (transfer, seed) where the shipped model ran, over ``seeds``:
    each margin is the mean over those cells. The best baseline is the one that ranks first on dev."""
    test = test[test.seed.isin(seeds)]
    uar = test.pivot_table(index=["transfer", "seed"], columns="system", values="uar")
    wa = test.pivot_table(index=["transfer", "seed"], columns="system", values="wa")
    if "adapted" not in uar:
        return pd.DataFrame()
    baselines = [s for s in uar.columns if s.endswith("_student") and s != "no_ema_student"]
    on_dev = dev[dev.system.isin(baselines) & dev.seed.isin(seeds)].groupby("system").uar.mean()
    best = on_dev.idxmax() if len(on_dev) else None

    def margin(a, b, table=uar) -> float:
        both = table[[a, b]].dropna() if a in table and b in table else pd.DataFrame()
        return float((both[a] - both[b]).mean()) if len(both) else float("nan")
    half = ((test.uar_ci_hi - test.uar_ci_lo) / 2).groupby(test.system).mean()
    per_transfer = uar.groupby(level="transfer").mean()
    above = int((per_transfer["adapted"] > per_transfer[list(TEACHERS)].max(axis=1)).sum())
    # (check, value, target as written, whether the value meets it)
    checks = [("widest test CI half-width (every system)", f"{half.max():.3f}", "≤ 0.03", half.max() <= 0.03)]
    margins = [("adapted − fused_label", margin("adapted", "fused_label"), 0.02),
               ("adapted − lalm_zero_shot", margin("adapted", "lalm_zero_shot"), 0.05)]
    if best is not None:
        margins.append((f"adapted − best baseline on dev ({best})", margin("adapted", best), 0.03))
    margins += [("adapted_by_speaker − lalm_zero_shot_by_speaker",
                 margin("adapted" + BY_SPEAKER, "lalm_zero_shot" + BY_SPEAKER), 0.0)]
    checks += [(name, f"{value:+.3f}", f"≥ +{need:.2f}" if need else "≥ 0", value >= need) for name, value, need in margins]
    wa_gap = margin("adapted", "lalm_zero_shot", wa)
    checks.append(("adapted WA − lalm_zero_shot WA", f"{wa_gap:+.3f}", "≥ −0.05 (else said)", wa_gap >= -0.05))
    rows = [{"check": name, "value": value, "target": target, "met": bool(met)} for name, value, target, met in checks]
    rows.append({"check": "transfers where adapted is above both teachers", "value": f"{above} of {len(per_transfer)}",
                 "target": "all", "met": above == len(per_transfer)})
    return pd.DataFrame(rows)


def write_summary(table: pd.DataFrame, out: str, settings=()) -> str:
    """``<record>_summary.md``: for the six transfers and for the validation domains, every system over
    the seeds that finished them, and the targets checked (what the record means, in one page)."""
    from mifuse_ray.report import markdown_table
    full = table[table.n_adapt == PAPER_N_ADAPT]
    text = [f"# Paper scale: what `{record_name(settings)}` says\n",
            "Test UAR per transfer is the mean over the finished seeds; an average is mean ± std over the seeds "
            "that finished every transfer of its group; the CI is one test split's clip-bootstrap 95% half-width. "
            "Targets from issue #41; the best baseline is chosen on dev, never on test.\n"]
    for title, part in (("Six transfers", ~full.transfer.str.contains("validation")),
                        ("Validation domains", full.transfer.str.contains("validation"))):
        group = full[part]
        test, dev = group[group.split == "test"], group[group.split == "dev"]
        if test.empty:
            continue
        transfers = set(test.transfer)
        shipped = test[test.system == "adapted"]
        seeds = sorted(seed for seed, g in shipped.groupby("seed") if set(g.transfer) == transfers)
        text += [f"## {title} (seeds {', '.join(map(str, seeds)) or 'none complete'})\n",
                 markdown_table(system_table(test, seeds)), "",
                 markdown_table(target_checks(test, dev, seeds)), ""]
    path = os.path.join(out, record_name(settings).replace(".csv", "_summary.md"))
    with open(path, "w") as fh:
        fh.write("\n".join(text))
    return path


def write_ranking(table: pd.DataFrame, out: str, settings=()) -> None:
    """``<record>_dev_ranking.md``: ``dev_ranking`` of the systems of the paper-scale cells (the learning curve's
    smaller adaptation sets left out)."""
    from mifuse_ray.report import markdown_table
    full = table[table.n_adapt == PAPER_N_ADAPT]
    name = record_name(settings).replace(".csv", "_dev_ranking.md")
    text = (f"# Students ranked on dev (`{record_name(settings)}`)\n\nMean UAR over the cells with both a dev and a test "
            "score; dev is the half of the dev split that monitors the students (200 clips a cell at paper scale), "
            "test is scored once per finished configuration. The order is the dev order.\n\n"
            + markdown_table(dev_ranking(full).round(3)) + "\n")
    with open(os.path.join(out, name), "w") as fh:
        fh.write(text)


def curve_table(table: pd.DataFrame, differences: pd.DataFrame | None = None) -> pd.DataFrame:
    """The learning curve: per transfer that has more than one adaptation size, the test UAR of the adapted
    model, its labels, both teachers and each baseline student that ran at every size (seed 0, the curve's seed),
    with the adapted model's margin over its labels and, from ``differences`` (``difference_rows``), that
    margin's paired-bootstrap 95% CI on the same test clips."""
    test = table[(table.split == "test") & (table.seed == 0) & ~table.system.str.endswith(BY_SPEAKER)]
    sizes = test.groupby("transfer").n_adapt.nunique()
    test = test[test.transfer.isin(sizes[sizes > 1].index)]
    systems = [*CURVE_SYSTEMS, *sorted(s for s in test.system.unique() if s.endswith("_student"))]
    wide = test.pivot_table(index=["transfer", "n_adapt"], columns="system", values="uar")
    wide = wide[[s for s in systems if s in wide.columns]]
    wide = wide.drop(columns=[s for s in wide.columns if s.endswith("_student") and wide[s].isna().any()])
    if "adapted" in wide and "fused_label" in wide:
        wide["adapted − fused_label"] = wide["adapted"] - wide["fused_label"]
        if differences is not None and not differences.empty:
            paired = differences[(differences.comparison == "adapted - fused_label") & (differences.seed == 0)]
            paired = paired.set_index(["transfer", "n_adapt"])
            wide["paired 95% CI"] = [f"[{paired.ci_lo[k]:+.3f}, {paired.ci_hi[k]:+.3f}]" if k in paired.index else ""
                                     for k in wide.index]
    return wide.reset_index()


def crossing(curve: pd.DataFrame, transfer: str) -> str:
    """Where the adapted model crosses its labels on ``transfer``: the smallest adaptation size from which it
    stays at or above them at every larger size, in words."""
    g = curve[curve.transfer == transfer].sort_values("n_adapt").dropna(subset=["adapted − fused_label"])
    above = (g["adapted − fused_label"] >= 0).tolist()
    for i in range(len(above)):
        if all(above[i:]):
            return (f"at or above its labels from {g.n_adapt.iloc[i]:,} clips" if i else
                    f"at or above its labels at every size ({g.n_adapt.min():,}–{g.n_adapt.max():,} clips)")
    return f"below its labels at {g.n_adapt.max():,} clips, the largest size run"


def write_curve(table: pd.DataFrame, out: str, settings=(), differences: pd.DataFrame | None = None) -> str | None:
    """``<record>_curve.md`` and ``_curve.png``: ``curve_table`` with where the adapted model crosses its
    labels, per transfer; nothing until some transfer has a second adaptation size."""
    from mifuse_ray.report import _pyplot, markdown_table
    curve = curve_table(table, differences)
    if curve.empty:
        return None
    stem = os.path.join(out, record_name(settings).replace(".csv", "_curve"))
    transfers = list(curve.transfer.unique())
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(transfers), figsize=(5 * len(transfers), 3.8), squeeze=False, sharey=True)
    for ax, transfer in zip(axes[0], transfers):
        g = curve[curve.transfer == transfer].sort_values("n_adapt")
        for system in [c for c in g.columns if c in CURVE_SYSTEMS or c.endswith("_student")]:
            ax.plot(g.n_adapt, g[system], marker="o", label=system, lw=2.5 if system == "adapted" else 1.2)
        ax.set_xscale("log")
        ax.set_xticks(g.n_adapt.tolist(), [f"{n:,}" for n in g.n_adapt])
        ax.minorticks_off()
        ax.set_title(transfer, fontsize=9)
        ax.set_xlabel("adaptation clips")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test UAR (seed 0)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    plt.close(fig)
    text = [f"# Learning curve (`{record_name(settings)}`)\n",
            "Test UAR at seed 0 on the same test clips (1,000 a transfer) for every adaptation size; the CI "
            "is the paired clip-bootstrap 95% CI of the adapted model's margin over its labels. Each size is its own labelling of new "
            "adaptation speakers (50 clips each); the dev and test splits are unchanged.\n",
            *[f"- {t}: the adapted model is {crossing(curve, t)}." for t in transfers], "",
            markdown_table(curve.round(3)), "", f"![learning curve]({os.path.basename(stem)}.png)", ""]
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(text))
    return stem + ".md"


if __name__ == "__main__":
    main()
