"""The teacher side of a student run: consistency with the EMA teacher, and online re-fusion.

From ``train.online_fusion_from_epoch`` (and, with the gate, only while the EMA teacher's dev UAR
is at least the fused label's) the EMA model takes the source model's place among the teachers:
its MC passes on the clean clip are fused with the other teachers' stored draws through the same
fusion and fit as the labels (``fusion.fuse``). Global class balancing, fitted once over the
labelling split, becomes running class means here (``fusion_fit.OnlineBalance``). Teachers are found
by name (``fused_labels.teacher_names``), never by position.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..fusion import FusionFit, TeacherStats, draw_labels, fuse, rescale, teacher_stats, temper
from ..fusion_fit import OnlineBalance
from ..fused_labels import LALM, SOURCE, draw_columns, fuse_kwargs, teacher_names
from .losses import soft_label_kl

def consistency_term(run, clean, lengths, student_logits, ema_probs=None) -> tuple[torch.Tensor, float]:
    """KL from the EMA teacher's sharpened, class-balanced prediction on the clean clip to the
    student's on the strong view, for the clips where that prediction is confident enough.
    ``ema_probs``: that prediction where re-fusion already computed it (one EMA pass, not two)."""
    t = run.inp.cfg.train
    with torch.no_grad():
        target = ema_probs if ema_probs is not None else torch.softmax(run.ema.model(clean, lengths).float(), -1)
        run.balances["consistency"].update(target)
        target = rescale(target, run.balances["consistency"].scale())
        keep = (target.max(1).values >= t.consistency_threshold).float()
        target = temper(target, t.consistency_sharpen)
    return soft_label_kl(target, student_logits, keep), float(keep.mean())


def online_fusion_on(run, epoch: int) -> bool:
    """Re-fuse from ``online_fusion_from_epoch``, and (with the gate) only while the EMA's dev UAR at the
    last epoch is at least the fused label's on the same clips: an EMA that is worse than the
    labels would only drag them down."""
    t, inp = run.inp.cfg.train, run.inp
    if not (inp.mode.online_fusion and run.ema is not None and epoch >= t.online_fusion_from_epoch):
        return False
    if not t.online_fusion_gate or inp.fused_dev_uar is None or not run.history:
        return True
    last = run.history[-1].get("ema_dev_uar")
    return last is not None and last >= inp.fused_dev_uar


def speaker_scale_rows(scales: dict, speakers, num_classes: int) -> torch.Tensor:
    """Each clip's speaker scale vector (``fusion_fit.speaker_scales``), ones where its speaker has none:
    the labels' balancing within each speaker, kept when re-fusion makes the labels again."""
    ones = np.ones(num_classes)
    return torch.tensor(np.stack([scales.get(str(s), ones) for s in speakers]), dtype=torch.float32)


def online_fused_q(run, clean, lengths, batch) -> tuple:
    """q fused again with the EMA model in the source teacher's place (clean clip, K_EMA MC passes)
    beside the other teachers' stored draws, through the same fusion and fit as the labels; the EMA
    teacher and q are balanced with running class means instead of the labelling split's; q then keeps
    the labels' balancing within each speaker (``fit.speaker_scales``) where they had one.
    Returns (q, clip weights, the LALM's fusion weight, the EMA's clean-view prediction)."""
    from ..models.mc import hashed_uniform, mc_predict, mc_seeds
    t, device = run.inp.cfg.train, run.device
    clip_ids = list(batch["clip_id"])
    seeds = mc_seeds(t.seed + 7919 * run.step, clip_ids, t.ema_passes_per_clip).to(device)
    out = mc_predict(run.fed(run.ema.model), clean, lengths, seeds, scope=t.ema_mc_scope, amp=t.amp)
    uniforms = hashed_uniform(seeds.reshape(-1), layer=-1, shape=(1,)).reshape(len(clip_ids), -1)
    C = out.probs.shape[-1]
    ema_teacher = teacher_stats(draw_labels(out.probs, uniforms), C, out.probs)
    names = teacher_names(batch)
    teachers = [ema_teacher if name == SOURCE else _stored_teacher(batch, name, C, device) for name in names]
    slot = names.index(SOURCE)
    fit = run.inp.fit or FusionFit()
    if fit.teacher_scales is not None:
        temperature = fit.temperatures[slot] if fit.temperatures else 1.0
        run.balances["ema"].update(temper(ema_teacher.pbar, temperature))
        scales = list(fit.teacher_scales)
        scales[slot] = run.balances["ema"].scale()
        fit = dataclasses.replace(fit, teacher_scales=scales)
    res = fuse(teachers, fit=dataclasses.replace(fit, fused_scale=None), **fuse_kwargs(run.inp.fusion))
    q = res.q
    if fit.fused_scale is not None:
        run.balances["fused"].update(q)
        q = rescale(q, run.balances["fused"].scale())
    if fit.speaker_scales and "speaker_id" in batch:
        q = rescale(q, speaker_scale_rows(fit.speaker_scales, batch["speaker_id"], C).to(q))
    lalm_weight = res.weights[:, names.index(LALM)]
    return q, res.clip_weight, lalm_weight, out.det_probs


def _stored_teacher(batch: dict, name: str, num_classes: int, device) -> TeacherStats:
    """A teacher's statistics from the draws the training table carries for it."""
    votes_col, probs_col = draw_columns(name)
    return teacher_stats(torch.as_tensor(np.asarray(batch[votes_col]), device=device), num_classes,
                         torch.as_tensor(np.asarray(batch[probs_col]), device=device))


def initial_balances(inp) -> dict:
    """Running class means for re-fusion, started from the labelling split's: the EMA teacher's (in
    the source model's slot), the re-fused label's, and the consistency target's."""
    fit = inp.fit or FusionFit()
    source_scale = fit.teacher_scales[inp.teachers.index(SOURCE)] if fit.teacher_scales is not None else None
    return {"ema": OnlineBalance(inp.prior, source_scale), "fused": OnlineBalance(inp.prior, fit.fused_scale),
            "consistency": OnlineBalance(inp.prior)}
