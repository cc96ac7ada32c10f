"""The labeling stage: target audio → both teachers → fusion → ``labels.parquet``.

Every input clip appears exactly once in the output: labelled, or with an ``error`` saying
why not. All draws are stored (N_max LALM answers and K_max MC passes per clip) so that any
later run or Tune trial can re-fuse with its own N ≤ N_max, K ≤ K_max, τ, … for free.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .config import MiFuseConfig
from .fusion import STATUS_NAMES, fuse, teacher_stats

NO_TEACHER_ERROR = "no_teacher_answer"     # a decoded clip that neither teacher could answer

log = logging.getLogger(__name__)


# -- fusion over stored draws (pure; used by the map stage, Tune trials and training) ----------
def stored_draws(df: pd.DataFrame, num_classes: int, n_answers: int = 0, mc_passes: int = 0) -> dict:
    """Arrays of the first N LALM answers and K MC passes per clip (0 = all stored)."""
    B = len(df)
    lv = _stack_lists(df["lalm_votes"], fill=-1)
    ls = _stack_lists(df["lalm_soft"], fill=np.nan, inner=num_classes)
    sv = _stack_lists(df["source_votes"], fill=-1)
    sp = _stack_lists(df["source_probs"], fill=np.nan, inner=num_classes)
    n = n_answers or lv.shape[1]
    k = mc_passes or sv.shape[1]
    return {"lalm_votes": lv[:, :n].reshape(B, -1), "lalm_soft": ls[:, :n].reshape(B, -1, num_classes),
            "source_votes": sv[:, :k].reshape(B, -1), "source_probs": sp[:, :k].reshape(B, -1, num_classes)}


def _stack_lists(col, fill, inner: int | None = None) -> np.ndarray:
    rows = [r if (r is not None and hasattr(r, "__len__") and not isinstance(r, str)) else None for r in col]
    width = max((len(r) for r in rows if r is not None), default=1) or 1
    shape = (len(rows), width) if inner is None else (len(rows), width, inner)
    out = np.full(shape, fill, dtype=np.float32 if inner is not None else np.int64)
    for i, r in enumerate(rows):
        if r is None or len(r) == 0:
            continue
        arr = np.asarray([np.asarray(x, dtype=np.float32) for x in r]) if inner is not None else np.asarray(r)
        out[i, :len(arr)] = arr
    return out


def fuse_draws(draws: dict, num_classes: int, fusion_cfg, mode: str = "mifuse"):
    """Teacher statistics and the fused label for stored draws, honouring the baseline modes."""
    lalm = teacher_stats(draws["lalm_votes"], num_classes, draws["lalm_soft"])
    source = teacher_stats(draws["source_votes"], num_classes, draws["source_probs"])
    weighting, fixed = fusion_cfg.weighting, fusion_cfg.fixed_weights
    if mode == "lalm_only":
        weighting, fixed = "fixed", [1.0, 0.0]
    elif mode == "source_only":
        weighting, fixed = "fixed", [0.0, 1.0]
    elif mode == "equal_weights":
        weighting, fixed = "fixed", [0.5, 0.5]
    result = fuse([lalm, source], uncertainty=fusion_cfg.uncertainty, weighting=weighting, tau=fusion_cfg.tau,
                  eps=fusion_cfg.eps, fixed_weights=fixed, sharpen_temperature=fusion_cfg.sharpen_temperature,
                  min_confidence=fusion_cfg.min_confidence)
    return lalm, source, result


def fusion_columns(df: pd.DataFrame, num_classes: int, fusion_cfg) -> pd.DataFrame:
    """The fusion map stage: per-teacher p̄ and uncertainties, weights, q, argmax, status."""
    out = df.copy()
    draws = stored_draws(df, num_classes, fusion_cfg.lalm_answers, fusion_cfg.source_passes)
    lalm, source, res = fuse_draws(draws, num_classes, fusion_cfg)
    for name, t in (("lalm", lalm), ("source", source)):
        out[f"{name}_n"] = np.asarray(t.n)
        out[f"{name}_pbar"] = list(np.asarray(t.pbar))
        out[f"{name}_vote_entropy"] = np.asarray(t.vote_entropy)
        out[f"{name}_mi"] = np.asarray(t.mi)
        out[f"{name}_entropy"] = np.asarray(t.entropy)
        out[f"{name}_pred"] = np.where(np.asarray(t.n) > 0, np.asarray(t.pbar).argmax(1), -1)
    w = np.asarray(res.weights)
    out["weight_lalm"], out["weight_source"] = w[:, 0], w[:, 1]
    q = np.asarray(res.q)
    out["q"] = list(q)
    out["clip_weight"] = np.asarray(res.clip_weight)
    out["fusion_status"] = [STATUS_NAMES[s] for s in np.asarray(res.status)]
    out["fused_pred"] = np.where(np.isfinite(q).all(1), np.nan_to_num(q).argmax(1), -1)
    decoded = out["error"].isna()
    out.loc[decoded & (out["fusion_status"] == "no_teacher"), "error"] = NO_TEACHER_ERROR
    return out


def refuse_stored(table: pd.DataFrame, num_classes: int, fusion_cfg) -> pd.DataFrame:
    """Stored labels fused again with this run's fusion settings (N, K, τ, uncertainty, weighting).

    Reuse of stored labels ignores the fusion on purpose (a rerun that changes only the fusion
    pays for no call), so the fusion columns of a reused table must be recomputed, or the run's
    labels and its ``fused_label`` score would still be those of the earlier settings."""
    table = table.copy()
    table.loc[table["error"] == NO_TEACHER_ERROR, "error"] = None
    return fusion_columns(table, num_classes, fusion_cfg)


def _fusion_stage(batch: pd.DataFrame, num_classes: int, fusion_cfg) -> pd.DataFrame:
    return fusion_columns(batch, num_classes, fusion_cfg)


# -- the pipeline -------------------------------------------------------------------------
@dataclass
class LabelingResult:
    labels_path: str
    table: pd.DataFrame
    summary: dict


def label_target(cfg: MiFuseConfig, target_df: pd.DataFrame, out_dir: str, source_checkpoint: str,
                 lalm_base_url: str) -> LabelingResult:
    """Run both teachers and fusion over ``target_df`` with Ray Data; write ``labels.parquet``."""
    import ray
    from .data import read_decoded
    from .lalm.limits import bucket_actor
    from .lalm.client import api_key_from_env
    from .lalm.stage import LIMITER_ACTOR, add_lalm_stage
    from .source_stage import SourceTeacherStage

    start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    C = len(cfg.labels)
    src = cfg.source
    ds = read_decoded(target_df, cfg.audio, batch_size=src.batch_size)
    ds = ds.map_batches(
        SourceTeacherStage, batch_format="pandas", batch_size=src.batch_size,
        fn_constructor_kwargs=dict(checkpoint=os.path.abspath(source_checkpoint), mc_passes=src.mc_passes,
                                   scope=src.mc_scope, seed=src.seed, dropout_override=src.dropout_override,
                                   amp=src.amp, labels=cfg.labels),
        compute=ray.data.ActorPoolStrategy(size=src.num_actors), num_cpus=src.actor_cpus, num_gpus=src.num_gpus or None)
    ds, asked = _select_for_budget(ds, cfg)
    cache_dir = cfg.lalm.cache_dir or os.path.join(out_dir, "lalm_cache")
    max_requests = effective_request_cap(cfg, target_df)
    limiter_name = ""
    if cfg.lalm.qps > 0 or max_requests:
        limiter_name = f"{LIMITER_ACTOR}_{os.getpid()}_{int(start)}"
        limiter = bucket_actor(limiter_name, cfg.lalm.qps, max_requests)
    ds = add_lalm_stage(ds, cfg.lalm, cfg.labels, lalm_base_url, cache_dir, cfg.audio.sample_rate, limiter_name,
                        max_requests, api_key_from_env(cfg.lalm))
    ds = ds.map_batches(_fusion_stage, batch_format="pandas", fn_kwargs=dict(num_classes=C, fusion_cfg=cfg.fusion),
                        num_cpus=0.25)
    table = pd.concat(list(ds.iter_batches(batch_format="pandas", batch_size=None)), ignore_index=True)
    if limiter_name:
        ray.kill(limiter)
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
    """BALD mutual information of the source model's MC-dropout passes, per clip."""
    votes = _stack_lists(table["source_votes"], fill=-1)
    probs = _stack_lists(table["source_probs"], fill=np.nan, inner=num_classes)
    return np.asarray(teacher_stats(votes, num_classes, probs).mi)


