"""The six-transfer benchmark's target check (benchmarks/transfers.py): margins over the cells every
system ran, and a partial rerun compared on its own cells rather than silently left out."""
import os
import sys

import pandas as pd
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))          # the benchmarks package


def _cells(rows):
    return pd.DataFrame([{"transfer": t, "seed": s, "variant": "main", "system": name, "uar": u}
                         for t, s, name, u in rows])


def test_target_checks_margins_and_partial_systems():
    from benchmarks.transfers import target_checks
    rows = []
    for seed in (0, 1):
        for transfer, shipped in (("a→b", 0.60), ("b→a", 0.50)):
            rows += [(transfer, seed, "mifuse_ema", shipped), (transfer, seed, "fused_label", 0.55),
                     (transfer, seed, "lalm_zero_shot", 0.52), (transfer, seed, "source_only", 0.40),
                     (transfer, seed, "mifuse_paper_ema", 0.45)]
    rows += [("a→b", 0, "lalm_labels_student", 0.70), ("b→a", 0, "lalm_labels_student", 0.70)]  # seed 0 only
    checks = target_checks(_cells(rows), [0, 1]).set_index("check")
    assert checks.loc["mifuse_ema − fused labels", "margin"] == "+0.000"
    assert checks.loc["mifuse_ema − fused labels", "met"] is False
    assert checks.loc["mifuse_ema − best other student (mifuse_paper_ema)", "margin"] == "+0.100"
    assert checks.loc["transfers where mifuse_ema is above both teachers", "margin"] == "1 of 2"
    partial = checks.loc["mifuse_ema − lalm_labels_student, on the 2 of 4 cells it ran"]   # seed 0: 0.55 against 0.70
    assert partial["margin"] == "-0.150" and partial["met"] == "False (partial)"


def test_a_cell_finished_at_another_default_is_named_not_reused(tmp_path):
    """Resume keys a cell on its folder; the settings in its run.json decide whether its numbers still hold."""
    import json

    from mifuse_ray.config import MiFuseConfig, to_dict
    from mifuse_ray.reuse import settings_changed as changed_settings
    cfg = MiFuseConfig()
    assert changed_settings(str(tmp_path), cfg) == ["no run.json"]
    (tmp_path / "run.json").write_text(json.dumps({"config": to_dict(cfg)}, default=str))
    assert changed_settings(str(tmp_path), cfg) == []
    default = MiFuseConfig().train.consistency_weight
    cfg.train.consistency_weight, cfg.train.cpus_per_worker = default + 1.0, 0.5    # CPUs: not a result
    assert changed_settings(str(tmp_path), cfg) == [f"train.consistency_weight {default} → {default + 1.0}"]


def test_a_cell_takes_its_labels_from_a_finished_main_cell_of_its_transfer(tmp_path):
    """The draws do not depend on the student's seed: any seed's finished main cell can lend them, its own first."""
    from benchmarks.transfers import _labelled_main_cell
    assert _labelled_main_cell(str(tmp_path), "a", "b", 0) is None
    for seed in (2, 1):
        cell = tmp_path / "a__b" / f"seed{seed}" / "main"
        cell.mkdir(parents=True)
        (cell / "results.json").write_text("{}")
    (tmp_path / "a__b" / "seed0" / "main").mkdir(parents=True)        # not finished: lends nothing
    assert _labelled_main_cell(str(tmp_path), "a", "b", 0) == str(tmp_path / "a__b" / "seed1" / "main")
    assert _labelled_main_cell(str(tmp_path), "a", "b", 2) == str(tmp_path / "a__b" / "seed2" / "main")
    assert _labelled_main_cell(str(tmp_path), "b", "a", 2) is None


