"""Labeling with Ray Data, the source model, and a demo-domain shift — on the session cluster."""
import os

import numpy as np
import pandas as pd
import soundfile as sf

from mifuse_ray.audio import AudioConfig, list_inputs
from mifuse_ray.config import MiFuseConfig
from mifuse_ray.data import decode_locally
from mifuse_ray.label_set import DEFAULT_LABELS
from mifuse_ray.demo.lalm_server import BackgroundServer, ServerConfig
from mifuse_ray.metrics import uar
from mifuse_ray.source_teacher import SourceTeacherStage
from mifuse_ray.train.source import labelled_split


def plain(column):
    """Column values as comparable Python objects (lists, or None for a null)."""
    return [None if (v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v))) else
            (list(map(int, v)) if hasattr(v, "__len__") and not isinstance(v, str) else v) for v in column]


def test_demo_generation_is_deterministic(tmp_path):
    from mifuse_ray.demo.domains import DEMO_DOMAINS, generate_domain
    import dataclasses
    small = dataclasses.replace(DEMO_DOMAINS["call_centre"], speakers_per_split={"train": 1, "adapt": 1},
                                clips_per_speaker=3)
    a = pd.read_parquet(generate_domain(small, str(tmp_path / "a")))
    b = pd.read_parquet(generate_domain(small, str(tmp_path / "b")))
    pd.testing.assert_frame_equal(a, b)
    for pa, pb in zip(a["path"], b["path"]):
        np.testing.assert_array_equal(sf.read(tmp_path / "a" / pa)[0], sf.read(tmp_path / "b" / pb)[0])
    assert a["sample_rate"].iloc[0] == 8000 and a.loc[a.split == "adapt", "label"].isna().all()
    other = pd.read_parquet(generate_domain(dataclasses.replace(small, seed=99), str(tmp_path / "c")))
    assert not np.array_equal(sf.read(tmp_path / "a" / a.path[0])[0][:100], sf.read(tmp_path / "c" / other.path[0])[0][:100])


def test_manifest_schema_and_speaker_disjoint_splits(tmp_path):
    """Every split of a demo domain (here podcast, two clips per speaker) has its own speakers."""
    from mifuse_ray.demo.domains import DEMO_DOMAINS, generate_domain
    df = pd.read_parquet(generate_domain(DEMO_DOMAINS["podcast"], str(tmp_path), scale=0.04))
    assert set(df["split"]) == {"train", "dev", "test", "adapt"}
    for col in ("clip_id", "path", "duration_s", "sample_rate", "domain", "speaker_id", "label", "split"):
        assert col in df.columns
    speakers = df.groupby("split")["speaker_id"].apply(set)
    splits = list(speakers.index)
    for i, s in enumerate(splits):
        for t in splits[i + 1:]:
            assert not (speakers[s] & speakers[t])


def test_demo_domains_are_a_real_shift(source_model, demo_root):
    """The source model (trained on acted_studio) loses accuracy on the other domains."""
    stage = SourceTeacherStage(source_model, passes_per_clip=0)
    scores = {}
    for domain in ("acted_studio", "call_centre", "podcast"):
        df = decode_locally(labelled_split(os.path.join(demo_root, domain, "manifest.parquet"), "test",
                                           DEFAULT_LABELS), AudioConfig())
        pred = stage.predict(list(df.clip_id), list(df.audio))["det"].argmax(1)
        scores[domain] = uar(df.label_index, pred, 4)
    assert scores["acted_studio"] > 0.45, scores
    assert scores["acted_studio"] - scores["call_centre"] >= 0.1, scores
    assert scores["acted_studio"] - scores["podcast"] >= 0.1, scores


