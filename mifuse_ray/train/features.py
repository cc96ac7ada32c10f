"""Where a student's steps get the trunk's output: stored beside the labels, or the trunk run on the audio.

A head-only student (``train.trainable head``) never changes its trunk, and in eval mode the trunk
gives a clean clip the same output every epoch. The source stage already runs that trunk once per
clip while labelling, and stores its pooled output (``models.base.TRUNK_FEATURES``); a student that
learns from those vectors does in one matrix product per step what the waveform path does with a
decode, a crop, an augmentation and a CNN forward pass. What it gives up is anything that needs
the audio: waveform augmentation, random crops, a strong view, frame features, a trunk that learns.
``train.features auto`` takes the stored path exactly when none of those is asked for; mixup (on
by default) mixes the stored vectors instead of the waveforms.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..models.base import TRUNK_FEATURES
from .modes import Mode, head_only


def waveform_needs(cfg, mode: Mode) -> list[str]:
    """What in this run needs the trunk run on the audio, each named by the setting that asks for it."""
    t = cfg.train
    needs = []
    if not head_only(mode, t.trainable):
        needs.append("the trunk learns (train.trainable all, or a mode that adapts its trunk)")
    if t.augment:
        needs.append("train.augment (noise, gain, shift and speed act on the waveform)")
    if mode.consistency and t.consistency_weight > 0:
        needs.append("train.consistency_weight > 0 (a strong view of the audio)")
    if t.distill_kl_weight > 0 or t.cka_weight > 0:
        needs.append("distillation (train.distill_kl_weight or train.cka_weight > 0)")
    if t.adapt_norm:
        needs.append("train.adapt_norm (BatchNorm statistics re-estimated on the audio)")
    if mode.online_fusion and mode.ema and t.ema_mc_scope == "full":
        needs.append("train.ema_mc_scope full (MC dropout inside the trunk)")
    return needs


def has_stored_trunk(*tables: pd.DataFrame | None) -> bool:
    """Every given table is there and carries a stored trunk output for each of its labelled clips."""
    for table in tables:
        if hasattr(table, "has_trunk"):          # training rows on the cluster (``labels.TrainingRows``)
            if not table.has_trunk:
                return False
            continue
        if table is None or TRUNK_FEATURES not in table.columns:
            return False
        ok = table["error"].isna() if "error" in table.columns else slice(None)
        if table.loc[ok, TRUNK_FEATURES].isna().any():
            return False
    return True


def learns_on_stored_trunk(cfg, mode: Mode, *tables: pd.DataFrame | None) -> tuple[bool, str]:
    """(whether the run learns on the stored trunk output, why not when it does not)."""
    if cfg.train.features == "waveform":
        return False, "train.features waveform"
    needs = waveform_needs(cfg, mode)
    if needs:
        return False, needs[0]
    if not has_stored_trunk(*tables):
        return False, "the labels carry no stored trunk output (a source model whose head reads more than a vector)"
    return True, ""


def epoch_batches(run, epoch: int):
    """The epoch's batches of this rank's shard (``run``: the loop's ``_Run``), shuffled per (seed, rank,
    epoch). On audio, Ray Data streams them through a local shuffle buffer. With a stored trunk a row is a few hundred floats,
    so the rank holds its rows after the first pass (about 1 kB a clip) and shuffles them itself:
    pulling 150 small batches through Ray Data cost twice the head's own steps (benchmarks/stored_trunk.py)."""
    t = run.inp.cfg.train
    if not run.inp.stored_trunk:
        yield from run.train_shard.iter_batches(batch_size=t.batch_size, batch_format="numpy",
                                                local_shuffle_buffer_size=512, local_shuffle_seed=epoch * 31 + run.rank,
                                                drop_last=run.world > 1)
        return
    if run.stored_rows is None:
        parts = list(run.train_shard.iter_batches(batch_size=4096, batch_format="numpy"))
        run.stored_rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    n = len(run.stored_rows.get("clip_id", ()))
    for idx in shuffled_batches(n, t.batch_size, t.seed, run.rank, epoch, whole_only=run.world > 1):
        yield {k: v[idx] for k, v in run.stored_rows.items()}


def shuffled_batches(n: int, batch_size: int, seed: int, rank: int, epoch: int, whole_only: bool) -> list:
    """Row indices of an epoch's batches over ``n`` held rows, a pure function of (seed, rank, epoch) so
    that a resumed run draws the same batches; ``whole_only`` drops a last partial batch (DDP ranks
    must take the same number of steps)."""
    order = np.random.default_rng([seed, rank, epoch, 31]).permutation(n)
    last = n - n % batch_size if whole_only else n
    return [order[start:start + batch_size] for start in range(0, last, batch_size)]
