"""Student adaptation with Ray Train: the fused label as the anchor, consistency with the EMA
teacher, online re-fusion, checkpoints.

Read top to bottom: ``_student_loop`` is what every DDP worker runs (``_setup``, then per epoch
``_train_epoch`` over ``_step``, then ``_end_epoch``); ``train_student`` is the driver that builds
the labels, datasets and the ``TorchTrainer`` and returns the final model. What a baseline
changes is its row in ``modes.MODES``; the loop reads the row and never compares mode names.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from ..config import FusionConfig, MiFuseConfig, result_fields
from ..fusion import FusionFit, OnlineBalance, TeacherStats, draw_labels, fuse, rescale, teacher_stats, temper
from ..fused_labels import draw_columns, fit_table, fuse_kwargs, fusion_columns, stored_draws, teacher_names
from ..metrics import uar_from_confusion
from .common import (augment, batch_norm_layers, crop_batch, device_for_worker, evaluate_shard, hash_seed,
                     lr_schedule, mixup, running_statistics_kept, shrink_perturb, strong_augment)
from .distill import distill_terms
from .ema import EMATeacher, decay_from_half_life, ema_decay_at
from .losses import diversity_kl, information_maximization, soft_label_gce, soft_label_kl
from .modes import MODES, Mode, head_only

HISTORY_FILE = "history.json"


@dataclasses.dataclass
class LoopInputs:
    """What the driver hands every worker besides the typed config."""

    cfg: MiFuseConfig
    mode: Mode
    source_checkpoint: str
    n_train: int
    prior: list
    fusion: FusionConfig            # how the mode's labels were fused (re-fusion uses the same)
    fit: FusionFit | None           # ... and their global part (balancing, temperatures, label model)
    fused_dev_uar: float | None     # the fused label's UAR on the student's dev half: the re-fusion gate
    tensorboard_dir: str
    step_hook: Callable | None = None   # tests: called as hook(epoch, batch_no, rank, world) after each step


@dataclasses.dataclass
class _Run:
    """One worker's training state (built by ``_setup``)."""

    inp: LoopInputs
    student: Any
    model: Any                      # the DDP-wrapped student
    ema: EMATeacher | None
    opt: Any
    sched: Any
    params: list
    device: Any
    rank: int
    world: int
    step: int
    start_epoch: int
    history: list
    balances: dict                  # OnlineBalance of the EMA teacher and of q, for re-fusion
    distill_teacher: Any
    writer: Any
    train_shard: Any
    dev_shard: Any


# -- the worker loop ----------------------------------------------------------------------
def _student_loop(config: dict) -> None:
    run = _setup(config["inputs"])
    if run.start_epoch == 0 and run.inp.cfg.train.adapt_norm:
        _adapt_norm(run)
    for epoch in range(run.start_epoch, run.inp.cfg.train.epochs):
        sums = _train_epoch(run, epoch)
        _end_epoch(run, epoch, sums)
    if run.writer is not None:
        run.writer.close()