def test_a_cell_takes_its_labels_from_a_cell_labelled_at_its_settings_first(tmp_path):
    """A variant of a non-main setting (another encoder) takes the labels of the cell made at that
    setting, whose draws it can reuse, not the main cell's; without one, the main cell's as before."""
    import json

    from benchmarks.transfers import _labelled_main_cell
    from mifuse_ray.config import MiFuseConfig, result_fields
    main, other = MiFuseConfig(), MiFuseConfig()
    other.source.mc_scope = "head" if main.source.mc_scope != "head" else "full"
    for tag, cfg in (("main", main), ("other_scope", other)):
        cell = tmp_path / "a__b" / "seed0" / tag
        cell.mkdir(parents=True)
        (cell / "results.json").write_text("{}")
        (cell / "run.json").write_text(json.dumps({"config": {s: result_fields(getattr(cfg, s)) for s in
                                                              ("audio", "lalm", "source", "source_train")}}, default=str))
    variant = MiFuseConfig()
    variant.source.mc_scope, variant.train.epochs = other.source.mc_scope, 3     # train.*: not what the draws depend on
    assert _labelled_main_cell(str(tmp_path), "a", "b", 1, variant) == str(tmp_path / "a__b" / "seed0" / "other_scope")
    variant.lalm.seed += 1                                          # no cell has these draws: the main cell's
    assert _labelled_main_cell(str(tmp_path), "a", "b", 1, variant) == str(tmp_path / "a__b" / "seed0" / "main")


def test_each_ablation_is_compared_with_the_main_setting_on_its_own_cells():
    from benchmarks.transfers import ablation_table
    rows = [("a→b", 0, "mifuse_ema", 0.60), ("b→a", 0, "mifuse_ema", 0.40)]
    df = _cells(rows)
    df = pd.concat([df, _cells([("a→b", 0, "mifuse_ema", 0.50)]).assign(variant="x=1"),
                    _cells([("b→a", 0, "mifuse_ema", 0.45)]).assign(variant="y=2")])
    table = ablation_table(df).set_index("variant")
    assert table.loc["x=1", "main, same cells"] == 0.60 and abs(table.loc["x=1", "Δ"] + 0.10) < 1e-12
    assert table.loc["y=2", "main, same cells"] == 0.40 and abs(table.loc["y=2", "Δ"] - 0.05) < 1e-12
    assert table.loc["y=2", "transfers"] == "b→a"


def test_speaker_normalised_scores_get_their_own_systems_and_target_checks(tmp_path):
    """A cell's test_by_speaker scores become systems with the _by_speaker suffix, and the targets are
    checked a second time among them, every system normalised alike; the per-clip checks are unchanged."""
    from benchmarks.transfers import summarize

    def m(u):
        return {"uar": u, "wa": u, "macro_f1": u}
    cells = {}
    for transfer in ("a→b", "b→a"):
        cells[(transfer, 0, "main")] = {
            "test": {"mifuse_ema": m(0.50), "fused_label": m(0.60), "lalm_zero_shot": m(0.55), "source_only": m(0.4)},
            "test_by_speaker": {"mifuse_ema": m(0.66), "fused_label": m(0.62), "lalm_zero_shot": m(0.56),
                                "source_only": m(0.41)}}
    summarize(cells, str(tmp_path))
    written = pd.read_csv(tmp_path / "transfers_cells.csv")
    assert set(written.system) == {"mifuse_ema", "fused_label", "lalm_zero_shot", "source_only",
                                   "mifuse_ema_by_speaker", "fused_label_by_speaker",
                                   "lalm_zero_shot_by_speaker", "source_only_by_speaker"}
    md = (tmp_path / "transfers.md").read_text()
    per_clip, by_speaker = md.split("### The same checks with speaker-normalised inference")
    assert "| mifuse_ema − fused labels | -0.100 |" in per_clip
    assert "| mifuse_ema − fused labels | +0.040 | ≥ +0.02 | True |" in by_speaker
    assert "| mifuse_ema − LALM zero-shot | +0.100 | ≥ +0.05 | True |" in by_speaker


@pytest.mark.parametrize("name", ["call_centre", "voice_notes"])
def test_more_adaptation_speakers_leave_the_other_splits_as_they_were(tmp_path, name):
    """demo.domains.with_adapt_speakers: a target with 12 adaptation speakers holds every clip of the demo
    (or validation) domain, same audio and label in the same order (only the name in the ids differs), then
    6 new speakers."""
    import numpy as np
    import soundfile as sf
    from mifuse_ray.demo.domains import domain_named, generate_domain
    demo = pd.read_parquet(generate_domain(domain_named(name), str(tmp_path / "demo"), scale=0.04))
    more = pd.read_parquet(generate_domain(domain_named(f"{name}_adapt12"), str(tmp_path / "more"), scale=0.04))
    assert more.groupby("split")["speaker_id"].nunique().to_dict() == {"train": 8, "dev": 3, "test": 3, "adapt": 12}
    for a, b in zip(demo.itertuples(), more.itertuples()):
        assert (a.split, a.oracle_label) == (b.split, b.oracle_label)
        assert np.array_equal(sf.read(tmp_path / "demo" / a.path)[0], sf.read(tmp_path / "more" / b.path)[0])
    assert len(more) == len(demo) + 6 * 2


