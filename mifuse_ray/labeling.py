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
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .config import MiFuseConfig
from .fused_labels import (NO_TEACHER_ERROR, _stack_lists, fit_frames, fit_table,  # noqa: F401
                           fuse_kwargs, fusion_columns, fused_again, source_teacher_name, stored_draws, teacher_names,
                           teachers_of)
from .fusion import teacher_stats

log = logging.getLogger(__name__)


# -- the pipeline -------------------------------------------------------------------------
@dataclass
class LabelingResult:
    labels_path: str
    table: pd.DataFrame
    summary: dict


@contextlib.contextmanager
def request_limiter(cfg: MiFuseConfig, clips: pd.DataFrame):
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


def label_target(cfg: MiFuseConfig, target_df: pd.DataFrame, out_dir: str, source_checkpoint: str,
                 lalm_base_url: str, limiter: tuple[str, int] | None = None) -> LabelingResult:
    """Run both teachers and fusion over ``target_df`` with Ray Data; write ``labels.parquet``.
    ``limiter``: a (name, cap) from ``request_limiter`` shared with other splits of the same run."""
    import ray
    from .data import read_decoded
    from .lalm.client import api_key_from_env
    from .lalm.stage import add_lalm_stage
    from .source_teacher import SourceTeacherStage

    start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    C = len(cfg.labels)
    src = cfg.source
    everyone = asks_every_clip(cfg)
    ds = read_decoded(target_df, cfg.audio, batch_size=src.batch_size)
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
    ds, asked = _select_for_budget(ds, cfg)
    cache_dir = cfg.lalm.cache_dir or os.path.join(out_dir, "lalm_cache")
    with contextlib.ExitStack() as stack:
        limiter_name, max_requests = limiter or stack.enter_context(request_limiter(cfg, target_df))
        ds = add_lalm_stage(ds, cfg.lalm, cfg.labels, lalm_base_url, cache_dir, cfg.audio.sample_rate, limiter_name,
                            max_requests, api_key_from_env(cfg.lalm))
        # The fusion's class balancing is a statistic of the whole split: the teachers' outputs (draws,
        # not audio) are materialised, the fit streams over them, then the fusion maps every batch.
        answered = ds.materialize()          # the LALM stage has dropped the audio
    fit = fit_frames(lambda: answered.iter_batches(batch_format="pandas", batch_size=8192), C, cfg.fusion)
    # batch_size bundles the small blocks the actor stages emit: one task per 4,096 rows, not per block
    ds = answered.map_batches(fusion_columns, batch_format="pandas", num_cpus=0.25, batch_size=4096,
                              fn_kwargs=dict(num_classes=C, fusion_cfg=cfg.fusion, fit=fit))
    table = pd.concat(list(ds.iter_batches(batch_format="pandas", batch_size=None)), ignore_index=True)
    table = _ensure_every_clip(table, target_df)
    labels_path = os.path.join(out_dir, "labels.parquet")
    write_parquet(table, labels_path)
    summary = summarize(table, cfg.labels)
    summary["lalm_budget"] = {"budget": cfg.lalm.budget, "selection": cfg.lalm.budget_selection,
                              "clips_asked": int(table["lalm_asked"].sum()) if asked is not None
                              else int(table["error"].isna().sum()), "clips_decoded": int(table["error"].isna().sum())}
    summary["seconds"] = time.time() - start
    return LabelingResult(labels_path, table, summary)


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


def _ensure_every_clip(table: pd.DataFrame, target_df: pd.DataFrame) -> pd.DataFrame:
    """Belt and braces: a clip the pipeline lost would be a bug; make it visible as an error row."""
    got = set(table["parent_id"].dropna()) | set(table["clip_id"])
    lost = target_df[~target_df["clip_id"].isin(got)]
    if len(lost):
        log.error("%d clips missing from the pipeline output; recorded as errors", len(lost))
        extra = lost.copy()
        extra["error"] = "lost_in_pipeline"
        table = pd.concat([table, extra], ignore_index=True)
    return table.sort_values("clip_id").reset_index(drop=True)