def _setup(inp: LoopInputs) -> _Run:
    import ray.train
    import ray.train.torch
    from ..models.base import load_model

    t = inp.cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(t.seed)
    device = device_for_worker()
    student = load_model(inp.source_checkpoint)
    if t.lora_rank > 0:
        from ..models.lora import apply_lora, trainable_fraction
        student = apply_lora(student, inp.source_checkpoint, t.lora_rank, t.lora_alpha, list(t.lora_target_modules),
                             t.lora_dropout)
        trainable, total = trainable_fraction(student)
        if rank == 0:
            print(f"LoRA student: {trainable:,} of {total:,} parameters trainable ({trainable / total:.2%})")
    if t.init == "shrink_perturb":
        shrink_perturb(student, t.init_shrink, t.init_perturb, t.seed)
    student = student.to(device)
    steps_per_epoch = max(1, inp.n_train // (t.batch_size * world))
    alpha = decay_from_half_life(t.ema_half_life_steps, 1) if t.ema_half_life_steps > 0 else t.ema_decay
    ema = EMATeacher(student, alpha) if inp.mode.ema else None
    params = trained_parameters(student, inp.mode, t.trainable)
    opt = torch.optim.AdamW(learning_rate_groups(student, params, t.lr, t.head_lr), weight_decay=t.weight_decay)
    sched = lr_schedule(opt, steps_per_epoch * t.epochs, t.warmup_frac, t.lr_decay)
    balances = _initial_balances(inp)
    step, start_epoch, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            step, last_epoch, history = _load_checkpoint(d, student, ema, opt, sched, balances)
        start_epoch = last_epoch + 1
    if ema is not None:
        ema.model.to(device)
    distill_teacher = None
    if t.distill_kl_weight > 0 or t.cka_weight > 0:
        distill_teacher = ema.model if t.distill_teacher == "ema" and ema is not None else \
            load_model(inp.source_checkpoint).to(device).eval().requires_grad_(False)
    writer = None
    if rank == 0 and inp.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(inp.tensorboard_dir)
    return _Run(inp, student, ray.train.torch.prepare_model(student), ema, opt, sched, params, device, rank, world,
                step, start_epoch, history, balances, distill_teacher, writer,
                ray.train.get_dataset_shard("train"), _optional_shard("dev"))


def trained_parameters(student, mode: Mode, trainable: str) -> list:
    """The parameters the optimiser moves, the others frozen. ``train.trainable head``: only the head,
    so that the trunk keeps the source's features (with a few hundred noisy labels, a whole network
    learns their errors along with the classes; a head on fixed features has fewer ways to). SHOT
    keeps the source hypothesis (the last linear layer) and adapts the trunk, whatever ``trainable``."""
    if head_only(mode, trainable):
        student.requires_grad_(False)
        for layer in student.head_layers():
            layer.requires_grad_(True)
    if "classifier" in mode.frozen:
        last = [m for layer in student.head_layers() for m in layer.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.requires_grad_(False)
    return [p for p in student.parameters() if p.requires_grad]


def learning_rate_groups(student, params: list, lr: float, head_lr: float) -> list[dict]:
    """The optimiser's parameter groups: the head's parameters at ``head_lr``, the trunk's at ``lr``.
    A head on fixed features needs larger steps than a trunk that should stay near the source's
    weights, and SHOT-IM's trunk keeps the rate it was measured at."""
    in_head = {id(p) for layer in student.head_layers() for p in layer.parameters()}
    groups = [{"params": [p for p in params if id(p) in in_head], "lr": head_lr},
              {"params": [p for p in params if id(p) not in in_head], "lr": lr}]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def _adapt_norm(run: _Run) -> None:
    """AdaBN: the source model's BatchNorm statistics describe the source domain; re-estimate them
    once on the target's clean clips (a cumulative average over one pass) before training, then
    keep them fixed. The EMA teacher starts from the same statistics (it copies buffers)."""
    cfg = run.inp.cfg
    norms = batch_norm_layers(run.student)
    if not norms:
        return
    rng = np.random.default_rng([cfg.train.seed, run.rank, 7])
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for batch in run.train_shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy"):
        wav, lengths = crop_batch(list(batch["audio"]), int(cfg.audio.train_crop_s * cfg.audio.sample_rate), rng)
        run.student(wav.to(run.device), lengths.to(run.device))
    for m in norms:
        m.momentum = 0.1
        m.eval()
    if run.ema is not None:
        for e, s in zip(run.ema.model.buffers(), run.student.buffers()):
            e.copy_(s)


def _train_epoch(run: _Run, epoch: int) -> dict:
    t = run.inp.cfg.train
    # Random streams seeded per (seed, rank, epoch): a run resumed from a checkpoint draws the same
    # crops, augmentations and dropout masks in its remaining epochs as an uninterrupted run.
    torch.manual_seed(hash_seed(t.seed, run.rank, epoch))
    rng = np.random.default_rng([t.seed, run.rank, epoch])
    gen = torch.Generator().manual_seed(hash_seed(t.seed, run.rank, epoch, 1))
    _train_mode(run)
    online_fusion = _online_fusion_on(run, epoch)
    sums: dict = {"n": 0, "online_fusion": float(online_fusion), "clips": 0, "started": time.time()}
    for batch in run.train_shard.iter_batches(batch_size=t.batch_size, batch_format="numpy",
                                              local_shuffle_buffer_size=512, local_shuffle_seed=epoch * 31 + run.rank,
                                              drop_last=run.world > 1):
        for name, value in _step(run, batch, rng, gen, online_fusion).items():
            sums[name] = sums.get(name, 0.0) + value
        sums["n"] += 1
        sums["clips"] += len(batch["clip_id"])
        if run.inp.step_hook is not None:
            run.inp.step_hook(epoch, sums["n"], run.rank, run.world)
    return sums


def _train_mode(run: _Run) -> None:
    """Dropout on where the student learns. A head-only student's trunk stays in eval mode: a frozen
    trunk that still drops activations would train the head on features it never sees at test time
    (`benchmarks/head_probe.py`: 0.502 against 0.534 test UAR over the six demo transfers)."""
    t = run.inp.cfg.train
    run.model.train()
    if t.batchnorm == "frozen":
        for m in batch_norm_layers(run.student):
            m.eval()
    if head_only(run.inp.mode, t.trainable):
        run.student.eval()
        for layer in run.student.head_layers():
            layer.train()


def _step(run: _Run, batch: dict, rng, gen, online_fusion: bool) -> dict:
    """One optimiser step; returns the loss terms for the epoch's averages."""
    cfg, mode, t, device = run.inp.cfg, run.inp.mode, run.inp.cfg.train, run.device
    clean, lengths = crop_batch(list(batch["audio"]), int(cfg.audio.train_crop_s * cfg.audio.sample_rate), rng)
    max_shift = int(t.max_shift_s * cfg.audio.sample_rate)
    # The labels are learnt on the weak view (as in FixMatch: the supervised term never sees the strong
    # augmentation); the consistency term on the strong view. anchor_view "strong" puts both on the strong
    # view, one forward pass fewer.
    view, view_len = clean, lengths
    consistency = mode.consistency and t.consistency_weight > 0     # off by default: no strong view, no extra pass
    own_anchor_pass = not (consistency and t.anchor_view == "strong")   # else the anchor reuses the strong pass
    if t.augment and own_anchor_pass:
        view, view_len = augment(clean, lengths, gen, t.noise_snr_db, t.gain_db, max_shift, t.speed_range)
    strong = strong_len = None
    if consistency:
        strong, strong_len = strong_augment(clean, lengths, gen, cfg.audio.sample_rate, max_shift=max_shift)
        if t.anchor_view == "strong":
            view, view_len = strong, strong_len
        strong, strong_len = strong.to(device), strong_len.to(device)
    clean, lengths, view, view_len = clean.to(device), lengths.to(device), view.to(device), view_len.to(device)
    terms = {}
    q = torch.tensor(np.asarray(batch["q"]), dtype=torch.float32, device=device)
    c = torch.tensor(np.asarray(batch["clip_weight"]), dtype=torch.float32, device=device)
    ema_probs = None            # the EMA teacher's clean-view prediction, when re-fusion has made it
    if online_fusion:
        q, c, weights, ema_probs = _online_fused_q(run, clean, lengths, batch)
        terms["weight_lalm"] = float(weights[:, 0].mean())
    # mixup only where the label term has a forward pass of its own (with anchor_view "strong" the
    # consistency term reuses it and must see unmixed clips)
    if t.mixup_alpha > 0 and mode.mixup and own_anchor_pass:
        view, view_len, q, c = mixup(view, view_len, q, c, t.mixup_alpha, rng)
    use_amp = t.amp and device.type == "cuda"
    need_frames = t.cka_weight > 0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        out = run.model(view, view_len, return_frames=need_frames)
    logits, s_frames, s_mask = out if need_frames else (out, None, None)
    probs = torch.softmax(logits.float(), -1)
    if mode.loss == "information_max":
        anchor = loss = information_maximization(logits)
    else:
        anchor = soft_label_gce(q, logits, c, t.gce_k) if t.label_loss == "gce" else soft_label_kl(q, logits, c)
        loss = anchor + t.lambda_div * diversity_kl(probs, torch.tensor(run.inp.prior, device=device))
    terms["anchor"], terms["div"] = float(anchor.detach()), float((loss - anchor).detach())
    if consistency:
        strong_logits = logits
        if t.anchor_view != "strong":
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp), \
                    running_statistics_kept(run.student):
                strong_logits = run.model(strong, strong_len)
        cons, kept = _consistency(run, clean, lengths, strong_logits, ema_probs)
        loss = loss + t.consistency_weight * cons
        terms["consistency"], terms["consistency_kept"] = float(cons.detach()), kept
    if run.distill_teacher is not None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            t_logits, t_frames, t_mask = run.distill_teacher(view, view_len, return_frames=True)
        for name, term in distill_terms(logits, s_frames, s_mask, t_logits, t_frames, t_mask, t.distill_kl_weight,
                                        t.distill_temperature, t.cka_weight).items():
            loss = loss + term
            terms[name] = float(term.detach())
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.params, t.grad_clip)
    run.opt.step()
    run.sched.step()
    if run.ema is not None:
        run.ema.update(run.student, run.step)
    run.step += 1
    terms["loss"] = float(loss.detach())
    terms["agreement"] = float((probs.argmax(1) == torch.nan_to_num(q).argmax(1)).float().mean())
    return terms


