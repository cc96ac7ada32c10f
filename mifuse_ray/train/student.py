"""Student adaptation with Ray Train: soft-label KL + diversity, EMA teacher, online re-fusion.

Read top to bottom: ``_student_loop`` is what every DDP worker runs; ``train_student`` is the
driver that builds the datasets and the ``TorchTrainer`` and returns the chosen model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np
import pandas as pd
import torch

from ..config import MiFuseConfig
from ..fusion import fuse, teacher_stats
from ..labeling import fuse_draws, stored_draws
from ..metrics import uar_from_confusion
from .common import augment, crop_batch, device_for_worker, evaluate_shard, hash_seed, warmup_cosine
from .ema import EMATeacher, decay_from_half_life, ema_decay_at
from .distill import distill_terms
from .losses import diversity_kl, information_maximization, soft_label_kl


HISTORY_FILE = "history.json"


def _save_checkpoint(directory: str, student, ema: EMATeacher, opt, sched, step: int, epoch: int,
                     history: list[dict]) -> None:
    student.save(os.path.join(directory, "student"))
    ema.model.save(os.path.join(directory, "ema"))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "epoch": epoch},
               os.path.join(directory, "train_state.pt"))
    # Every epoch's metrics so far travel with the checkpoint: Ray Train's own metrics table only
    # holds the checkpoints it kept, ordered by score, and a resumed attempt starts it afresh.
    with open(os.path.join(directory, HISTORY_FILE), "w") as fh:
        json.dump(history, fh, default=float)


def _load_checkpoint(directory: str, student, ema: EMATeacher, opt, sched) -> tuple[int, int, list[dict]]:
    from ..models.base import load_model
    student.load_state_dict(load_model(os.path.join(directory, "student")).state_dict())
    ema.model.load_state_dict(load_model(os.path.join(directory, "ema")).state_dict())
    state = torch.load(os.path.join(directory, "train_state.pt"), weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(state["step"]), int(state["epoch"]), _read_history(directory)


def _read_history(directory: str) -> list[dict]:
    path = os.path.join(directory, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return json.load(fh)


def _ema_refused_q(ema_model, wav, lengths, clip_ids, batch, cfg: dict, step: int, device) -> tuple:
    """Re-fuse q with the EMA model as the auxiliary teacher (clean clip, K_EMA MC passes)."""
    from ..models.mc import hashed_uniform, mc_seeds
    from ..models.predict import mc_predict
    K = cfg["ema_mc_passes"]
    seeds = mc_seeds(cfg["seed"] + 7919 * step, clip_ids, K).to(device)
    out = mc_predict(ema_model, wav, lengths, seeds, scope=cfg["ema_mc_scope"], amp=cfg["amp"])
    u = hashed_uniform(seeds.reshape(-1), layer=-1, shape=(1,)).reshape(len(clip_ids), K)
    cdf = out.probs.cumsum(-1)
    cdf[..., -1] = float("inf")
    votes = (u.to(device)[..., None] >= cdf).sum(-1)
    C = out.probs.shape[-1]
    lalm = teacher_stats(torch.as_tensor(batch["lalm_votes"], device=device), C,
                         torch.as_tensor(batch["lalm_soft"], device=device))
    src = teacher_stats(votes, C, out.probs)
    f = cfg["fusion"]
    res = fuse([lalm, src], uncertainty=f["uncertainty"], weighting=f["weighting"], tau=f["tau"], eps=f["eps"],
               fixed_weights=f["fixed_weights"], sharpen_temperature=f["sharpen_temperature"],
               min_confidence=f["min_confidence"])
    return res.q, res.clip_weight, res.weights, src


def _student_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ..models.base import load_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])
    device = device_for_worker()
    mode = config["mode"]

    student = load_model(config["source_checkpoint"])
    if config["lora_rank"] > 0:
        from ..models.lora import apply_lora, trainable_fraction
        student = apply_lora(student, config["source_checkpoint"], config["lora_rank"], config["lora_alpha"],
                             config["lora_target_modules"], config["lora_dropout"])
        trainable, total = trainable_fraction(student)
        if rank == 0:
            print(f"LoRA student: {trainable:,} of {total:,} parameters trainable ({trainable / total:.2%})")
    student = student.to(device)
    steps_per_epoch = max(1, config["n_train"] // (config["batch_size"] * world))
    alpha = decay_from_half_life(config["ema_half_life_epochs"], steps_per_epoch) \
        if config["ema_half_life_epochs"] > 0 else config["ema_decay"]
    ema = EMATeacher(student, alpha)
    if mode == "shot_im":  # SHOT keeps the source hypothesis (the classifier layer) fixed
        head = student.head_module()
        last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
        for p in last.parameters():
            p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])
    sched = warmup_cosine(opt, steps_per_epoch * config["epochs"], config["warmup_frac"])
    step, start_epoch, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            step, last_epoch, history = _load_checkpoint(d, student, ema, opt, sched)
        start_epoch = last_epoch + 1
    ema.model.to(device)
    need_frames = config["cka_weight"] > 0
    distilling = config["distill_kl_weight"] > 0 or need_frames
    distill_teacher = None
    if distilling:
        distill_teacher = ema.model if config["distill_teacher"] == "ema" else \
            load_model(config["source_checkpoint"]).to(device).eval().requires_grad_(False)
    model = ray.train.torch.prepare_model(student)
    use_amp = config["amp"] and device.type == "cuda"
    prior = torch.tensor(config["prior"], dtype=torch.float32, device=device)
    writer = None
    if rank == 0 and config.get("tensorboard_dir"):
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(config["tensorboard_dir"])

    train_shard = ray.train.get_dataset_shard("train")
    dev_shard = ray.train.get_dataset_shard("dev")
    crop = config["crop_len"]
    for epoch in range(start_epoch, config["epochs"]):
        # Random streams seeded per (seed, rank, epoch): a run resumed from a checkpoint draws the same
        # crops, augmentations and dropout masks in its remaining epochs as an uninterrupted run.
        torch.manual_seed(hash_seed(config["seed"], rank, epoch))
        rng = np.random.default_rng([config["seed"], rank, epoch])
        gen = torch.Generator().manual_seed(hash_seed(config["seed"], rank, epoch, 1))
        model.train()
        student.apply(lambda m: m.eval() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and
                      config["freeze_bn"] else None)
        refuse = mode == "mifuse" and epoch >= config["refuse_from_epoch"]
        sums = {"loss": 0.0, "kl": 0.0, "div": 0.0, "weight_lalm": 0.0, "ema_mi": 0.0, "agreement": 0.0, "n": 0}
        for batch in train_shard.iter_batches(batch_size=config["batch_size"], batch_format="numpy",
                                              local_shuffle_buffer_size=512, local_shuffle_seed=epoch * 31 + rank,
                                              drop_last=world > 1):
            wav, lengths = crop_batch(list(batch["audio"]), crop, rng)
            clean_wav, clean_len = wav.to(device), lengths.to(device)
            if config["augment"]:
                wav, lengths = augment(wav, lengths, gen, config["noise_snr_db"], config["gain_db"],
                                       config["max_shift"], config["speed_range"])
            q = torch.tensor(np.asarray(batch["q"]), dtype=torch.float32, device=device)
            c = torch.tensor(np.asarray(batch["clip_weight"]), dtype=torch.float32, device=device)
            if refuse:
                q, c, w, src = _ema_refused_q(ema.model, clean_wav, clean_len, list(batch["clip_id"]), batch,
                                              config, step, device)
                sums["weight_lalm"] += float(w[:, 0].mean())
                sums["ema_mi"] += float(torch.nan_to_num(src.mi).mean())
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = model(wav.to(device), lengths.to(device), return_frames=need_frames)
            logits, s_frames, s_mask = out if need_frames else (out, None, None)
            probs = torch.softmax(logits.float(), -1)
            if mode == "shot_im":
                kl = information_maximization(logits)
                loss = kl
            else:
                kl = soft_label_kl(q, logits, c)
                loss = kl + config["lambda_div"] * diversity_kl(probs, prior) if config["lambda_div"] > 0 else kl
            div = loss - kl
            if distilling:
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    t_logits, t_frames, t_mask = distill_teacher(wav.to(device), lengths.to(device), return_frames=True)
                terms = distill_terms(logits, s_frames, s_mask, t_logits, t_frames, t_mask,
                                      config["distill_kl_weight"], config["distill_temperature"], config["cka_weight"])
                for name, term in terms.items():
                    loss = loss + term
                    sums[name] = sums.get(name, 0.0) + float(term.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config["grad_clip"])
            opt.step()
            sched.step()
            ema.update(student, step)
            step += 1
            sums["loss"] += float(loss.detach())
            sums["kl"] += float(kl.detach())
            sums["div"] += float(div.detach())
            sums["agreement"] += float((probs.argmax(1) == torch.nan_to_num(q).argmax(1)).float().mean())
            sums["n"] += 1
            _maybe_inject_failure(config, epoch, sums["n"], rank, world)
        n = max(sums.pop("n"), 1)
        cm_student = evaluate_shard(student, dev_shard, device, student.num_classes)
        cm_ema = evaluate_shard(ema.model, dev_shard, device, student.num_classes)
        metrics = {"epoch": epoch, "step": step, **{f"train_{k}": v / n for k, v in sums.items()},
                   "dev_uar": uar_from_confusion(cm_student), "ema_dev_uar": uar_from_confusion(cm_ema),
                   # the decay the warm-up actually applied at the epoch's last step, not the configured α:
                   # on a short run α_t = (1+t)/(10+t) stays below α, and the logs should say so
                   "ema_alpha": ema_decay_at(max(step - 1, 0), alpha), "ema_alpha_configured": alpha,
                   "refusing": bool(refuse), "attempt_start_epoch": start_epoch}
        metrics["select_score"] = max(metrics["dev_uar"], metrics["ema_dev_uar"])
        metrics["weights_rank_spread"] = weights_rank_spread(student)
        if writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    writer.add_scalar(k, float(v), epoch)
            writer.flush()
        history.append(metrics)
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                _save_checkpoint(tmp, student, ema, opt, sched, step, epoch, history)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
    if writer is not None:
        writer.close()


def _maybe_inject_failure(config: dict, epoch: int, batches: int, rank: int, world: int) -> None:
    """Fault injection for tests: the last rank dies once, mid-epoch, after the given epoch's checkpoint."""
    marker = config.get("fail_marker")
    if (config.get("fail_at_epoch") is None or epoch != config["fail_at_epoch"] + 1 or batches != 2
            or rank != world - 1 or not marker or os.path.exists(marker)):
        return
    _wait_until_reports_are_collected()
    with open(marker, "w") as fh:
        fh.write(f"killed at epoch {epoch}, batch {batches}\n")
    os._exit(1)