def test_label_target_writes_every_clip_once(ray_cluster, source_model, demo_root, tmp_path):
    from mifuse_ray.labeling import label_target
    target = os.path.join(demo_root, "call_centre", "manifest.parquet")
    df = list_inputs(target, split="adapt").head(40)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.wav").write_bytes(b"RIFF....garbage")
    sf.write(bad / "quiet.wav", np.zeros(16000, np.float32), 16000)
    df = pd.concat([df, pd.DataFrame({"clip_id": ["broken", "quiet"], "path": [str(bad / "broken.wav"),
                                                                              str(bad / "quiet.wav")]})],
                   ignore_index=True)
    cfg = MiFuseConfig()
    cfg.lalm.answers_per_clip, cfg.source.passes_per_clip = 4, 6
    cfg.lalm.cache_dir = str(tmp_path / "cache")
    with BackgroundServer(ServerConfig()) as server:
        res = label_target(cfg, df, str(tmp_path / "out"), source_model, server.url)
        table = pd.read_parquet(res.labels_path)
        assert sorted(table["clip_id"]) == sorted(df["clip_id"])                   # every clip exactly once
        errs = dict(zip(table.clip_id, table.error))
        assert errs["broken"].startswith("unreadable") and errs["quiet"].startswith("silent")
        ok = table[table.error.isna()]
        assert len(ok) == 40
        assert all(len(v) == 4 for v in ok.lalm_votes) and all(len(p) == 6 for p in ok.source_probs)
        np.testing.assert_allclose(np.stack(ok.q).sum(1), 1.0, atol=1e-5)
        assert res.summary["lalm_requests"] == 40 and server.stats["requests"] == 40
        for key in ("uar_lalm", "uar_source", "uar_fused", "teacher_agreement"):
            assert key in res.summary
        # a rerun pays for nothing: every answer comes from the cache
        again = label_target(cfg, df, str(tmp_path / "out2"), source_model, server.url)
        assert server.stats["requests"] == 40 and again.summary["lalm_cache_hits"] == 160
        for col in ("clip_id", "lalm_votes", "source_votes"):
            assert plain(again.table[col]) == plain(table[col])


def test_a_rerun_writes_only_the_missing_shards(ray_cluster, source_model, demo_root, tmp_path):
    """Resume at shard granularity: finished shards stay as they are (same file), the rerun labels only
    the slices whose shard is missing, from the response cache, and leaves no stray file behind. The
    first run goes in two waves (separate Ray Data executions), which must not change a label."""
    from mifuse_ray.labeling import label_target, summarize
    df = list_inputs(os.path.join(demo_root, "podcast", "manifest.parquet"), split="adapt").head(50)
    cfg = MiFuseConfig()
    cfg.lalm.answers_per_clip, cfg.source.passes_per_clip, cfg.shard_rows, cfg.label_wave_shards = 2, 3, 8, 4
    cfg.lalm.cache_dir = str(tmp_path / "cache")
    out = str(tmp_path / "out")
    with BackgroundServer(ServerConfig()) as server:
        first = label_target(cfg, df, out, source_model, server.url)
        before = first.table
        paid = server.stats["requests"]
        draws = sorted(first.draws.paths())
        assert len(draws) == 7 and first.summary["shards_resumed"] == 0      # 50 clips, 8 a shard
        assert first.summary["label_waves"] == 2                              # 4 slices, then 3
        stamp = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in draws}
        for p in draws[1:3]:
            os.remove(p)                                       # as if the run died before writing these
        stray = os.path.join(first.draws.root, ".shard-00000-00000-0001.parquet.1234abcd.tmp")
        open(stray, "wb").write(b"PAR1 half a file")           # a writer killed mid-write
        again = label_target(cfg, df, out, source_model, server.url)
        assert server.stats["requests"] == paid                 # nothing paid twice
    # kept shards keep their first run's counts; the two labelled again got every answer from the cache
    assert again.summary["shards_resumed"] == 5 and again.summary["lalm_cache_hits"] == 2 * 8 * 2
    assert again.summary["label_waves"] == 1
    assert not os.path.exists(stray)
    for p in draws[:1] + draws[3:]:
        assert (os.stat(p).st_ino, os.stat(p).st_mtime_ns) == stamp[p], p    # kept, not rewritten
    after = again.table
    assert list(after["clip_id"]) == sorted(df["clip_id"])
    for col in ("lalm_votes", "source_votes", "fused_pred"):
        assert plain(after[col]) == plain(before[col]), col
    # the summary, summed shard by shard, is what the whole table gives
    whole = summarize(after, cfg.labels)
    for key, value in whole.items():
        if key != "lalm_budget":
            assert same(again.summary[key], value), key