def test_the_paper_scale_tier_sizes_a_domain_and_keeps_its_source_split(tmp_path):
    """``<domain>_paper``: 8 dev, 20 test and 48 adaptation speakers (400 / 1,000 / 2,400 clips at scale 1),
    speakers disjoint across splits, the train split (the source model's data) the domain's own audio;
    ``_paper_adapt96`` doubles the adaptation speakers and leaves the dev and test audio as it was."""
    import numpy as np
    import soundfile as sf
    from mifuse_ray.demo.domains import domain_named, generate_domain
    assert domain_named("podcast_paper").speakers_per_split == {"train": 8, "dev": 8, "test": 20, "adapt": 48}
    demo = pd.read_parquet(generate_domain(domain_named("podcast"), str(tmp_path / "demo"), scale=0.04))
    paper = pd.read_parquet(generate_domain(domain_named("podcast_paper"), str(tmp_path / "paper"), scale=0.04))
    curve = pd.read_parquet(generate_domain(domain_named("podcast_paper_adapt96"), str(tmp_path / "curve"), scale=0.04))
    assert paper.groupby("split")["speaker_id"].nunique().to_dict() == {"train": 8, "dev": 8, "test": 20, "adapt": 48}
    assert paper.groupby("speaker_id")["split"].nunique().max() == 1
    for a, b in zip(demo[demo.split == "train"].itertuples(), paper[paper.split == "train"].itertuples()):
        assert np.array_equal(sf.read(tmp_path / "demo" / a.path)[0], sf.read(tmp_path / "paper" / b.path)[0])
    assert curve.groupby("split")["speaker_id"].nunique()["adapt"] == 96
    for split in ("dev", "test"):
        for a, b in zip(paper[paper.split == split].itertuples(), curve[curve.split == split].itertuples()):
            assert a.oracle_label == b.oracle_label
            assert np.array_equal(sf.read(tmp_path / "paper" / a.path)[0], sf.read(tmp_path / "curve" / b.path)[0])
    with pytest.raises(KeyError, match="_paper"):
        domain_named("podcast_huge")


def test_the_paper_scale_record_names_what_ships_and_keeps_earlier_cells(tmp_path):
    """paper_scale.csv: ``adapted`` is the mifuse run's EMA (what jobs/adapt.py ships), a baseline its own
    final model, speaker-normalised scores ``*_by_speaker``; a rerun cell replaces its rows, others stay."""
    from benchmarks.paper_scale import COLUMNS, long_rows, transfer_name, write_record

    def m(uar):
        return {"uar": uar, "wa": uar - 0.01, "uar_ci95": [uar - 0.03, uar + 0.03]}
    results = {"labeling": {"clips": 2400},
               "test": {"mifuse_student": m(0.50), "mifuse_ema": m(0.60), "fused_label": m(0.55),
                        "lalm_zero_shot": m(0.45), "source_only": m(0.40), "mifuse_paper_student": m(0.30),
                        "mifuse_paper_ema": m(0.35), "lalm_labels_student": m(0.47)},
               "test_by_speaker": {"mifuse_ema": m(0.70), "lalm_zero_shot": m(0.65)}}
    name = transfer_name("acted_studio", "meeting_room")
    assert name == "acted_studio→meeting_room (validation domain)"
    rows = long_rows(results, name, 0, ["mifuse_paper", "lalm_labels"])
    got = {r["system"]: r["uar"] for r in rows}
    assert got == {"adapted": 0.60, "fused_label": 0.55, "lalm_zero_shot": 0.45, "source_only": 0.40,
                   "mifuse_paper_student": 0.35, "lalm_labels_student": 0.47, "adapted_by_speaker": 0.70,
                   "lalm_zero_shot_by_speaker": 0.65}
    assert all(r["n_adapt"] == 2400 and r["split"] == "test" for r in rows)
    write_record(rows, str(tmp_path))
    other = [dict(rows[0], seed=1, uar=0.61)]
    table = write_record([dict(rows[0], uar=0.62)] + other, str(tmp_path))
    assert list(table.columns) == COLUMNS and len(table) == len(rows) + 1
    adapted = table[table.system == "adapted"].set_index("seed").uar.to_dict()
    assert adapted == {0: 0.62, 1: 0.61}
    write_record(rows, str(tmp_path), (("train.augment", False),))
    assert (tmp_path / "paper_scale__augmentFalse.csv").exists() and len(pd.read_csv(tmp_path / "paper_scale.csv")) == len(table)


