"""Training the source classifier with Ray Train (what a user with a source corpus runs once)."""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..audio import list_inputs
from ..config import MiFuseConfig
from ..metrics import confusion_matrix, uar_from_confusion, wa_from_confusion
from .common import (all_reduce_sum, augment, batch_inputs, crop_batch, device_for_worker, evaluate_shard,
                     lr_schedule)


def _report_epoch(metrics: dict, best: float, rank: int, core, trained_on: str) -> float:
    """Report an epoch to Ray Train, with a checkpoint from rank 0 where dev UAR improved; the new best."""
    import ray.train
    if rank == 0 and metrics["dev_uar"] > best:
        with tempfile.TemporaryDirectory() as tmp:
            core.save(tmp, {"trained_on": trained_on, "dev_uar": metrics["dev_uar"]})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)
    return max(best, metrics["dev_uar"])


def _source_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ..models.cnn import LogMelCNN

    torch.manual_seed(config["seed"])
    rank = ray.train.get_context().get_world_rank()
    rng = np.random.default_rng([config["seed"], rank])
    gen = torch.Generator().manual_seed(config["seed"] * 1000 + rank)
    device = device_for_worker()
    model = LogMelCNN(labels=config["labels"], sample_rate=config["sample_rate"])
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    train_shard = ray.train.get_dataset_shard("train")
    dev_shard = ray.train.get_dataset_shard("dev")
    steps_per_epoch = max(1, config["n_train"] // (config["batch_size"] * config["world_size"]))
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    sched = lr_schedule(opt, steps_per_epoch * config["epochs"], 0.1)
    best = -1.0
    for epoch in range(config["epochs"]):
        model.train()
        losses = []
        for batch in train_shard.iter_batches(batch_size=config["batch_size"], batch_format="numpy",
                                              local_shuffle_buffer_size=256, local_shuffle_seed=epoch):
            wav, lengths = crop_batch(list(batch["audio"]), config["crop_len"], rng)
            wav, lengths = augment(wav, lengths, gen, noise_snr_db=(20.0, 40.0), gain_db=3.0,
                                   max_shift=config["sample_rate"] // 10)
            y = torch.tensor(np.asarray(batch["label_index"]), dtype=torch.long, device=device)
            loss = F.cross_entropy(model(wav.to(device), lengths.to(device)), y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        cm = evaluate_shard(core, dev_shard, device, core.num_classes)
        metrics = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                   "dev_uar": uar_from_confusion(cm), "dev_wa": wa_from_confusion(cm)}
        best = _report_epoch(metrics, best, rank, core, config["trained_on"])


@torch.no_grad()
def _pooled_rows(model, shard, device, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's clips as the frozen trunk's pooled output (N, D) and their label indices (N,)."""
    xs, ys = [], []
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        x, lengths = batch_inputs(batch)
        xs.append(model.pooled(model.trunk(x.to(device), lengths.to(device))).cpu())
        ys.append(torch.as_tensor(np.asarray(batch["label_index"]), dtype=torch.long))
    return (torch.cat(xs), torch.cat(ys)) if xs else (torch.zeros(0, 1), torch.zeros(0, dtype=torch.long))


def _frozen_encoder_loop(config: dict) -> None:
    """A head on a frozen pretrained encoder: the encoder runs once per clip (no augmentation: it
    would need the encoder again every epoch), then the head learns on the held vectors."""
    import ray.train
    import ray.train.torch
    from ..models.base import OnStoredTrunk
    from ..models.whisper import convert

    rank = ray.train.get_context().get_world_rank()
    device = device_for_worker()
    core = convert(config["encoder"], config["labels"], seed=config["seed"]).to(device).requires_grad_(False)
    x_train, y_train = _pooled_rows(core, ray.train.get_dataset_shard("train"), device)
    x_dev, y_dev = _pooled_rows(core, ray.train.get_dataset_shard("dev"), device)
    for layer in core.head_layers():
        layer.requires_grad_(True)
    fed = ray.train.torch.prepare_model(OnStoredTrunk(core))
    opt = torch.optim.AdamW([p for p in fed.parameters() if p.requires_grad], lr=config["lr"],
                            weight_decay=config["weight_decay"])
    gen = torch.Generator().manual_seed(config["seed"] * 1000 + rank)
    best = -1.0
    for epoch in range(config["epochs"]):
        fed.train()
        losses = []
        for rows in torch.randperm(len(x_train), generator=gen).split(config["batch_size"]):
            loss = F.cross_entropy(fed(x_train[rows].to(device)), y_train[rows].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        fed.eval()
        with torch.no_grad():
            pred = fed(x_dev.to(device)).argmax(1).cpu().numpy() if len(x_dev) else np.zeros(0, int)
        cm = all_reduce_sum(confusion_matrix(y_dev.numpy(), pred, core.num_classes).astype(np.float64))
        metrics = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                   "dev_uar": uar_from_confusion(cm), "dev_wa": wa_from_confusion(cm)}
        best = _report_epoch(metrics, best, rank, core, config["trained_on"])


def labelled_split(manifest: str, split: str, labels) -> pd.DataFrame:
    df = list_inputs(manifest, split=split)
    df = df[df["label"].notna()].reset_index(drop=True)
    unknown = sorted(set(df["label"]) - set(labels))
    if unknown:
        raise ValueError(f"{manifest} split {split!r} has labels {unknown} not in the label set {list(labels)}")
    df["label_index"] = [list(labels).index(label) for label in df["label"]]
    return df


def train_source(cfg: MiFuseConfig, manifest: str, out_dir: str, eval_splits=("test",)) -> dict:
    """Train on the manifest's ``train`` split, select on ``dev``, write the checkpoint to out_dir."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ..data import ordered_ingest, training_clips

    st = cfg.source_train
    start = time.time()
    train_df = labelled_split(manifest, "train", cfg.labels)
    dev_df = labelled_split(manifest, "dev", cfg.labels)
    if train_df.empty or dev_df.empty:
        raise ValueError(f"{manifest} needs labelled 'train' and 'dev' splits to train a source model")
    datasets = {"train": training_clips(train_df, cfg.audio), "dev": training_clips(dev_df, cfg.audio)}
    loop_cfg = dict(labels=list(cfg.labels), sample_rate=cfg.audio.sample_rate, seed=st.seed, lr=st.lr,
                    weight_decay=st.weight_decay, epochs=st.epochs, batch_size=st.batch_size,
                    crop_len=int(cfg.audio.train_crop_s * cfg.audio.sample_rate), n_train=len(train_df),
                    world_size=st.num_workers, trained_on=os.path.abspath(manifest))
    storage = cfg.train.storage_path or os.path.abspath(os.path.join(out_dir, "_ray_train"))
    if st.encoder != "cnn":
        loop_cfg.update(encoder=st.encoder, epochs=st.head_epochs, lr=st.head_lr)
    trainer = TorchTrainer(
        _source_loop if st.encoder == "cnn" else _frozen_encoder_loop, train_loop_config=loop_cfg, datasets=datasets, dataset_config=ordered_ingest(),
        scaling_config=ray.train.ScalingConfig(num_workers=st.num_workers, use_gpu=st.use_gpu,
                                               resources_per_worker={"CPU": st.cpus_per_worker}),
        run_config=ray.train.RunConfig(storage_path=storage, name="source",
                                       checkpoint_config=ray.train.CheckpointConfig(
                                           num_to_keep=1, checkpoint_score_attribute="dev_uar",
                                           checkpoint_score_order="max")))
    result = trainer.fit()
    best = result.get_best_checkpoint(metric="dev_uar", mode="max") or result.checkpoint
    with best.as_directory() as ckpt_dir:
        model_dir = os.path.join(out_dir, "model")
        if os.path.exists(model_dir):
            shutil.rmtree(model_dir)
        shutil.copytree(ckpt_dir, model_dir)
    return {"train_seconds": time.time() - start, "checkpoint": model_dir,
            "best_dev_uar": max((m["dev_uar"] for _, m in result.best_checkpoints), default=None)}
