"""The labeling stage: target audio → both teachers → fusion → ``labels.parquet``.

Every input clip appears exactly once in the output: labelled, or with an ``error`` saying
why not. All draws are stored (N_max LALM answers and K_max MC passes per clip) so that any
later run or Tune trial can re-fuse with its own N ≤ N_max, K ≤ K_max, τ, … for free.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

import numpy as np
import pandas as pd

from .config import MiFuseConfig
from .fused_labels import (NO_TEACHER_ERROR, _stack_lists, fit_frames, fit_table,  # noqa: F401
                           fuse_kwargs, fusion_columns, fused_again, source_teacher_name, stored_draws, teacher_names,
                           teachers_of)
from .fusion import teacher_stats

log = logging.getLogger(__name__)


# -- the pipeline -------------------------------------------------------------------------
class LabelingResult:
    """A labelled split: its fused labels as shards (``shards``; ``labels_path`` is their folder), the
    teachers' draws they were fused from (``draws``) and the split's summary. ``table`` reads the
    labels into one DataFrame, for the small splits (dev, test) and the consumers that need one."""

    def __init__(self, labels_path: str, summary: dict, draws_path: str = ""):
        from .label_shards import LabelShards
        self.labels_path, self.summary = labels_path, summary
        self.shards, self.draws = LabelShards(labels_path), LabelShards(draws_path or labels_path)
        self._table: pd.DataFrame | None = None

    @property
    def table(self) -> pd.DataFrame:
        if self._table is None:
            self._table = self.shards.to_pandas()
        return self._table


MAX_ATTEMPTS = 3    # passes over the slices still missing (a writer lost with its node leaves some behind)


@contextlib.contextmanager
def request_limiter(cfg: MiFuseConfig, clips):
    """The run's cluster-wide rate limit and spend cap (one Ray actor) over every split it labels:
    yields (actor name, request cap), ("", 0) when neither is set."""
    import ray
    from .lalm.limits import bucket_actor
    from .lalm.stage import LIMITER_ACTOR
    max_requests = effective_request_cap(cfg, clips)
    if not (cfg.lalm.qps > 0 or max_requests):
        yield "", 0
        return
    name = f"{LIMITER_ACTOR}_{os.getpid()}_{time.time_ns()}"
    actor = bucket_actor(name, cfg.lalm.qps, max_requests)
    try:
        yield name, max_requests
    finally:
        ray.kill(actor)


def label_target(cfg: MiFuseConfig, target, out_dir: str, source_checkpoint: str, lalm_base_url: str,
                 limiter: tuple[str, int] | None = None, split: str | None = None, fuse: bool = True) -> LabelingResult:
    """Both teachers over every clip of ``target``, written by the cluster as shards of draws
    (``<out_dir>/draws``), then fused with ``cfg.fusion`` into ``<out_dir>/labels.parquet/`` (a
    folder of shards). ``target``: a manifest DataFrame (first written as ``<out_dir>/manifest.parquet``)
    or the path of a Parquet manifest (a file or a folder, local or a URI; ``split``: the rows kept).
    Slices whose draws shard exists are not labelled again: a rerun after a crash does only the rest.
    ``limiter``: a (name, cap) from ``request_limiter`` shared with other splits of the same run."""
    from .label_shards import LabelShards, plan_shards, write_manifest
    start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    manifest = target if isinstance(target, str) else \
        write_manifest(target, os.path.join(out_dir, "manifest.parquet"), cfg.shard_rows)
    draws = LabelShards(os.path.join(out_dir, "draws"))
    slices = plan_shards(manifest, cfg.shard_rows)
    draws.prune({s.name for s in slices})
    resumed, waves = len(draws.done()), 0
    writers: set[str] = set()
    with contextlib.ExitStack() as stack:
        if limiter is None:
            clips = target if not isinstance(target, str) else (sum(s.stop - s.start for s in slices), 0.0)
            limiter = stack.enter_context(request_limiter(cfg, clips))
        for attempt in range(1, MAX_ATTEMPTS + 1):
            todo = [s for s in slices if s.name not in draws.done()]
            if not todo:
                break
            if attempt > 1:
                log.warning("%d shards missing after pass %d (a writer lost with its node?): labelling them again "
                            "from the response cache", len(todo), attempt - 1)
            for first in range(0, len(todo), cfg.label_wave_shards):      # one Ray Data execution a wave
                writers |= _label_slices(cfg, todo[first:first + cfg.label_wave_shards], split, draws.root,
                                         source_checkpoint, lalm_base_url, out_dir, limiter)
                waves += 1
    _record_lost(draws, [s for s in slices if s.name not in draws.done()], split)
    summary = {"shards": len(slices), "shards_resumed": resumed, "shard_writer_nodes": sorted(writers),
               "label_waves": waves}
    result = LabelingResult(os.path.join(out_dir, "labels.parquet"), summary, draws.root)
    if fuse:
        from .fused_shards import fuse_split
        fit = fit_table(draws, len(cfg.labels), cfg.fusion)
        summary.update(fuse_split(draws, result.shards, cfg.labels, cfg.fusion, fit))
        summary["lalm_budget"].update(budget=cfg.lalm.budget, selection=cfg.lalm.budget_selection)
    summary["seconds"] = time.time() - start
    return result


def _label_slices(cfg: MiFuseConfig, slices, split, root: str, source_checkpoint: str, lalm_base_url: str,
                  out_dir: str, limiter: tuple[str, int]) -> set[str]:
    """One Ray Data pass: slices → clip rows → decoded audio → source model(s) → LALM → shards.
    Returns the ids of the nodes whose writer wrote them."""
    import ray
    from .data import DECODE_CPUS, _decode_batch
    from .label_shards import ShardWriter, slice_rows, slices_dataset
    from .lalm.client import api_key_from_env
    from .lalm.stage import add_lalm_stage
    from .source_teacher import SourceTeacherStage
    src = cfg.source
    everyone = asks_every_clip(cfg)
    ds = slices_dataset(slices).map_batches(slice_rows, batch_size=1, batch_format="pandas", num_cpus=DECODE_CPUS,
                                            fn_kwargs=dict(split=split, audio_cfg=cfg.audio, root=root))
    ds = ds.map_batches(_decode_batch, fn_kwargs={"cfg": cfg.audio}, batch_format="pandas",
                        batch_size=src.batch_size, num_cpus=DECODE_CPUS)
    # the source model, then any extra source models (teachers source2, source3, …), one actor stage each
    checkpoints = [source_checkpoint, *src.extra_checkpoints]
    for i, checkpoint in enumerate(checkpoints):
        last = i == len(checkpoints) - 1
        ds = ds.map_batches(
            SourceTeacherStage, batch_format="pandas", batch_size=src.batch_size,
            fn_constructor_kwargs=dict(checkpoint=os.path.abspath(checkpoint), passes_per_clip=src.passes_per_clip,
                                       scope=src.mc_scope, seed=src.seed + 1000 * i, dropout_override=src.dropout_override,
                                       amp=src.amp, labels=cfg.labels, keep_audio=everyone or not last,
                                       name=source_teacher_name(i)),
            compute=ray.data.ActorPoolStrategy(size=src.num_actors), num_cpus=src.actor_cpus,
            num_gpus=src.num_gpus or None)
    ds, _ = _select_for_budget(ds, cfg)
    cache_dir = cfg.lalm.cache_dir or os.path.join(out_dir, "lalm_cache")
    limiter_name, max_requests = limiter
    ds = add_lalm_stage(ds, cfg.lalm, cfg.labels, lalm_base_url, cache_dir, cfg.audio.sample_rate, limiter_name,
                        max_requests, api_key_from_env(cfg.lalm))
    ds = ds.map_batches(ShardWriter, fn_constructor_kwargs=dict(root=root), batch_format="pandas", batch_size=None,
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.05)
    nodes = set()
    for written in ds.iter_batches(batch_size=None, batch_format="pandas"):   # one small row per shard written
        nodes |= set(written["node"])
    return nodes


def _record_lost(draws, slices, split) -> None:
    """Slices no pass could label (their rows never reached the writer): every clip becomes an error
    row, so the output still holds every clip of the manifest."""
    from .label_shards import read_slice, write_table_atomic
    for s in slices:
        rows = read_slice(s, split)
        log.error("shard %s: %d clips never reached the output; recorded as errors", s.name, len(rows))
        if len(rows):
            write_table_atomic(rows.assign(error="lost_in_pipeline", parent_id=None).sort_values("clip_id"),
                               draws.shard_path(s.name))
        else:
            draws.mark_empty(s.name)


def selection_uncertainty(table: pd.DataFrame, num_classes: int) -> np.ndarray:
    """BALD mutual information of the source model's MC-dropout passes, per clip (only the source
    stage's columns are needed: the budget step runs before the LALM stage)."""
    votes = _stack_lists(table["source_votes"], fill=-1)
    probs = _stack_lists(table["source_probs"], fill=np.nan, inner=num_classes)
    return np.asarray(teacher_stats(votes, num_classes, probs).mi)