def _end_epoch(run: _Run, epoch: int, sums: dict) -> None:
    import ray.train
    n = max(sums.pop("n"), 1)
    online_fusion = bool(sums.pop("online_fusion"))
    seconds, clips = time.time() - sums.pop("started"), sums.pop("clips")
    metrics = {"epoch": epoch, "step": run.step, **{f"train_{k}": v / n for k, v in sums.items()},
               "epoch_seconds": seconds, "clips_per_s": clips * run.world / max(seconds, 1e-9),
               "dev_uar": _dev_uar(run.student, run), "ema_dev_uar": _dev_uar(run.ema.model, run) if run.ema else None,
               "online_fusion": online_fusion, "attempt_start_epoch": run.start_epoch}
    if run.ema is not None:
        # the decay the warm-up actually applied at the epoch's last step, beside the configured α
        metrics["ema_alpha"] = ema_decay_at(max(run.step - 1, 0), run.ema.alpha)
        metrics["ema_alpha_configured"] = run.ema.alpha
    final = "ema_dev_uar" if run.ema is not None else "dev_uar"
    metrics["final_dev_uar"] = metrics[final]          # the model this run ends with (Tune's metric)
    recent = [h[final] for h in run.history[-2:]] + [metrics[final]]
    metrics["smoothed_dev_uar"] = float(np.mean(recent)) if all(v is not None and v == v for v in recent) else None
    # Ray Train keeps the checkpoints with the highest select_score: the latest ones for select=final
    metrics["select_score"] = float(epoch) if run.inp.cfg.train.select == "final" else \
        (metrics["smoothed_dev_uar"] if metrics["smoothed_dev_uar"] is not None else -1.0)
    metrics["weights_rank_spread"] = weights_rank_spread(run.student)
    if run.writer is not None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                run.writer.add_scalar(k, float(v), epoch)
        run.writer.flush()
    run.history.append(metrics)
    if run.rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            _save_checkpoint(tmp, run, epoch)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


