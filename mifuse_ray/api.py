"""The Python API for notebooks: the calls the jobs make, from one import.

    from mifuse_ray.api import MiFuseConfig, adapt
    result = adapt(MiFuseConfig(output="outputs/notebook"))

or its stages, as ``adapt`` runs them: ``prepare`` → ``label_run`` → ``choose_split_fusion`` →
``train_students`` (``mifuse_ray/pipeline.py``).
"""
from __future__ import annotations

import pandas as pd

from .config import MiFuseConfig
from .inputs import Inputs, prepare, resolve_inputs
from .pipeline import (AdaptResult, adapt, choose_split_fusion, label_run, label_splits, lalm_endpoint,
                       student_runs, train_students)
from .ray_utils import init_ray

__all__ = ["AdaptResult", "Inputs", "MiFuseConfig", "adapt", "choose_split_fusion", "label_run", "label_splits",
           "lalm_endpoint", "predict", "prepare", "resolve_inputs", "student_runs", "train_students"]


def predict(cfg: MiFuseConfig, target: str | pd.DataFrame, model_dir: str, split: str | None = None) -> pd.DataFrame:
    from .predict import predict_files
    init_ray(cfg.ray_address)
    return predict_files(target, model_dir, cfg, split)