def test_the_paper_scale_record_keeps_each_students_dev_score_and_ranks_on_it(tmp_path):
    """Dev rows come from the run's selection (the EMA's score where the EMA ships), the fused label's from
    the same dev half; the ranking is by dev, whatever test says, and a dev row never replaces a test row."""
    from benchmarks.paper_scale import dev_ranking, long_rows, write_record

    def m(uar):
        return {"uar": uar, "wa": uar, "uar_ci95": [uar - 0.03, uar + 0.03]}
    rows = []
    for seed, (dev_a, dev_b) in enumerate([(0.60, 0.55), (0.62, 0.50)]):
        results = {"labeling": {"clips": 2400},
                   "test": {"mifuse_student": m(0.5), "mifuse_ema": m(0.58), "fused_label": m(0.6),
                            "no_ema_student": m(0.62)},
                   "selection": {"mifuse": {"dev_uar": 0.1, "ema_dev_uar": dev_a, "fused_label_dev_uar": 0.64},
                                 "no_ema": {"dev_uar": dev_b, "ema_dev_uar": None}}}
        rows += long_rows(results, "a→b", seed, ["no_ema"])
    dev = {(r["system"], r["seed"]): r["uar"] for r in rows if r["split"] == "dev"}
    assert dev == {("adapted", 0): 0.60, ("fused_label", 0): 0.64, ("no_ema_student", 0): 0.55,
                   ("adapted", 1): 0.62, ("fused_label", 1): 0.64, ("no_ema_student", 1): 0.50}
    table = write_record(rows, str(tmp_path))
    assert len(table[(table.system == "adapted") & (table.split == "test")]) == 2
    ranked = dev_ranking(table)
    students = ranked[ranked.system != "fused_label"]
    assert list(students.system) == ["adapted", "no_ema_student"]       # ranked by dev though test says otherwise
    assert students.iloc[0].dev == pytest.approx(0.61) and students.iloc[0].test == pytest.approx(0.58)
    assert students.iloc[0].cells == 2


def test_the_ways_are_compared_cell_by_cell_on_the_cells_every_way_finished():
    from benchmarks.stored_trunk import VARIANTS, comparison_table
    rows = []
    for (transfer, seed), base in {("a→b", 0): 0.5, ("a→b", 1): 0.6, ("b→a", 0): 0.4}.items():
        for i, way in enumerate(VARIANTS.values()):
            if (transfer, seed) == ("b→a", 0) and way == "stored":
                continue                                   # an unfinished cell leaves its transfer-seed out
            rows.append({"transfer": transfer, "seed": seed, "way": way, "dev_uar": base + 0.01 * i,
                         "test_uar": base + 0.02 * i, "test_ci_half": 0.08, "fused_label_test_uar": 0.55,
                         "train_seconds": 10.0})
    table = comparison_table(pd.DataFrame(rows)).set_index("way")
    assert set(table.cells) == {2}
    assert table.loc["stored", "test_minus_default"] == pytest.approx(0.02)
    assert table.loc["waveform", "dev_minus_default"] == pytest.approx(0.02)
    assert table.loc["waveform, augmented", "test_uar"] == pytest.approx(0.55)


def test_student_bound_averages_transfers_within_a_seed_then_over_seeds(tmp_path, monkeypatch):
    """Rows of one recipe at several seeds: the mean over transfers per seed, then mean ± std over seeds."""
    from benchmarks import common
    from benchmarks.student_bound import COLUMNS, summarize
    monkeypatch.setattr(common, "machine", lambda: "test machine")
    monkeypatch.setattr(common, "commit", lambda: "0000000")
    rows = [{"transfer": t, "labels": "fused", "init": "fresh", "epochs": 48, "seed": s, "student_test_uar": u,
             "student_dev_uar": 0.5, "fused_label_test_uar": 0.6, "lalm_test_uar": 0.5, "train_label_uar": 0.6,
             "clips": 300, "seconds": 1.0}
            for s, (ua, ub) in enumerate(((0.50, 0.70), (0.40, 0.60))) for t, u in (("a→b", ua), ("b→a", ub))]
    summarize(pd.DataFrame(rows, columns=COLUMNS), str(tmp_path), "cmd")
    table = (tmp_path / "student_bound.md").read_text()
    # seed means 0.60 and 0.50: 0.550 ± 0.071 over two transfers and two seeds
    assert "| fused | fresh | 48 | 2 | 2 | 0.550 ± 0.071 | 0.600 |" in table