def _select_for_budget(ds, cfg: MiFuseConfig):
    """With ``lalm.budget`` below all decoded clips: a global step between the source and LALM
    stages that marks the clips to ask (``lalm_asked``). The choice needs every clip's uncertainty
    and embedding at once, so the source stage's outputs are materialised, without the audio
    (a few kB per clip instead of ~160 kB); the chosen clips are decoded again for the LALM."""
    from .query_budget import budget_count, select_clips
    from .data import decode_where
    if asks_every_clip(cfg):            # every clip: keep the pipeline streaming, no barrier
        return ds, None
    ds = ds.materialize()               # the source stage's outputs only: it dropped the audio
    meta = ds.select_columns(["clip_id", "error", "source_votes", "source_probs", "embedding"]).to_pandas()
    decoded = meta[meta["error"].isna()].reset_index(drop=True)
    k = budget_count(cfg.lalm.budget, len(decoded), cfg.lalm.budget_clips)
    if k >= len(decoded):
        asked_all = ds.map_batches(_ask_every_clip, batch_format="pandas", num_cpus=0.25)
        return asked_all.map_batches(decode_where, fn_kwargs={"cfg": cfg.audio, "column": "lalm_asked"},
                                     batch_format="pandas", batch_size=cfg.source.batch_size, num_cpus=0.5), None
    emb = np.stack([np.asarray(e, dtype=np.float32) for e in decoded["embedding"]]) if len(decoded) else np.zeros((0, 1))
    mask = select_clips(selection_uncertainty(decoded, len(cfg.labels)), emb, k, cfg.lalm.budget_selection,
                        seed=cfg.source.seed)
    asked = set(decoded.loc[mask, "clip_id"])
    log.info("LALM budget: asking %d of %d decoded clips (%s)", len(asked), len(decoded), cfg.lalm.budget_selection)

    def mark(batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.copy()
        batch["lalm_asked"] = batch["clip_id"].isin(asked)
        return batch
    ds = ds.map_batches(mark, batch_format="pandas", num_cpus=0.25)
    return ds.map_batches(decode_where, fn_kwargs={"cfg": cfg.audio, "column": "lalm_asked"}, batch_format="pandas",
                          batch_size=cfg.source.batch_size, num_cpus=0.5), asked


def asks_every_clip(cfg: MiFuseConfig) -> bool:
    return cfg.lalm.budget == 1.0 and cfg.lalm.budget_clips == 0


def _ask_every_clip(batch: pd.DataFrame) -> pd.DataFrame:
    return batch.assign(lalm_asked=True)


def write_parquet(df: pd.DataFrame, path: str) -> None:
    """Atomic write, without pandas-specific metadata so any Arrow reader gets plain types."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(None)
    tmp = path + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def clip_totals(clips) -> tuple[int, float]:
    """(clips, mean seconds) of a manifest DataFrame or ``ManifestSplit``, or a (clips, mean seconds)
    pair as it is (a streamed manifest's row count from its Parquet metadata, with no duration known: 0)."""
    if isinstance(clips, tuple):
        return clips
    if hasattr(clips, "mean_seconds"):          # a ``label_shards.ManifestSplit``: counted when it was scanned
        return clips.clips, clips.mean_seconds
    seconds = float(clips["duration_s"].fillna(0).mean()) if "duration_s" in clips and len(clips) else 0.0
    return len(clips), seconds


def estimate_spend(cfg: MiFuseConfig, target_df) -> dict:
    """Upper bound of requests, audio seconds and cost for asking every clip (before the cache);
    ``target_df``: a manifest DataFrame or ``clip_totals``' pair."""
    from .query_budget import budget_count
    clips, seconds = clip_totals(target_df)
    asked = budget_count(cfg.lalm.budget, clips, cfg.lalm.budget_clips)
    from .lalm.presets import PRESETS
    preset = PRESETS.get(cfg.lalm.preset)
    use_n = preset.supports_n if cfg.lalm.use_n is None and preset else bool(cfg.lalm.use_n)
    per_clip = 1 if use_n else cfg.lalm.answers_per_clip
    requests = asked * per_clip
    cost = requests * cfg.lalm.usd_per_request + requests * seconds / 60 * cfg.lalm.usd_per_audio_minute
    return {"clips": clips, "clips_asked": asked, "requests": requests, "answers": asked * cfg.lalm.answers_per_clip,
            "audio_seconds_sent": requests * seconds, "estimated_usd": cost}


def effective_request_cap(cfg: MiFuseConfig, target_df) -> int:
    caps = [cfg.lalm.max_requests] if cfg.lalm.max_requests else []
    if cfg.lalm.max_cost_usd > 0:
        est = estimate_spend(cfg, target_df)
        per_request = est["estimated_usd"] / max(est["requests"], 1)
        if per_request > 0:
            caps.append(int(cfg.lalm.max_cost_usd // per_request))
    return min(caps) if caps else 0


def summarize(table: pd.DataFrame, labels) -> dict:
    """Clips, failures by reason, requests and cache hits, agreement, and UAR where labels are known."""
    return finish_counts(label_counts(table, labels), labels)


def label_counts(table: pd.DataFrame, labels) -> dict:
    """The additive part of ``summarize`` for one shard: counts that ``add_counts`` sums over shards,
    so that a split's summary never needs its rows in one place."""
    from .metrics import confusion_matrix, counting_unanswered_as_wrong
    C = len(labels)
    ok = table["error"].isna()
    counts = {"clips": int(len(table)), "labelled": int(ok.sum()),
              # by reason (an error is "reason: detail", the detail often a path): a few keys however many clips fail
              "failures": {str(k): int(v) for k, v in
                           table.loc[~ok, "error"].astype(str).str.split(": ", n=1).str[0].value_counts().items()},
              "lalm_requests": int(table.get("lalm_requests", pd.Series(dtype=int)).fillna(0).sum()),
              "lalm_cache_hits": int(table.get("lalm_cache_hits", pd.Series(dtype=int)).fillna(0).sum()),
              "clips_asked": int(table["lalm_asked"].fillna(False).astype(bool).sum()) if "lalm_asked" in table
              else int(ok.sum())}
    if "fused_pred" not in table or not ok.any():
        return counts
    both = ok & (table["lalm_pred"] >= 0) & (table["source_pred"] >= 0)
    counts["both_answered"] = int(both.sum())
    counts["agree"] = int((table.loc[both, "lalm_pred"] == table.loc[both, "source_pred"]).sum())
    counts["weight_lalm_sum"] = float(table.loc[ok, "weight_lalm"].sum())
    names = (*teacher_names(table), "fused")
    counts["predicted"] = {name: np.bincount(table.loc[ok & (table[f"{name}_pred"] >= 0), f"{name}_pred"].astype(int),
                                             minlength=C).tolist() for name in names}
    counts["fusion_status"] = {str(k): int(v) for k, v in table.loc[ok, "fusion_status"].value_counts().items()}
    for truth_col in ("label", "oracle_label"):
        if truth_col in table and table[truth_col].notna().any():
            known = ok & table[truth_col].notna()
            y = np.array([list(labels).index(v) for v in table.loc[known, truth_col]])
            counts[f"confusion_{truth_col}"] = {
                name: confusion_matrix(y, counting_unanswered_as_wrong(y, table.loc[known, f"{name}_pred"].to_numpy(), C),
                                       C).tolist() for name in names}
    return counts


def add_counts(a: dict, b: dict) -> dict:
    """Two shards' ``label_counts`` summed: numbers add, dicts merge by key, matrices add elementwise."""
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict):
            out[key] = add_counts(out[key], value)
        elif isinstance(value, list):
            out[key] = (np.asarray(out[key]) + np.asarray(value)).tolist()
        else:
            out[key] = out[key] + value
    return out


def finish_counts(counts: dict, labels) -> dict:
    """A split's summary from its summed ``label_counts``."""
    from .metrics import uar_from_confusion
    summary = {k: counts.get(k, 0) for k in ("clips", "labelled", "lalm_requests", "lalm_cache_hits")}
    summary["failures"] = counts.get("failures", {})
    summary["lalm_budget"] = {"clips_asked": counts.get("clips_asked", 0), "clips_decoded": counts.get("labelled", 0)}
    if "predicted" in counts:
        both = counts["both_answered"]
        summary["teacher_agreement"] = counts["agree"] / both if both else float("nan")
        summary["mean_weight_lalm"] = counts["weight_lalm_sum"] / max(counts["labelled"], 1)
        # each teacher's and the fused label's class distribution: a teacher's bias at a glance
        summary["predicted_classes"] = {name: {label: v / max(sum(row), 1) for label, v in zip(labels, row)}
                                        for name, row in counts["predicted"].items()}
        never = [label for label, v in summary["predicted_classes"]["fused"].items() if v == 0]
        if never:
            summary["warnings"] = [f"the fused label never predicts {', '.join(never)}"]
        summary["fusion_status"] = counts["fusion_status"]
    truth_col = next((c for c in ("label", "oracle_label") if f"confusion_{c}" in counts), None)
    if truth_col:
        summary["truth_column"] = truth_col
        for name, cm in counts[f"confusion_{truth_col}"].items():
            summary[f"uar_{name}"] = uar_from_confusion(np.asarray(cm))
    return summary