def _wait_until_reports_are_collected(timeout_s: float = 30.0) -> None:
    """Ray Train's controller collects a worker's reports every couple of seconds; a worker that dies
    before that loses its last checkpoint report, and the run restarts from the one before. A real
    failure comes long after the report; the injected one waits for the queue to drain, so the test
    proves a resume from the checkpoint it just wrote."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context
        queue = get_train_context().get_result_queue()
    except (ImportError, AttributeError):       # another Ray Train version: give the controller time
        time.sleep(5.0)
        return
    deadline = time.time() + timeout_s
    while not queue.empty() and time.time() < deadline:
        time.sleep(0.2)


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
def training_table(labels_table: pd.DataFrame, cfg: MiFuseConfig) -> pd.DataFrame:
    """Rows the student learns from, with q re-fused for this run's N, K, τ, mode."""
    C = len(cfg.labels)
    ok = labels_table[labels_table["error"].isna()].reset_index(drop=True)
    draws = stored_draws(ok, C, cfg.fusion.lalm_answers, cfg.fusion.source_passes)
    mode = cfg.train.mode if cfg.train.mode in ("lalm_only", "source_only", "equal_weights") else "mifuse"
    _, _, res = fuse_draws(draws, C, cfg.fusion, mode=mode)
    q = np.asarray(res.q, dtype=np.float32)
    valid = np.isfinite(q).all(1)
    keep = [c for c in ("clip_id", "path", "offset_s", "segment_s", "parent_id") if c in ok.columns]
    table = ok.loc[valid, keep].copy()
    table["q"] = list(q[valid])
    table["clip_weight"] = np.asarray(res.clip_weight, dtype=np.float32)[valid]
    table["lalm_votes"] = list(draws["lalm_votes"][valid])
    table["lalm_soft"] = list(draws["lalm_soft"][valid])
    table["error"] = None
    return table.reset_index(drop=True)