def test_head_probe_standardises_per_speaker_and_fits_a_balanced_linear_head():
    """benchmarks/head_probe.py: by-speaker standardisation removes each speaker's offset (what a
    per-clip model cannot), and the class-balanced linear head finds a minority class."""
    import numpy as np
    from benchmarks.head_probe import fit_linear, standardised
    rng = np.random.default_rng(0)
    y = np.array([0] * 90 + [1] * 10)
    speaker = np.array(["a", "b"] * 50)
    x = np.stack([y * 2.0 + rng.normal(0, 0.3, 100), rng.normal(0, 1, 100)], 1)
    x[speaker == "b"] += 10.0                                              # a speaker's voice, not a class
    by_speaker = standardised(x, speaker)
    for s in ("a", "b"):
        assert np.allclose(by_speaker[speaker == s].mean(0), 0.0, atol=1e-9)
    assert np.allclose(standardised(x, None, x).mean(0), 0.0, atol=1e-9)
    pred = fit_linear(by_speaker, y, 2)(by_speaker).argmax(1)
    assert (pred[y == 1] == 1).mean() >= 0.9 and (pred[y == 0] == 0).mean() >= 0.9


def test_head_probe_reinitialises_a_copy_of_the_head_by_seed():
    """head_probe.reinitialised: the source head's shape with fresh weights, the same for one seed, and
    the source head itself untouched (it is fine-tuned afterwards)."""
    import torch
    from benchmarks.head_probe import reinitialised
    head = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    before = [p.detach().clone() for p in head.parameters()]
    fresh, again = reinitialised(head, 0), reinitialised(head, 0)
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in before]
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), again.parameters()))
    assert not torch.equal(next(fresh.parameters()), before[0])
    assert all(torch.equal(p, q) for p, q in zip(head.parameters(), before))


def test_balanced_scoring_balances_the_whole_set_and_tables_per_seed_then_over_seeds():
    """evaluation.balanced_over_clips: a model that calls nearly every clip class 0 while ranking the
    classes right is balanced over the set towards the prior (the fused label's footing), and an
    unanswered clip stays unanswered; balanced_scoring's tables average transfers within a seed first."""
    import numpy as np
    from benchmarks.balanced_scoring import by_transfer, summary
    from mifuse_ray.config import MiFuseConfig
    from mifuse_ray.evaluation import balanced_over_clips
    cfg = MiFuseConfig()
    truth = np.repeat(np.arange(4), 10)
    probs = np.full((40, 4), 0.1)
    probs[np.arange(40), truth] += 0.2
    probs[:, 0] += 0.4                                  # a skew towards class 0 on every clip
    probs /= probs.sum(1, keepdims=True)
    assert (probs.argmax(1) == 0).all()
    probs[5] = np.nan                                   # a clip with no distribution
    pred = balanced_over_clips(probs, cfg)
    assert pred[5] == -1
    assert (np.delete(pred, 5) == np.delete(truth, 5)).all()
    rows = [{"transfer": t, "seed": s, "system": "m", "scoring": k, "uar": u + (0.1 if k == "balanced" else 0)}
            for s, (ua, ub) in enumerate(((0.50, 0.70), (0.40, 0.60))) for t, u in (("a→b", ua), ("b→a", ub))
            for k in ("per_clip", "balanced", "by_speaker")]
    table = summary(pd.DataFrame(rows))
    assert table.loc[0, "per_clip"] == "0.550 ± 0.071" and table.loc[0, "balanced"] == "0.650 ± 0.071"
    assert table.loc[0, "balanced − per_clip"] == pytest.approx(0.1)
    assert by_transfer(pd.DataFrame(rows)).loc[0, "a→b"] == "0.450 → 0.550"


