"""Batch inference with Ray Data: any checkpoint (source, student, EMA) over decoded clips."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .config import MiFuseConfig
from .models.base import read_meta
from .source_teacher import SourceTeacherStage


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
        return out.drop(columns=["source_det", "source_probs", "source_votes", "embedding", "audio"], errors="ignore")


def predict_decoded(ds, model_dir: str, cfg: MiFuseConfig) -> pd.DataFrame:
    """Predictions (label, distribution, confidence) for a Ray Dataset of decoded clips."""
    import ray.data
    out = ds.map_batches(PredictorStage, batch_format="pandas", batch_size=cfg.source.batch_size,
                         fn_constructor_kwargs=dict(checkpoint=model_dir, passes_per_clip=0, amp=cfg.source.amp),
                         compute=ray.data.ActorPoolStrategy(size=cfg.source.num_actors),
                         num_cpus=cfg.source.actor_cpus, num_gpus=cfg.source.num_gpus or None)
    frames = list(out.iter_batches(batch_format="pandas", batch_size=None))
    return pd.concat(frames, ignore_index=True).sort_values("clip_id").reset_index(drop=True) if frames else pd.DataFrame()


def predict_files(target: str | pd.DataFrame, model_dir: str, cfg: MiFuseConfig,
                  split: str | None = None) -> pd.DataFrame:
    """``target``: a manifest, folder or URI, or a manifest DataFrame a caller has already listed."""
    from .audio import list_inputs
    from .data import read_decoded
    read_meta(model_dir)  # fail early and clearly on a wrong path
    manifest = target if isinstance(target, pd.DataFrame) else list_inputs(target, split=split)
    return predict_decoded(read_decoded(manifest, cfg.audio), model_dir, cfg)
