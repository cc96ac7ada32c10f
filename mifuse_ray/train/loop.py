"""What every DDP worker of a student run executes, read top to bottom: ``student_loop`` builds
the run (``_setup``), then per epoch trains over ``_step`` and ends the epoch (dev UAR, metrics,
checkpoint). What a baseline changes is its row in ``modes.MODES``; the loop reads the row and
never compares mode names. The driver side (labels, datasets, the ``TorchTrainer``) is
``train/student.py``; re-fusion and consistency ``train/refusion.py``; checkpoints ``train/checkpoint.py``.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch

from ..config import FusionConfig, MiFuseConfig
from ..fusion import FusionFit
from ..metrics import uar_from_confusion
from .checkpoint import load_checkpoint, save_checkpoint
from .common import (augment, batch_inputs, batch_norm_layers, crop_batch, device_for_worker, evaluate_shard,
                     hash_seed, lr_schedule, mixup, process_group_size, running_statistics_kept, shrink_perturb, strong_augment,
                     weights_rank_spread)
from .distill import distill_terms
from .ema import EMATeacher, decay_from_half_life, ema_decay_at
from .features import epoch_batches
from .losses import diversity_kl, information_maximization, soft_label_gce, soft_label_kl
from .modes import Mode, head_only
from .refusion import consistency_term, initial_balances, online_fused_q, online_fusion_on

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
    teachers: list                  # the teachers' names in fusion order (fused_labels.teacher_names)
    tensorboard_dir: str
    stored_trunk: bool = False      # the rows carry the trunk's stored output (train/features.py), not audio
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
    stored_rows: dict | None = None     # with a stored trunk: this rank's rows, held after the first epoch

    def fed(self, model):
        """``model`` as the loop calls it on a batch's input: itself on audio, or its head on the stored
        trunk output (``OnStoredTrunk``, sharing its parameters)."""
        from ..models.base import OnStoredTrunk
        return OnStoredTrunk(model) if self.inp.stored_trunk else model


# -- the worker loop ----------------------------------------------------------------------
def student_loop(config: dict) -> None:
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
    student = _initial_student(inp, rank).to(device)
    steps_per_epoch = max(1, inp.n_train // (t.batch_size * world))
    alpha = decay_from_half_life(t.ema_half_life_steps, 1) if t.ema_half_life_steps > 0 else t.ema_decay
    ema = EMATeacher(student, alpha) if inp.mode.ema else None
    params = trained_parameters(student, inp.mode, t.trainable)
    opt = torch.optim.AdamW(learning_rate_groups(student, params, t.lr, t.head_lr), weight_decay=t.weight_decay)
    sched = lr_schedule(opt, steps_per_epoch * t.epochs, t.warmup_frac, t.lr_decay)
    balances = initial_balances(inp)
    step, start_epoch, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            step, last_epoch, history = load_checkpoint(d, student, ema, opt, sched, balances)
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
    if inp.stored_trunk:
        from ..models.base import OnStoredTrunk
        trained = OnStoredTrunk(student)
    else:
        trained = student
    return _Run(inp, student, ray.train.torch.prepare_model(trained), ema, opt, sched, params, device, rank, world,
                step, start_epoch, history, balances, distill_teacher, writer,
                ray.train.get_dataset_shard("train"), _optional_shard("dev"))


def _initial_student(inp: LoopInputs, rank: int):
    """The source model, with a LoRA adapter (``train.lora_rank``) or shrunk and perturbed (``train.init``)."""
    from ..models.base import load_model
    t = inp.cfg.train
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
    return student


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
    online_fusion = online_fusion_on(run, epoch)
    sums: dict = {"n": 0, "online_fusion": float(online_fusion), "clips": 0, "started": time.time()}
    for batch in epoch_batches(run, epoch):
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


@dataclasses.dataclass
class _Views:
    """A batch's audio as the step's terms see it (on the worker's device)."""

    clean: Any                      # cropped, not augmented: what the EMA teacher sees
    lengths: Any
    view: Any                       # what the label term learns on (the weak view, or the strong one)
    view_len: Any
    strong: Any = None              # the consistency term's strong view (only with consistency on)
    strong_len: Any = None
    consistency: bool = False
    own_anchor_pass: bool = True    # False: the label term reuses the strong view's forward pass


def _views(run: _Run, batch: dict, rng, gen) -> _Views:
    """The labels are learnt on the weak view (as in FixMatch: the supervised term never sees the
    strong augmentation); the consistency term on the strong view. ``anchor_view strong`` puts both
    on the strong view, one forward pass fewer."""
    cfg, mode, t, device = run.inp.cfg, run.inp.mode, run.inp.cfg.train, run.device
    if run.inp.stored_trunk:          # nothing here needs the audio (train/features.py): one view, the stored one
        clean, lengths = batch_inputs(batch)
        return _Views(clean.to(device), lengths.to(device), clean.to(device), lengths.to(device))
    clean, lengths = crop_batch(list(batch["audio"]), int(cfg.audio.train_crop_s * cfg.audio.sample_rate), rng)
    max_shift = int(t.max_shift_s * cfg.audio.sample_rate)
    view, view_len = clean, lengths
    consistency = mode.consistency and t.consistency_weight > 0     # off by default: no strong view, no extra pass
    own_anchor_pass = not (consistency and t.anchor_view == "strong")
    if t.augment and own_anchor_pass:
        view, view_len = augment(clean, lengths, gen, t.noise_snr_db, t.gain_db, max_shift, t.speed_range)
    strong = strong_len = None
    if consistency:
        strong, strong_len = strong_augment(clean, lengths, gen, cfg.audio.sample_rate, max_shift=max_shift)
        if t.anchor_view == "strong":
            view, view_len = strong, strong_len
        strong, strong_len = strong.to(device), strong_len.to(device)
    return _Views(clean.to(device), lengths.to(device), view.to(device), view_len.to(device), strong, strong_len,
                  consistency, own_anchor_pass)


def _step(run: _Run, batch: dict, rng, gen, online_fusion: bool) -> dict:
    """One optimiser step; returns the loss terms for the epoch's averages."""
    mode, t, device = run.inp.mode, run.inp.cfg.train, run.device
    v = _views(run, batch, rng, gen)
    terms = {}
    q = torch.tensor(np.asarray(batch["q"]), dtype=torch.float32, device=device)
    c = torch.tensor(np.asarray(batch["clip_weight"]), dtype=torch.float32, device=device)
    ema_probs = None            # the EMA teacher's clean-view prediction, when re-fusion has made it
    if online_fusion:
        q, c, lalm_weight, ema_probs = online_fused_q(run, v.clean, v.lengths, batch)
        terms["weight_lalm"] = float(lalm_weight.mean())
    # mixup only where the label term has a forward pass of its own (with anchor_view "strong" the
    # consistency term reuses it and must see unmixed clips)
    if t.mixup_alpha > 0 and mode.mixup and v.own_anchor_pass:
        v.view, v.view_len, q, c = mixup(v.view, v.view_len, q, c, t.mixup_alpha, rng)
    need_frames = t.cka_weight > 0
    with _autocast(run):
        out = run.model(v.view, v.view_len, return_frames=need_frames)
    logits, s_frames, s_mask = out if need_frames else (out, None, None)
    probs = torch.softmax(logits.float(), -1)
    if mode.loss == "information_max":
        anchor = loss = information_maximization(logits)
    else:
        anchor = soft_label_gce(q, logits, c, t.gce_k) if t.label_loss == "gce" else soft_label_kl(q, logits, c)
        loss = anchor + t.lambda_div * diversity_kl(probs, torch.tensor(run.inp.prior, device=device))
    terms["anchor"], terms["div"] = float(anchor.detach()), float((loss - anchor).detach())
    extra, reported = _teacher_terms(run, v, logits, s_frames, s_mask, ema_probs)
    loss = loss + extra
    terms.update(reported)
    _optimise(run, loss)
    terms["loss"] = float(loss.detach())
    terms["agreement"] = float((probs.argmax(1) == torch.nan_to_num(q).argmax(1)).float().mean())
    return terms


def _autocast(run: _Run):
    """bf16 autocast on a GPU with ``train.amp``; a no-op elsewhere."""
    device = run.device
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.inp.cfg.train.amp and device.type == "cuda")


