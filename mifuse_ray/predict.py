"""Batch inference with Ray Data: any checkpoint (source, student, EMA) over decoded clips."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .config import MiFuseConfig
from .models.base import TRUNK_FEATURES, read_meta
from .source_teacher import SourceTeacherStage


PREDICTION_COLUMNS = ("clip_id", "error", "probs", "pred", "confidence")   # what a prediction row has


class PredictorStage(SourceTeacherStage):
    """Each clip's label, distribution and confidence from one checkpoint: a Ray Data stage, and a plain
    callable on a pandas batch of decoded clips (``clip_id``, ``audio``, ``error``) where no Ray is wanted."""

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return self.prediction_rows(self.with_trunk_output(batch))

    def with_trunk_output(self, batch: pd.DataFrame) -> pd.DataFrame:
        """The source stage's row: the deterministic distribution, and the trunk's output where the model stores it."""
        return super().__call__(batch)

    def on_trunk_output(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Predictions from rows that already carry this model's trunk output (``TRUNK_FEATURES``, from
        ``with_trunk_output`` of a model with the same trunk): the head alone, no audio."""
        ok = [v is not None for v in rows[TRUNK_FEATURES]]
        dists = [None] * len(rows)
        if any(ok):
            pooled = torch.tensor(np.stack([v for v, good in zip(rows[TRUNK_FEATURES], ok) if good]), dtype=torch.float32)
            with torch.no_grad():
                logits = self.model.head(self.model.features_from_pooled(pooled.to(self.device)))
            got = iter(torch.softmax(logits.float(), -1).cpu().numpy().tolist())
            dists = [next(got) if good else None for good in ok]
        return self.prediction_rows(rows.assign(source_det=dists))

    def prediction_rows(self, out: pd.DataFrame) -> pd.DataFrame:
        labels = self.model.labels
        probs = [np.asarray(p) if p is not None else None for p in out["source_det"]]
        out = out.copy()
        out["probs"] = [p.tolist() if p is not None else None for p in probs]
        out["pred"] = [labels[int(p.argmax())] if p is not None else None for p in probs]
        out["confidence"] = [float(p.max()) if p is not None else np.nan for p in probs]
        return out.drop(columns=["source_det", "source_probs", "source_votes", "embedding", TRUNK_FEATURES,
                                 "audio"], errors="ignore")


def trunk_state(model) -> dict:
    """The model's parameters and buffers outside its head layers: what decides its trunk's output."""
    head = {id(t) for layer in model.head_layers() for t in (*layer.parameters(), *layer.buffers())}
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) not in head}


_CONFIG_RECORDS = {"transformers_version", "architectures", "dtype", "torch_dtype"}   # written on save, not used in compute


def _architecture(model):
    """What besides the weights shapes the model's output (a CNN's settings; a transformers model's config,
    less where it was loaded from)."""
    try:
        return model.arch_config()
    except NotImplementedError:
        config = getattr(getattr(model, "model", None), "config", None)
        if config is None:
            return None
        return {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _CONFIG_RECORDS}


def same_trunk(a, b) -> bool:
    """Whether two models compute the same trunk output: same architecture, trunk weights equal."""
    if not (a.stores_trunk and b.stores_trunk) or type(a) is not type(b) or _architecture(a) != _architecture(b):
        return False
    sa, sb = trunk_state(a), trunk_state(b)
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def trunk_groups(models: dict) -> list[list[str]]:
    """Model names grouped by identical trunk, the first of each group the one whose trunk runs."""
    groups: list[list[str]] = []
    for name, model in models.items():
        home = next((g for g in groups if same_trunk(models[g[0]], model)), None)
        if home is None:
            groups.append([name])
        else:
            home.append(name)
    return groups


class ModelsStage:
    """Several checkpoints over each batch in one actor, one row per (clip, model) with the model's name
    in ``model``. Why: an actor pool costs seconds to start (a process, torch, the checkpoint), so a run
    that scores its source model, each student and each EMA on the test split does it in one pass over
    the audio and one pool rather than one per model. Models with the same trunk (every head-only
    student, its EMA and the source model it started from) share one trunk pass: with a Whisper
    encoder the trunk is nearly all of the cost (3 models took ~200 s on 1,000 clips). ``stored_trunk_of``:
    the checkpoint whose trunk output the rows already carry (``TRUNK_FEATURES``, stored while labelling);
    the models with that trunk run their heads on it and no trunk pass at all."""

    def __init__(self, checkpoints: dict[str, str], amp: bool = False, stored_trunk_of: str | None = None):
        self.stages = {name: PredictorStage(checkpoint=path, passes_per_clip=0, amp=amp)
                       for name, path in checkpoints.items()}
        self.groups = trunk_groups({name: stage.model for name, stage in self.stages.items()})
        self.on_stored: list[str] = []
        if stored_trunk_of is not None:
            reference = next((stage.model for name, stage in self.stages.items()
                              if checkpoints[name] == stored_trunk_of), None)
            if reference is None:
                reference = PredictorStage(checkpoint=stored_trunk_of, passes_per_clip=0).model
            self.on_stored = next((g for g in self.groups if same_trunk(reference, self.stages[g[0]].model)), [])

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = []
        stored = TRUNK_FEATURES in batch and all(v is not None for v in batch[TRUNK_FEATURES])
        for first, *rest in self.groups:
            if stored and first in self.on_stored:
                out += [self.stages[name].on_trunk_output(batch).assign(model=name) for name in (first, *rest)]
                continue
            rows = self.stages[first].with_trunk_output(batch.drop(columns=[TRUNK_FEATURES], errors="ignore"))
            out.append(self.stages[first].prediction_rows(rows).assign(model=first))
            out += [self.stages[name].on_trunk_output(rows).assign(model=name) for name in rest]
        return pd.concat(out, ignore_index=True)


def predict_models(ds, model_dirs: dict[str, str], cfg: MiFuseConfig, models_per_pass: int = 8,
                   stored_trunk_of: str | None = None) -> dict[str, pd.DataFrame]:
    """Each model's predictions (label, distribution, confidence; sorted by clip) for a Ray Dataset of
    decoded clips. Up to ``models_per_pass`` models share a pass (``ModelsStage``); an actor holds every
    model of its pass, so the group size bounds its memory when checkpoints are large. ``stored_trunk_of``:
    the checkpoint whose trunk output the clips' rows carry (``ModelsStage``)."""
    import ray.data
    names = list(model_dirs)
    out: dict[str, pd.DataFrame] = {}
    for start in range(0, len(names), models_per_pass):
        group = {name: model_dirs[name] for name in names[start:start + models_per_pass]}
        rows = ds.map_batches(ModelsStage, batch_format="pandas", batch_size=cfg.source.batch_size,
                              fn_constructor_kwargs=dict(checkpoints=group, amp=cfg.source.amp,
                                                         stored_trunk_of=stored_trunk_of),
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