def estimate_spend(cfg: MiFuseConfig, target_df: pd.DataFrame) -> dict:
    """Upper bound of requests, audio seconds and cost for asking every clip (before the cache)."""
    from .query_budget import budget_count
    clips = len(target_df)
    asked = budget_count(cfg.lalm.budget, clips, cfg.lalm.budget_clips)
    from .lalm.presets import PRESETS
    preset = PRESETS.get(cfg.lalm.preset)
    use_n = preset.supports_n if cfg.lalm.use_n is None and preset else bool(cfg.lalm.use_n)
    per_clip = 1 if use_n else cfg.lalm.answers_per_clip
    seconds = float(target_df["duration_s"].fillna(0).mean()) if "duration_s" in target_df and clips else 0.0
    requests = asked * per_clip
    cost = requests * cfg.lalm.usd_per_request + requests * seconds / 60 * cfg.lalm.usd_per_audio_minute
    return {"clips": clips, "clips_asked": asked, "requests": requests, "answers": asked * cfg.lalm.answers_per_clip,
            "audio_seconds_sent": requests * seconds, "estimated_usd": cost}


def effective_request_cap(cfg: MiFuseConfig, target_df: pd.DataFrame) -> int:
    caps = [cfg.lalm.max_requests] if cfg.lalm.max_requests else []
    if cfg.lalm.max_cost_usd > 0:
        est = estimate_spend(cfg, target_df)
        per_request = est["estimated_usd"] / max(est["requests"], 1)
        if per_request > 0:
            caps.append(int(cfg.lalm.max_cost_usd // per_request))
    return min(caps) if caps else 0


def summarize(table: pd.DataFrame, labels) -> dict:
    """Clips, failures by reason, requests and cache hits, agreement, and UAR where labels are known."""
    from .metrics import counting_unanswered_as_wrong, uar
    C = len(labels)
    ok = table["error"].isna()
    summary = {"clips": int(len(table)), "labelled": int(ok.sum()),
               "failures": {str(k): int(v) for k, v in table.loc[~ok, "error"].value_counts().items()},
               "lalm_requests": int(table.get("lalm_requests", pd.Series(dtype=int)).fillna(0).sum()),
               "lalm_cache_hits": int(table.get("lalm_cache_hits", pd.Series(dtype=int)).fillna(0).sum())}
    if ok.any():
        both = ok & (table["lalm_pred"] >= 0) & (table["source_pred"] >= 0)
        summary["teacher_agreement"] = float((table.loc[both, "lalm_pred"] == table.loc[both, "source_pred"]).mean()) \
            if both.any() else float("nan")
        summary["mean_weight_lalm"] = float(table.loc[ok, "weight_lalm"].mean())
        # each teacher's and the fused label's class distribution: a teacher's bias at a glance
        summary["predicted_classes"] = {
            name: {label: float(v) for label, v in zip(labels, np.bincount(
                table.loc[ok & (table[f"{name}_pred"] >= 0), f"{name}_pred"].astype(int), minlength=C)
                / max(int((ok & (table[f"{name}_pred"] >= 0)).sum()), 1))}
            for name in (*teacher_names(table), "fused")}
        never = [label for label, v in summary["predicted_classes"]["fused"].items() if v == 0]
        if never:
            summary["warnings"] = [f"the fused label never predicts {', '.join(never)}"]
        summary["fusion_status"] = {str(k): int(v) for k, v in table.loc[ok, "fusion_status"].value_counts().items()}
    truth_col = "label" if "label" in table and table["label"].notna().any() else "oracle_label"
    if truth_col in table and table[truth_col].notna().any():
        known = ok & table[truth_col].notna()
        y = np.array([list(labels).index(v) for v in table.loc[known, truth_col]])
        summary["truth_column"] = truth_col
        for name in (*teacher_names(table), "fused"):
            pred = table.loc[known, f"{name}_pred"].to_numpy()
            summary[f"uar_{name}"] = uar(y, counting_unanswered_as_wrong(y, pred, C), C)
    return summary