def _teacher_terms(run: _Run, v: _Views, logits, s_frames, s_mask, ema_probs) -> tuple[Any, dict]:
    """The terms that follow a teacher model: consistency with the EMA teacher and the distillation
    terms. Returns (their weighted sum for the loss, what the epoch's averages report)."""
    t = run.inp.cfg.train
    loss, reported = 0.0, {}
    if v.consistency:
        strong_logits = logits
        if t.anchor_view != "strong":
            with _autocast(run), running_statistics_kept(run.student):
                strong_logits = run.model(v.strong, v.strong_len)
        cons, kept = consistency_term(run, v.clean, v.lengths, strong_logits, ema_probs)
        loss = loss + t.consistency_weight * cons
        reported["consistency"], reported["consistency_kept"] = float(cons.detach()), kept
    if run.distill_teacher is not None:
        with torch.no_grad(), _autocast(run):
            t_logits, t_frames, t_mask = run.distill_teacher(v.view, v.view_len, return_frames=True)
        for name, term in distill_terms(logits, s_frames, s_mask, t_logits, t_frames, t_mask, t.distill_kl_weight,
                                        t.distill_temperature, t.cka_weight).items():
            loss = loss + term
            reported[name] = float(term.detach())
    return loss, reported


def _optimise(run: _Run, loss) -> None:
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.params, run.inp.cfg.train.grad_clip)
    run.opt.step()
    run.sched.step()
    if run.ema is not None:
        run.ema.update(run.student, run.step)
    run.step += 1


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
    metrics["select_score"] = float(epoch) if run.inp.cfg.train.final_model == "final" else \
        (metrics["smoothed_dev_uar"] if metrics["smoothed_dev_uar"] is not None else -1.0)
    metrics["weights_rank_spread"] = weights_rank_spread(run.student)
    metrics["process_group_size"] = process_group_size()
    if run.writer is not None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                run.writer.add_scalar(k, float(v), epoch)
        run.writer.flush()
    run.history.append(metrics)
    if run.rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, run, epoch)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def _optional_shard(name: str):
    import ray.train
    try:
        return ray.train.get_dataset_shard(name)
    except (KeyError, ValueError):
        return None


def _dev_uar(model, run: _Run) -> float | None:
    if run.dev_shard is None:
        return None
    return uar_from_confusion(evaluate_shard(run.fed(model), run.dev_shard, run.device, run.student.num_classes))