def test_the_table_states_the_clip_bootstrap_ci_beside_the_seed_spread(tmp_path):
    """Each cell's test-split CI (results.json's uar_ci95) is kept in transfers_cells.csv and read back,
    and the table gives every system the mean half-width of one test split's CI beside its seed spread."""
    from benchmarks.transfers import collect_cells, summarize

    def m(u, half):
        return {"uar": u, "wa": u, "macro_f1": u, "uar_ci95": [u - half, u + half]}
    cells = {(t, s, "main"): {"test": {"mifuse_ema": m(0.5 + 0.01 * s, 0.08), "fused_label": m(0.6, 0.06),
                                       "lalm_zero_shot": m(0.55, 0.07), "source_only": m(0.4, 0.07)}}
             for t in ("a→b", "b→a") for s in (0, 1)}
    summarize(cells, str(tmp_path))
    md = (tmp_path / "transfers.md").read_text()
    assert "one test split's 95% CI (clips)" in md
    row = next(line for line in md.splitlines() if line.startswith("| mifuse_ema |"))
    assert row.rstrip(" |").endswith("±0.080")
    again = collect_cells(str(tmp_path / "no_runs"), str(tmp_path))     # a fresh checkout: the committed csv
    assert again[("a→b", 1, "main")]["test"]["fused_label"]["uar_ci95"] == pytest.approx([0.54, 0.66])


def test_the_paper_scale_summary_checks_the_targets_and_picks_the_best_baseline_on_dev(tmp_path):
    """The summary's margins are means over the cells the shipped model ran; the best baseline is the one
    dev ranks first even where another is better on test; a seed missing a transfer is not averaged."""
    from benchmarks.paper_scale import target_checks, write_summary
    rows = []
    for seed in (0, 1):
        for transfer, lift in (("a→b", 0.0), ("b→a", 0.1)):
            for system, uar in (("adapted", 0.60), ("fused_label", 0.57), ("lalm_zero_shot", 0.50),
                                ("source_only", 0.45), ("x_student", 0.58), ("y_student", 0.50),
                                ("adapted_by_speaker", 0.66), ("lalm_zero_shot_by_speaker", 0.68)):
                rows.append({"system": system, "transfer": transfer, "seed": seed, "n_adapt": 2400, "split": "test",
                             "uar": uar + lift, "uar_ci_lo": uar + lift - 0.02, "uar_ci_hi": uar + lift + 0.02,
                             "wa": uar + lift - 0.2 * (system == "adapted")})
            rows += [{"system": "x_student", "transfer": transfer, "seed": seed, "n_adapt": 2400, "split": "dev",
                      "uar": 0.40}, {"system": "y_student", "transfer": transfer, "seed": seed, "n_adapt": 2400,
                                     "split": "dev", "uar": 0.60}]
    rows.append(dict(rows[0], seed=2))                                   # seed 2 ran one transfer only
    table = pd.DataFrame(rows)
    checks = target_checks(table[table.split == "test"], table[table.split == "dev"], [0, 1]).set_index("check")
    assert checks.loc["adapted − fused_label", "value"] == "+0.030" and checks.loc["adapted − fused_label", "met"]
    assert checks.loc["adapted − best baseline on dev (y_student)", "value"] == "+0.100"      # not x, test's best
    assert not checks.loc["adapted_by_speaker − lalm_zero_shot_by_speaker", "met"]
    assert not checks.loc["adapted WA − lalm_zero_shot WA", "met"]                           # 0.1 below: said
    assert checks.loc["widest test CI half-width (every system)", "met"]
    assert checks.loc["transfers where adapted is above both teachers", "value"] == "2 of 2"
    text = open(write_summary(table, str(tmp_path))).read()
    assert "## Six transfers (seeds 0, 1)" in text and "0.650 ± 0.000" in text