# -- the teacher side: consistency and online re-fusion -------------------------------------
def _consistency(run: _Run, clean, lengths, student_logits, ema_probs=None) -> tuple[torch.Tensor, float]:
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


def _online_fusion_on(run: _Run, epoch: int) -> bool:
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


def _online_fused_q(run: _Run, clean, lengths, batch) -> tuple:
    """q fused again with the EMA model in the source teacher's place (clean clip, K_EMA MC passes)
    beside the other teachers' stored draws, through the same fusion and fit as the labels; the EMA
    teacher and q are balanced with running class means instead of the labelling split's."""
    from ..models.mc import hashed_uniform, mc_predict, mc_seeds
    t, device = run.inp.cfg.train, run.device
    clip_ids = list(batch["clip_id"])
    seeds = mc_seeds(t.seed + 7919 * run.step, clip_ids, t.ema_passes_per_clip).to(device)
    out = mc_predict(run.ema.model, clean, lengths, seeds, scope=t.ema_mc_scope, amp=t.amp)
    uniforms = hashed_uniform(seeds.reshape(-1), layer=-1, shape=(1,)).reshape(len(clip_ids), -1)
    C = out.probs.shape[-1]
    ema_teacher = teacher_stats(draw_labels(out.probs, uniforms), C, out.probs)
    teachers = [ema_teacher if name == "source" else _stored_teacher(batch, name, C, device)
                for name in teacher_names(batch)]
    fit = run.inp.fit or FusionFit()
    if fit.teacher_scales is not None:
        temperature = fit.temperatures[1] if fit.temperatures else 1.0
        run.balances["ema"].update(temper(ema_teacher.pbar, temperature))
        scales = list(fit.teacher_scales)
        scales[1] = run.balances["ema"].scale()                 # index 1: the source model's slot
        fit = dataclasses.replace(fit, teacher_scales=scales)
    res = fuse(teachers, fit=dataclasses.replace(fit, fused_scale=None), **fuse_kwargs(run.inp.fusion))
    q = res.q
    if fit.fused_scale is not None:
        run.balances["fused"].update(q)
        q = rescale(q, run.balances["fused"].scale())
    return q, res.clip_weight, res.weights, out.det_probs