def _select_for_budget(ds, cfg: MiFuseConfig):
    """With ``lalm.budget`` below all decoded clips: a global step between the source and LALM
    stages that marks the clips to ask (``lalm_asked``). The source stage's output is materialised
    (decoded audio included; Ray spills it to disk when large) because the choice needs every
    clip's uncertainty and embedding at once."""
    from .selection import budget_count, select_clips
    if cfg.lalm.budget == 1.0:          # every clip: keep the pipeline streaming, no barrier
        return ds, None
    ds = ds.materialize()
    meta = ds.select_columns(["clip_id", "error", "source_votes", "source_probs", "embedding"]).to_pandas()
    decoded = meta[meta["error"].isna()].reset_index(drop=True)
    k = budget_count(cfg.lalm.budget, len(decoded))
    if k >= len(decoded):
        return ds, None
    emb = np.stack([np.asarray(e, dtype=np.float32) for e in decoded["embedding"]]) if len(decoded) else np.zeros((0, 1))
    mask = select_clips(selection_uncertainty(decoded, len(cfg.labels)), emb, k, cfg.lalm.budget_selection,
                        seed=cfg.source.seed)
    asked = set(decoded.loc[mask, "clip_id"])
    log.info("LALM budget: asking %d of %d decoded clips (%s)", len(asked), len(decoded), cfg.lalm.budget_selection)

    def mark(batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.copy()
        batch["lalm_asked"] = batch["clip_id"].isin(asked)
        return batch
    return ds.map_batches(mark, batch_format="pandas", num_cpus=0.25), asked


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
    from .selection import budget_count
    clips = len(target_df)
    asked = budget_count(cfg.lalm.budget, clips)
    from .lalm.client import PRESETS
    preset = PRESETS.get(cfg.lalm.preset)
    use_n = preset.supports_n if cfg.lalm.use_n is None and preset else bool(cfg.lalm.use_n)
    per_clip = 1 if use_n else cfg.lalm.n_answers
    seconds = float(target_df["duration_s"].fillna(0).mean()) if "duration_s" in target_df and clips else 0.0
    requests = asked * per_clip
    cost = requests * cfg.lalm.usd_per_request + requests * seconds / 60 * cfg.lalm.usd_per_audio_minute
    return {"clips": clips, "clips_asked": asked, "requests": requests, "answers": asked * cfg.lalm.n_answers,
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
    from .metrics import uar
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
        summary["fusion_status"] = {str(k): int(v) for k, v in table.loc[ok, "fusion_status"].value_counts().items()}
    truth_col = "label" if "label" in table and table["label"].notna().any() else "oracle_label"
    if truth_col in table and table[truth_col].notna().any():
        known = ok & table[truth_col].notna()
        y = np.array([list(labels).index(v) for v in table.loc[known, truth_col]])
        summary["truth_column"] = truth_col
        for name in ("lalm", "source", "fused"):
            pred = table.loc[known, f"{name}_pred"].to_numpy()
            summary[f"uar_{name}"] = uar(y, np.where(pred >= 0, pred, (y + 1) % C), C)
    return summary
