"""Ray Tune over N, K, α, τ, λ_div and the head's learning rate, with ASHA; every trial is a Ray Train run.

The LALM is asked once, for the largest N in the search space; every trial re-fuses the
stored draws with its own first N answers and K passes, so a search never pays twice.
"""
from __future__ import annotations

import copy
import json
import os

from .config import ConfigError, MiFuseConfig, apply_overrides

DEFAULT_SPACE = {
    "fusion.lalm_answers_used": ("choice", [1, 3, 5]),
    "fusion.source_passes_used": ("choice", [1, 5, 10]),
    "train.ema_decay": ("choice", [0.99, 0.995, 0.999]),
    "fusion.tau": ("loguniform", [0.1, 2.0]),
    "train.lambda_div": ("uniform", [0.0, 2.0]),
    "train.head_lr": ("loguniform", [3e-4, 3e-3]),     # what a head-only student (the default) learns at
}


def to_tune_space(space: dict) -> dict:
    """YAML-friendly {name: (kind, args)} → Ray Tune domains, same dotted names as the config."""
    from ray import tune
    kinds = {"choice": lambda a: tune.choice(a), "uniform": lambda a: tune.uniform(*a),
             "loguniform": lambda a: tune.loguniform(*a), "grid": lambda a: tune.grid_search(a)}
    out = {}
    for name, spec in space.items():
        kind, args = spec if isinstance(spec, (list, tuple)) else (spec["kind"], spec["values"])
        if kind not in kinds:
            raise ConfigError(f"search space {name}: kind must be one of {sorted(kinds)}")
        out[name] = kinds[kind](list(args))
    return out


def largest_answers(space: dict, key: str, default: int) -> int:
    spec = space.get(key)
    if spec is None:
        return default
    values = spec[1] if isinstance(spec, (list, tuple)) else spec["values"]
    return int(max(values))


def _trial(trial_config: dict, base: MiFuseConfig, labels_table, dev_df, source_checkpoint: str, out_dir: str,
           metric: str) -> None:
    import ray.tune
    from .train import student as student_mod
    cfg = apply_overrides(copy.deepcopy(base), trial_config)
    name = f"trial_{ray.tune.get_context().get_trial_id()}"
    student_mod.train_student(cfg, labels_table, dev_df, source_checkpoint, out_dir, run_name=name,
                              report_to_tune=True)


def run_tune(cfg: MiFuseConfig, labels_table, dev_df, source_checkpoint: str, out_dir: str, space: dict | None = None,
             num_samples: int = 8, search_alg: str = "random", max_concurrent: int = 2, grace_epochs: int = 2):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    space = space or DEFAULT_SPACE
    has_dev = dev_df is not None and len(dev_df) > 0
    metric = "final_dev_uar" if has_dev else "train_agreement"
    if search_alg == "random":
        searcher = None
    elif search_alg == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise ConfigError("search_alg 'optuna' needs `pip install optuna`") from None
        searcher = OptunaSearch()
    else:
        raise ConfigError("search_alg must be 'random' or 'optuna'")
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=cfg, labels_table=labels_table, dev_df=dev_df,
                             source_checkpoint=source_checkpoint, out_dir=out_dir, metric=metric),
        {"CPU": 0.1})
    tuner = tune.Tuner(
        trainable, param_space=to_tune_space(space),
        tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=num_samples, search_alg=searcher,
                                    scheduler=ASHAScheduler(max_t=cfg.train.epochs,
                                                            grace_period=min(grace_epochs, cfg.train.epochs)),
                                    max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(storage_path=os.path.abspath(os.path.join(out_dir, "_ray_tune")), name="search"))
    results = tuner.fit()
    df = results.get_dataframe()
    keep = [c for c in df.columns if c.startswith("config/") or c in (metric, "dev_uar", "ema_dev_uar", "epoch",
                                                                       "trial_id", "train_agreement")]
    table = df[keep].sort_values(metric, ascending=False)
    table.to_csv(os.path.join(out_dir, "tune_results.csv"), index=False)
    best = results.get_best_result(metric=metric, mode="max")
    with open(os.path.join(out_dir, "best_config.json"), "w") as fh:
        json.dump({"metric": metric, "value": best.metrics.get(metric), "config": best.config}, fh, indent=2)
    return table, best