def _stored_teacher(batch: dict, name: str, num_classes: int, device) -> TeacherStats:
    """A teacher's statistics from the draws the training table carries for it."""
    votes_col, probs_col = draw_columns(name)
    return teacher_stats(torch.as_tensor(np.asarray(batch[votes_col]), device=device), num_classes,
                         torch.as_tensor(np.asarray(batch[probs_col]), device=device))


def _initial_balances(inp: LoopInputs) -> dict:
    fit = inp.fit or FusionFit()
    source_scale = fit.teacher_scales[1] if fit.teacher_scales is not None else None
    return {"ema": OnlineBalance(inp.prior, source_scale), "fused": OnlineBalance(inp.prior, fit.fused_scale),
            "consistency": OnlineBalance(inp.prior)}


# -- evaluation and checkpoints ---------------------------------------------------------------
def _optional_shard(name: str):
    import ray.train
    try:
        return ray.train.get_dataset_shard(name)
    except (KeyError, ValueError):
        return None


def _dev_uar(model, run: _Run) -> float | None:
    if run.dev_shard is None:
        return None
    return uar_from_confusion(evaluate_shard(model, run.dev_shard, run.device, run.student.num_classes))


def _save_checkpoint(directory: str, run: _Run, epoch: int) -> None:
    run.student.save(os.path.join(directory, "student"))
    if run.ema is not None:
        run.ema.model.save(os.path.join(directory, "ema"))
    torch.save({"optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(), "step": run.step,
                "epoch": epoch, "balances": {k: b.mean.tolist() for k, b in run.balances.items()}},
               os.path.join(directory, "train_state.pt"))
    # Every epoch's metrics so far travel with the checkpoint: Ray Train's own metrics table only
    # holds the checkpoints it kept, ordered by score, and a resumed attempt starts it afresh.
    with open(os.path.join(directory, HISTORY_FILE), "w") as fh:
        json.dump(run.history, fh, default=float)