def same(a, b) -> bool:
    """Equal, floats within 1e-9 (NaN equal to NaN), dicts key by key."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return bool(np.isclose(a, b, rtol=1e-9, equal_nan=True))
    return a == b


def test_reused_labels_follow_this_runs_fusion(ray_cluster, source_model, demo_root, tmp_path):
    """Stored labels are reused whatever the fusion settings (no answer is paid for twice), but they
    are fused with the settings of the run that reuses them, and the file then holds that fusion."""
    import copy
    from mifuse_ray.api import Inputs, label_splits
    df = list_inputs(os.path.join(demo_root, "podcast", "manifest.parquet"), split="adapt").head(12)
    inputs = Inputs("podcast", source_model, df, None, None)

    def label(cfg, *_):
        result = label_splits(cfg, inputs, out, server.url)[0]["adapt"]
        result.table                     # read now: the next run fuses the same shards again
        return result
    cfg = MiFuseConfig()
    cfg.lalm.answers_per_clip, cfg.source.passes_per_clip = 3, 4
    cfg.lalm.cache_dir = str(tmp_path / "cache")
    single_draw = copy.deepcopy(cfg)
    single_draw.fusion.lalm_answers_used, single_draw.fusion.source_passes_used = 1, 1
    out = str(tmp_path / "out")
    with BackgroundServer(ServerConfig()) as server:
        first = label(cfg, df, out, source_model, server.url)
        paid = server.stats["requests"]
        again = label(single_draw, df, out, source_model, server.url)
        back = label(cfg, df, out, source_model, server.url)
        assert server.stats["requests"] == paid and again.summary["reused"] and back.summary["reused"]
    ok = first.table["error"].isna().to_numpy()
    assert (first.table.loc[ok, "lalm_n"] == 3).all() and (first.table.loc[ok, "source_n"] == 4).all()
    assert (again.table.loc[ok, "lalm_n"] == 1).all() and (again.table.loc[ok, "source_n"] == 1).all()
    assert not np.allclose(np.stack(again.table.loc[ok, "q"]), np.stack(first.table.loc[ok, "q"]))
    np.testing.assert_allclose(np.stack(back.table.loc[ok, "q"]), np.stack(first.table.loc[ok, "q"]), atol=1e-6)
    np.testing.assert_allclose(np.stack(pd.read_parquet(back.labels_path).loc[ok, "q"]),
                               np.stack(first.table.loc[ok, "q"]), atol=1e-6)


def test_spend_cap_stops_sending(ray_cluster, source_model, demo_root, tmp_path):
    from mifuse_ray.labeling import label_target
    df = list_inputs(os.path.join(demo_root, "podcast", "manifest.parquet"), split="adapt").head(12)
    cfg = MiFuseConfig()
    cfg.lalm.answers_per_clip, cfg.source.passes_per_clip, cfg.lalm.max_requests = 2, 2, 5
    cfg.lalm.cache_dir = str(tmp_path / "cache")
    with BackgroundServer(ServerConfig()) as server:
        res = label_target(cfg, df, str(tmp_path / "out"), source_model, server.url)
        assert server.stats["requests"] == 5
        assert (res.table["lalm_error"] == "spend_cap_reached").sum() == 7
        assert len(res.table) == 12


def test_lalm_budget_asks_only_the_selected_clips(ray_cluster, source_model, demo_root, tmp_path):
    """lalm.budget = 0.25: the selection step between the teachers marks a quarter of the clips, only
    they are sent, the rest are fused from the source teacher alone, and the choice is exactly what
    select_clips makes of the stored source draws and embeddings."""
    from mifuse_ray.labeling import label_target, selection_uncertainty
    from mifuse_ray.query_budget import select_clips
    df = list_inputs(os.path.join(demo_root, "podcast", "manifest.parquet"), split="adapt").head(24)
    cfg = MiFuseConfig()
    cfg.lalm.answers_per_clip, cfg.source.passes_per_clip, cfg.lalm.budget = 2, 4, 0.25
    with BackgroundServer(ServerConfig()) as server:
        res = label_target(cfg, df, str(tmp_path / "out"), source_model, server.url)
        assert server.stats["answers"] == 6 * 2                       # 6 clips asked, 2 answers each
    t = res.table
    assert len(t) == 24 and t.error.isna().all() and t.lalm_asked.sum() == 6
    assert res.summary["lalm_budget"]["clips_asked"] == 6
    assert (t.loc[~t.lalm_asked, "lalm_error"] == "not_selected_for_lalm").all()
    assert (t.loc[~t.lalm_asked, "weight_lalm"] == 0).all() and (t.loc[t.lalm_asked, "lalm_n"] == 2).all()
    assert np.isfinite(np.stack(t.q)).all()                           # every clip still gets a soft label
    emb = np.stack([np.asarray(e) for e in t.embedding])
    again = select_clips(selection_uncertainty(t, 4), emb, 6, "mi_diverse", seed=cfg.source.seed)
    assert list(t.clip_id[again]) == list(t.clip_id[t.lalm_asked])