def class_prior(cfg: MiFuseConfig, table: pd.DataFrame) -> list[float]:
    C = len(cfg.labels)
    if cfg.train.prior == "q_mean":
        return np.stack(table["q"]).mean(0).tolist()
    return [1.0 / C] * C


@dataclasses.dataclass
class StudentResult:
    model_dir: str              # the chosen model (student or EMA at the best epoch)
    chosen: str                 # "student" | "ema"
    student_dir: str
    ema_dir: str
    best_metrics: dict
    history: list[dict]
    seconds: float


def train_student(cfg: MiFuseConfig, labels_table: pd.DataFrame, dev_df: pd.DataFrame, source_checkpoint: str,
                  out_dir: str, run_name: str = "student", fail_at_epoch: int | None = None,
                  report_to_tune: bool = False) -> StudentResult:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ..data import decoded_clips, ordered_ingest

    start = time.time()
    t = cfg.train
    table = training_table(labels_table, cfg)
    if table.empty:
        raise ValueError("no clip has a usable fused label: nothing to train the student on")
    datasets = {"train": decoded_clips(table, cfg.audio), "dev": decoded_clips(dev_df, cfg.audio)}
    loop_cfg = dict(
        mode=t.mode, seed=t.seed, lr=t.lr, weight_decay=t.weight_decay, warmup_frac=t.warmup_frac,
        grad_clip=t.grad_clip, lambda_div=t.lambda_div, prior=class_prior(cfg, table), epochs=t.epochs,
        batch_size=t.batch_size, ema_decay=t.ema_decay, ema_half_life_epochs=t.ema_half_life_epochs,
        refuse_from_epoch=t.refuse_from_epoch, ema_mc_passes=t.ema_mc_passes, ema_mc_scope=t.ema_mc_scope,
        amp=t.amp, augment=t.augment, distill_teacher=t.distill_teacher, distill_kl_weight=t.distill_kl_weight,
        distill_temperature=t.distill_temperature, cka_weight=t.cka_weight, lora_rank=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
        lora_target_modules=list(t.lora_target_modules), noise_snr_db=tuple(t.noise_snr_db), gain_db=t.gain_db,
        max_shift=int(t.max_shift_s * cfg.audio.sample_rate), speed_range=tuple(t.speed_range),
        crop_len=int(cfg.audio.train_crop_s * cfg.audio.sample_rate), n_train=len(table),
        source_checkpoint=os.path.abspath(source_checkpoint), fusion=dataclasses.asdict(cfg.fusion),
        tensorboard_dir=os.path.abspath(os.path.join(out_dir, "tensorboard", run_name)),
        fail_at_epoch=fail_at_epoch, freeze_bn=True,
        fail_marker=os.path.abspath(os.path.join(out_dir, f"{run_name}.injected_failure")) if fail_at_epoch is not None
        else None)
    final_dir = os.path.join(out_dir, "models", run_name)
    storage = os.path.abspath(os.path.join(out_dir, "_ray_train"))
    fingerprint = _fingerprint(loop_cfg, table)
    done = _finished_run(final_dir, fingerprint)
    if done is not None and not report_to_tune:
        return done
    if _stored_fingerprint(storage, run_name) not in (None, fingerprint):
        shutil.rmtree(os.path.join(storage, run_name), ignore_errors=True)   # other settings: start afresh
    _store_fingerprint(storage, run_name, fingerprint)
    # Same name and storage as an interrupted run: Ray Train restores its latest checkpoint.
    trainer = TorchTrainer(
        _student_loop, train_loop_config=loop_cfg, datasets=datasets, dataset_config=ordered_ingest(),
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker}),
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
    chosen = "ema" if best["ema_dev_uar"] > best["dev_uar"] else "student"
    with result.checkpoint.as_directory() as d:            # the latest checkpoint: every epoch's metrics
        history = _read_history(d)
    res = StudentResult(model_dir=os.path.join(final_dir, chosen), chosen=chosen,
                        student_dir=os.path.join(final_dir, "student"), ema_dir=os.path.join(final_dir, "ema"),
                        best_metrics=dict(best), history=history, seconds=time.time() - start)
    with open(os.path.join(final_dir, "result.json"), "w") as fh:
        json.dump({"fingerprint": fingerprint, "result": dataclasses.asdict(res)}, fh, default=str)
    return res


def _tune_callbacks() -> list:
    from ray.tune.integration.ray_train import TuneReportCallback
    return [TuneReportCallback()]


def _fingerprint(loop_cfg: dict, table: pd.DataFrame) -> str:
    cfg = {k: v for k, v in loop_cfg.items() if k not in ("tensorboard_dir", "fail_at_epoch", "fail_marker")}
    payload = json.dumps(cfg, sort_keys=True, default=str) + "".join(table["clip_id"])
    payload += str(np.round(np.stack(table["q"]), 5).tobytes())
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


def _fingerprint_path(storage: str, run_name: str) -> str:
    return os.path.join(storage, f"{run_name}.fingerprint")


def _stored_fingerprint(storage: str, run_name: str) -> str | None:
    path = _fingerprint_path(storage, run_name)
    return open(path).read() if os.path.exists(path) else None


def _store_fingerprint(storage: str, run_name: str, fingerprint: str) -> None:
    os.makedirs(storage, exist_ok=True)
    with open(_fingerprint_path(storage, run_name), "w") as fh:
        fh.write(fingerprint)