def _load_checkpoint(directory: str, student, ema, opt, sched, balances) -> tuple[int, int, list[dict]]:
    from ..models.base import load_model
    student.load_state_dict(load_model(os.path.join(directory, "student")).state_dict())
    if ema is not None:
        ema.model.load_state_dict(load_model(os.path.join(directory, "ema")).state_dict())
    state = torch.load(os.path.join(directory, "train_state.pt"), weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    for name, mean in state.get("balances", {}).items():
        balances[name].mean = np.asarray(mean)
    return int(state["step"]), int(state["epoch"]), _read_history(directory)


def _read_history(directory: str) -> list[dict]:
    path = os.path.join(directory, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return json.load(fh)


def weights_rank_spread(model) -> float:
    """max − min over DDP ranks of a parameter checksum: 0 when every rank holds the same weights."""
    import torch.distributed as dist
    checksum = sum(float(p.detach().double().sum()) + 1e-3 * float(p.detach().double().abs().sum())
                   for p in model.parameters())
    if not (dist.is_available() and dist.is_initialized()):
        return 0.0
    hi = torch.tensor([checksum], dtype=torch.float64)
    lo = hi.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float(hi - lo)


# -- driver -----------------------------------------------------------------------------------
def mode_labels(cfg: MiFuseConfig, labels_table: pd.DataFrame, choice=None) -> tuple[FusionConfig, FusionFit | None]:
    """The fusion a mode learns from: the dev-chosen one, or its named variant fitted on the split."""
    from ..fusion import VARIANTS
    mode = MODES[cfg.train.mode]
    if mode.labels == "chosen" or mode.labels is None:
        if choice is None:
            from ..calibration import choose_fusion
            choice = choose_fusion(labels_table, None, cfg.fusion, cfg.labels)
        return choice.config, choice.fit
    fusion = dataclasses.replace(cfg.fusion, **VARIANTS[mode.labels])
    return fusion, fit_table(labels_table, len(cfg.labels), fusion)


def training_table(labels_table: pd.DataFrame, cfg: MiFuseConfig, fusion: FusionConfig,
                   fit: FusionFit | None) -> pd.DataFrame:
    """Rows the student learns from: q fused with the mode's fusion, and the draws of every teacher
    but the source model (the EMA takes its place) for online re-fusion."""
    C = len(cfg.labels)
    ok = labels_table[labels_table["error"].isna()].reset_index(drop=True)
    fused = fusion_columns(ok, C, fusion, fit)
    q = np.stack(fused["q"]).astype(np.float32)
    valid = np.isfinite(q).all(1)
    draws = stored_draws(ok, C, fusion.lalm_answers_used, fusion.source_passes_used)
    keep = [c for c in ("clip_id", "path", "offset_s", "segment_s", "parent_id") if c in ok.columns]
    table = ok.loc[valid, keep].copy()
    table["q"] = list(q[valid])
    table["clip_weight"] = fused["clip_weight"].to_numpy(np.float32)[valid]
    for name, (votes, probs) in draws.items():
        if name != "source":
            votes_col, probs_col = draw_columns(name)
            table[votes_col], table[probs_col] = list(votes[valid]), list(probs[valid])
    table["error"] = None
    return table.reset_index(drop=True)


def class_prior(cfg: MiFuseConfig, table: pd.DataFrame) -> list[float]:
    C = len(cfg.labels)
    if cfg.train.prior == "q_mean":
        return np.stack(table["q"]).mean(0).tolist()
    return [1.0 / C] * C


def fused_dev_uar(dev_labels: pd.DataFrame | None, dev_df: pd.DataFrame | None, cfg: MiFuseConfig,
                  fusion: FusionConfig, fit: FusionFit | None) -> float | None:
    """The fused label's UAR on the student's dev clips (its line in the report's curve)."""
    from ..metrics import counting_unanswered_as_wrong, uar
    if dev_labels is None or dev_df is None or not len(dev_df):
        return None
    C = len(cfg.labels)
    t = dev_labels[dev_labels["error"].isna() & dev_labels["clip_id"].isin(set(dev_df["clip_id"]))]
    if not len(t):
        return None
    pred = fusion_columns(t.reset_index(drop=True), C, fusion, fit)["fused_pred"].to_numpy()
    y = np.array([cfg.labels.index(v) for v in t["label"]])
    return uar(y, counting_unanswered_as_wrong(y, pred, C), C)


@dataclasses.dataclass
class StudentResult:
    model_dir: str              # the final model (the EMA, or the student of a mode without one)
    chosen: str                 # "student" | "ema"
    student_dir: str
    ema_dir: str | None
    best_metrics: dict          # the metrics of the epoch the model comes from
    history: list[dict]
    seconds: float
    fused_dev_uar: float | None = None


def train_student(cfg: MiFuseConfig, labels_table: pd.DataFrame, dev_df: pd.DataFrame | None, source_checkpoint: str,
                  out_dir: str, run_name: str = "student", step_hook: Callable | None = None,
                  report_to_tune: bool = False, choice=None, dev_labels: pd.DataFrame | None = None) -> StudentResult:
    """Train one mode's student; ``dev_df`` (the student's half of the dev split) only monitors it
    unless ``train.select = smoothed_dev``."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ..data import ordered_ingest, training_clips

    start = time.time()
    t, mode = cfg.train, MODES[cfg.train.mode]
    fusion, fit = mode_labels(cfg, labels_table, choice)
    table = training_table(labels_table, cfg, fusion, fit)
    if table.empty:
        raise ValueError("no clip has a usable fused label: nothing to train the student on")
    has_dev = dev_df is not None and len(dev_df) > 0
    datasets = {"train": training_clips(table, cfg.audio, t.ingest)}
    if has_dev:
        datasets["dev"] = training_clips(dev_df, cfg.audio, t.ingest)
    inputs = LoopInputs(cfg=cfg, mode=mode, source_checkpoint=os.path.abspath(source_checkpoint), n_train=len(table),
                        prior=class_prior(cfg, table), fusion=fusion, fit=fit,
                        fused_dev_uar=fused_dev_uar(dev_labels, dev_df, cfg, fusion, fit),
                        tensorboard_dir=os.path.abspath(os.path.join(out_dir, "tensorboard", run_name)),
                        step_hook=step_hook)
    final_dir = os.path.join(out_dir, "models", run_name)
    storage = t.storage_path or os.path.abspath(os.path.join(out_dir, "_ray_train"))
    fingerprints = os.path.abspath(os.path.join(out_dir, "_ray_train"))
    fingerprint = _fingerprint(inputs, table, dev_df)
    done = _finished_run(final_dir, fingerprint)
    if done is not None and not report_to_tune:
        return done
    if _stored_fingerprint(fingerprints, run_name) not in (None, fingerprint):
        remove_tree(f"{storage.rstrip('/')}/{run_name}")              # other settings: start afresh
    _store_fingerprint(fingerprints, run_name, fingerprint)
    # Same name and storage as an interrupted run: Ray Train restores its latest checkpoint.
    trainer = TorchTrainer(
        _student_loop, train_loop_config={"inputs": inputs}, datasets=datasets, dataset_config=ordered_ingest(),
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker},
                                               placement_strategy=t.placement_strategy),
        run_config=ray.train.RunConfig(
            storage_path=storage, name=run_name,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=_tune_callbacks() if report_to_tune else None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="select_score",
                                                         checkpoint_score_order="max")))
    result = trainer.fit()
    best_ckpt = result.get_best_checkpoint(metric="select_score", mode="max") or result.checkpoint
    best = next((m for c, m in result.best_checkpoints if c.path == best_ckpt.path), result.metrics)
    if os.path.exists(final_dir):
        shutil.rmtree(final_dir)
    with best_ckpt.as_directory() as d:
        # Resume state stays behind; the run's full history goes to result.json below.
        shutil.copytree(d, final_dir, ignore=shutil.ignore_patterns("train_state.pt", HISTORY_FILE))
    chosen = "ema" if mode.ema else "student"
    with result.checkpoint.as_directory() as d:            # the latest checkpoint: every epoch's metrics
        history = _read_history(d)
    res = StudentResult(model_dir=os.path.join(final_dir, chosen), chosen=chosen,
                        student_dir=os.path.join(final_dir, "student"),
                        ema_dir=os.path.join(final_dir, "ema") if mode.ema else None,
                        best_metrics=dict(best), history=history, seconds=time.time() - start,
                        fused_dev_uar=inputs.fused_dev_uar)
    with open(os.path.join(final_dir, "result.json"), "w") as fh:
        json.dump({"fingerprint": fingerprint, "result": dataclasses.asdict(res)}, fh, default=str)
    return res


def _tune_callbacks() -> list:
    from ray.tune.integration.ray_train import TuneReportCallback
    return [TuneReportCallback()]


def _fingerprint(inputs: LoopInputs, table: pd.DataFrame, dev_df: pd.DataFrame | None) -> str:
    """Everything that changes a student: every result field of the config (train, audio, fusion),
    the mode's fusion and fit, the source checkpoint, the clips and their labels, the dev clips."""
    cfg = inputs.cfg
    fit = dataclasses.asdict(inputs.fit) if inputs.fit is not None else None
    payload = json.dumps({"train": result_fields(cfg.train), "audio": result_fields(cfg.audio),
                          "fusion": result_fields(inputs.fusion), "fit": fit, "prior": inputs.prior,
                          "labels": cfg.labels, "source": inputs.source_checkpoint,
                          "fused_dev_uar": inputs.fused_dev_uar,
                          "dev": sorted(dev_df["clip_id"]) if dev_df is not None else None},
                         sort_keys=True, default=lambda o: np.asarray(o).round(6).tolist())
    payload += "".join(table["clip_id"]) + str(np.round(np.stack(table["q"]), 5).tobytes())
    return hashlib.sha256(payload.encode()).hexdigest()


def _finished_run(final_dir: str, fingerprint: str) -> StudentResult | None:
    """A finished run with the same settings and data: reuse it instead of training again."""
    path = os.path.join(final_dir, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        stored = json.load(fh)
    if stored.get("fingerprint") != fingerprint:
        return None
    return StudentResult(**stored["result"])


def remove_tree(path: str) -> None:
    """Delete a folder on local disk or under an fsspec URI (s3://, gs://); a missing one is fine."""
    if "://" in path and not path.startswith("file://"):
        import fsspec
        fs, root = fsspec.core.url_to_fs(path)
        if fs.exists(root):
            fs.rm(root, recursive=True)
        return
    shutil.rmtree(path.removeprefix("file://"), ignore_errors=True)


def _fingerprint_path(storage: str, run_name: str) -> str:
    return os.path.join(storage, f"{run_name}.fingerprint")


def _stored_fingerprint(storage: str, run_name: str) -> str | None:
    path = _fingerprint_path(storage, run_name)
    return open(path).read() if os.path.exists(path) else None


def _store_fingerprint(storage: str, run_name: str, fingerprint: str) -> None:
    os.makedirs(storage, exist_ok=True)
    with open(_fingerprint_path(storage, run_name), "w") as fh:
        fh.write(fingerprint)