def test_the_paper_scale_differences_are_paired_on_the_same_clips():
    """adapted − each teacher and the best baseline, with a paired bootstrap CI that holds the difference;
    a system right on every clip the other misses gives a CI above 0."""
    from benchmarks.paper_scale import difference_rows
    truth = {f"c{i}": i % 4 for i in range(200)}
    right = {c: y for c, y in truth.items()}
    wrong = {c: (y + 1) % 4 if i % 2 else y for i, (c, y) in enumerate(truth.items())}
    results = {"labeling": {"clips": 2400}, "truth": truth,
               "test": {k: {"uar": u} for k, u in [("mifuse_ema", 1.0), ("fused_label", 0.5), ("lalm_zero_shot", 0.5),
                                                   ("source_only", 0.5), ("lalm_labels_student", 0.5)]},
               "predictions": {"mifuse_ema": right, "fused_label": wrong, "lalm_zero_shot": wrong,
                               "source_only": right, "lalm_labels_student": wrong}}
    rows = {r["comparison"]: r for r in difference_rows(results, "a→b", 0, ["lalm_labels"])}
    assert set(rows) == {"adapted - fused_label", "adapted - lalm_zero_shot", "adapted - source_only",
                         "adapted - lalm_labels_student"}
    assert rows["adapted - fused_label"]["ci_lo"] > 0 and rows["adapted - fused_label"]["diff"] == pytest.approx(0.5)
    assert rows["adapted - source_only"]["diff"] == 0 == rows["adapted - source_only"]["ci_lo"]


def test_speaker_features_centres_each_speaker_and_chooses_on_dev(tmp_path):
    """Speakers whose trunk output carries a large offset of their own: centring each speaker removes it
    (the speaker means become the adaptation mean), balancing each speaker's targets makes them average
    to the prior, every arm is scored on dev and test beside the fused label, and each choice is the dev winner."""
    import numpy as np
    from benchmarks.speaker_features import ARMS, TARGETS, centred, main, speaker_balanced
    from mifuse_ray.config import MiFuseConfig
    rng = np.random.default_rng(0)
    labels = ["neutral", "happy", "angry", "sad"]
    cell = tmp_path / "a__b_paper" / "seed0" / "tag"
    for split, speakers in (("labels", 8), ("labels_dev", 4), ("labels_test", 4)):
        y = rng.integers(0, 4, speakers * 40)
        spk = np.repeat([f"{split}{i}" for i in range(speakers)], 40)
        offset = np.repeat(rng.normal(0, 4, (speakers, 8)), 40, axis=0)
        x = np.eye(4, 8)[y] * 2 + offset + rng.normal(0, 0.5, (len(y), 8))
        q = np.full((len(y), 4), 0.1) + 0.6 * np.eye(4)[y]
        q[:, 0] += np.repeat(rng.random(speakers), 40)        # each speaker's labels leaning to class 0 by its own amount
        q /= q.sum(1, keepdims=True)
        (cell / split).mkdir(parents=True)
        pd.DataFrame({"trunk_features": list(x.astype(np.float32)), "speaker_id": spk, "label": [labels[i] for i in y],
                      "oracle_label": [labels[i] for i in y], "q": list(q)}).to_parquet(cell / split / "labels.parquet")
        if split == "labels":
            balanced = speaker_balanced(q.astype(np.float32), spk, MiFuseConfig())
            for s in np.unique(spk):
                np.testing.assert_allclose(balanced[spk == s].mean(0), 0.25, atol=0.02)
    x = np.arange(12.0).reshape(6, 2)
    moved = centred(x, np.array(list("aabbbc")), np.array([1.0, -1.0]))
    for s in "abc":
        np.testing.assert_allclose(moved[np.array(list("aabbbc")) == s].mean(0), [1.0, -1.0])
    main(["--cells", str(tmp_path / "*_paper" / "seed0" / "*"), "--seeds", "0", "--out", str(tmp_path / "out")])
    table = pd.read_csv(tmp_path / "out" / "speaker_features.csv")
    students = table[table.targets != "fused_label"]
    assert list(zip(students.targets, students.arm)) == [(t, a) for t in TARGETS for a in ARMS]
    assert sorted(table[table.targets == "fused_label"].arm) == ["balanced_outputs", "per_clip"]
    assert list(table.transfer.unique()) == ["a→b"]
    by_arm = students[students.targets == "fused"].set_index("arm")
    assert by_arm.loc["centred_features", "dev_uar"] > by_arm.loc["per_clip", "dev_uar"] + 0.2   # the offset is gone
    text = (tmp_path / "out" / "speaker_features.md").read_text()
    best = students.loc[students.dev_uar.idxmax()]
    assert f"Chosen on dev among every arm: **{best.targets} / {best.arm}**" in text
    per_clip = students[students.arm == "per_clip"]
    best = per_clip.loc[per_clip.dev_uar.idxmax()]
    assert f"among the per-clip arms (no speaker at inference): **{best.targets} / {best.arm}**" in text

