"""Batch inference with Ray Data: any checkpoint (source, student, EMA) over decoded clips."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .config import MiFuseConfig
from .models.base import TRUNK_FEATURES, read_meta
from .source_teacher import SourceTeacherStage


PREDICTION_COLUMNS = ("clip_id", "error", "probs", "pred", "confidence")   # what a prediction row has


class PredictorStage(SourceTeacherStage):
    """Each clip's label, distribution and confidence from one checkpoint: a Ray Data stage, and a plain
    callable on a pandas batch of decoded clips (``clip_id``, ``audio``, ``error``) where no Ray is wanted."""

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = super().__call__(batch)
        labels = self.model.labels
        probs = [np.asarray(p) if p is not None else None for p in out["source_det"]]
        out["probs"] = [p.tolist() if p is not None else None for p in probs]
        out["pred"] = [labels[int(p.argmax())] if p is not None else None for p in probs]
        out["confidence"] = [float(p.max()) if p is not None else np.nan for p in probs]
        return out.drop(columns=["source_det", "source_probs", "source_votes", "embedding", TRUNK_FEATURES,
                                 "audio"], errors="ignore")


class ModelsStage:
    """Several checkpoints over each batch in one actor, one row per (clip, model) with the model's name
    in ``model``. Why: an actor pool costs seconds to start (a process, torch, the checkpoint), so a run
    that scores its source model, each student and each EMA on the test split does it in one pass over
    the audio and one pool rather than one per model."""

    def __init__(self, checkpoints: dict[str, str], amp: bool = False):
        self.stages = {name: PredictorStage(checkpoint=path, passes_per_clip=0, amp=amp)
                       for name, path in checkpoints.items()}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return pd.concat([stage(batch).assign(model=name) for name, stage in self.stages.items()], ignore_index=True)


def predict_models(ds, model_dirs: dict[str, str], cfg: MiFuseConfig, models_per_pass: int = 8) -> dict[str, pd.DataFrame]:
    """Each model's predictions (label, distribution, confidence; sorted by clip) for a Ray Dataset of
    decoded clips. Up to ``models_per_pass`` models share a pass (``ModelsStage``); an actor holds every
    model of its pass, so the group size bounds its memory when checkpoints are large."""
    import ray.data
    names = list(model_dirs)
    out: dict[str, pd.DataFrame] = {}
    for start in range(0, len(names), models_per_pass):
        group = {name: model_dirs[name] for name in names[start:start + models_per_pass]}
        rows = ds.map_batches(ModelsStage, batch_format="pandas", batch_size=cfg.source.batch_size,
                              fn_constructor_kwargs=dict(checkpoints=group, amp=cfg.source.amp),
                              compute=ray.data.ActorPoolStrategy(size=cfg.source.num_actors),
                              num_cpus=cfg.source.actor_cpus, num_gpus=cfg.source.num_gpus or None)
        frames = list(rows.iter_batches(batch_format="pandas", batch_size=None))
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["model", *PREDICTION_COLUMNS])
        for name in group:
            one = table[table["model"] == name].drop(columns="model")
            out[name] = one.sort_values("clip_id").reset_index(drop=True)
    return out


def predict_decoded(ds, model_dir: str, cfg: MiFuseConfig) -> pd.DataFrame:
    """Predictions (label, distribution, confidence) of one model for a Ray Dataset of decoded clips."""
    return predict_models(ds, {"model": model_dir}, cfg)["model"]


def predict_files(target: str | pd.DataFrame, model_dir: str, cfg: MiFuseConfig,
                  split: str | None = None) -> pd.DataFrame:
    """``target``: a manifest, folder or URI, or a manifest DataFrame a caller has already listed."""
    from .audio import list_inputs
    from .data import read_decoded
    read_meta(model_dir)  # fail early and clearly on a wrong path
    manifest = target if isinstance(target, pd.DataFrame) else list_inputs(target, split=split)
    return predict_decoded(read_decoded(manifest, cfg.audio), model_dir, cfg)