def test_the_learning_curve_finds_where_the_adapted_model_crosses_its_labels(tmp_path):
    """Only transfers with more than one adaptation size are a curve; the crossing is the size from which the
    adapted model stays at or above its labels; the summary keeps to the paper tier's 2,400 clips."""
    from benchmarks.paper_scale import crossing, curve_table, write_curve, write_summary
    rows = []
    for transfer, sizes in (("a→b", (300, 2400, 4800)), ("b→a", (2400,))):
        for n in sizes:
            gap = {300: -0.05, 2400: 0.01, 4800: 0.03}[n]
            for system, uar in (("adapted", 0.60 + gap), ("fused_label", 0.60), ("lalm_zero_shot", 0.5),
                                ("source_only", 0.45), ("x_student", 0.55), ("adapted_by_speaker", 0.7)):
                rows.append({"system": system, "transfer": transfer, "seed": 0, "n_adapt": n, "split": "test",
                             "uar": uar, "uar_ci_lo": uar - 0.03, "uar_ci_hi": uar + 0.03, "wa": uar})
    rows.append(dict(rows[-1], system="y_student", n_adapt=2400, transfer="a→b"))   # a baseline at one size only
    table = pd.DataFrame(rows)
    curve = curve_table(table)
    assert list(curve.transfer.unique()) == ["a→b"] and list(curve.n_adapt) == [300, 2400, 4800]
    assert "adapted_by_speaker" not in curve and "y_student" not in curve and curve["x_student"].tolist() == [0.55] * 3
    assert curve["adapted − fused_label"].round(3).tolist() == [-0.05, 0.01, 0.03]
    assert crossing(curve, "a→b") == "at or above its labels from 2,400 clips"
    below = curve.assign(**{"adapted − fused_label": [-0.05, 0.01, -0.01]})
    assert crossing(below, "a→b") == "below its labels at 4,800 clips, the largest size run"
    paired = pd.DataFrame([{"comparison": "adapted - fused_label", "transfer": "a→b", "seed": 0, "n_adapt": 300,
                            "diff": -0.05, "ci_lo": -0.08, "ci_hi": -0.02}])
    assert curve_table(table, paired)["paired 95% CI"].tolist() == ["[-0.080, -0.020]", "", ""]
    text = open(write_curve(table, str(tmp_path), differences=paired)).read()
    assert "from 2,400 clips" in text and "[-0.080, -0.020]" in text and (tmp_path / "paper_scale_curve.png").exists()
    summary = open(write_summary(table, str(tmp_path))).read()
    assert "| adapted | 0.610 | 0.610 | 0.610 |" in summary and "+0.010" in summary   # 2,400 clips only
    assert write_curve(table[table.transfer == "b→a"], str(tmp_path / "none")) is None


def test_the_scale_benchmark_charges_each_process_cpu_to_the_stage_its_title_names():
    """A Ray worker keeps the stage it ran while it idles between tasks; CPU spent before the first sample
    is not charged; the idle rest of cores × wall is its own row."""
    from collections import namedtuple

    from benchmarks.scale import MemorySampler, cpu_rows
    t = namedtuple("t", "user system")
    mem = MemorySampler()
    for pid, what, first, last in ((1, "ray::MapWorker(MapBatches(LALMStage))", 0.0, 3.0),
                                   (2, "ray::MapWorker(MapBatches(slice_rows)->MapBatches(SourceTeacherStage))", 1.0, 9.0),
                                   (3, "driver", 10.0, 11.0)):
        mem._count_cpu(pid, what, t(first, 0.0))
        mem._count_cpu(pid, "ray::IDLE", t(last / 2, last / 2))
    parts = mem.cpu_by_part()
    assert list(parts) == ["read, decode and source model (one fused actor stage)", "LALM client (encode, HTTP, cache)",
                           "driver"] and parts["driver"] == 1.0
    rows = {r["part"]: r for r in cpu_rows(100, "labeling", parts, wall_s=20.0)}
    cores = os.cpu_count() or 1
    assert rows["idle"]["cpu_s"] == round(cores * 20.0 - 12.0, 1) and rows["driver"]["cpu_ms_per_clip"] == 10.0
