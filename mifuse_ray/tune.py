"""Ray Tune over N, K, α, τ, λ_div and the head's learning rate, with ASHA; every trial is a Ray Train run.

The LALM is asked once, for the largest N in the search space (``searchable``), by the same
``pipeline.label_run`` as ``jobs/adapt.py``; each trial then fuses the stored draws at its own
settings with the dev-fitted fusion (``pipeline.choose_split_fusion``) and trains through
``pipeline.train_students``, so a trial trains exactly what ``jobs/adapt.py`` trains at that config,
and ``best_config.json`` is a config file: ``jobs/adapt.py --config best_config.json`` reruns it.
"""
from __future__ import annotations

import copy
import json
import os

from ray.tune import Callback

from .config import ConfigError, MiFuseConfig, to_dict
from .overrides import apply_overrides

DEFAULT_SPACE = {
    "fusion.lalm_answers_used": ("choice", [1, 3, 5]),
    "fusion.source_passes_used": ("choice", [1, 5, 10]),
    "train.ema_decay": ("choice", [0.99, 0.995, 0.999]),
    "fusion.tau": ("loguniform", [0.1, 2.0]),
    "train.lambda_div": ("uniform", [0.0, 2.0]),
    "train.head_lr": ("loguniform", [3e-4, 3e-3]),     # what a head-only student (the default) learns at
}
KINDS = ("choice", "uniform", "loguniform", "grid")


def _kind_and_values(name: str, spec) -> tuple[str, list]:
    kind, values = spec if isinstance(spec, (list, tuple)) else (spec["kind"], spec["values"])
    if kind not in KINDS:
        raise ConfigError(f"search space {name}: kind must be one of {', '.join(KINDS)}")
    return kind, list(values)


def to_tune_space(space: dict) -> dict:
    """YAML-friendly {name: (kind, values)} → Ray Tune domains, same dotted names as the config."""
    from ray import tune
    kinds = {"choice": tune.choice, "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
             "grid": tune.grid_search}
    return {name: kinds[kind](values) for name, (kind, values) in
            ((name, _kind_and_values(name, spec)) for name, spec in space.items())}


def searchable(cfg: MiFuseConfig, space: dict) -> MiFuseConfig:
    """``cfg`` asking the teachers for the largest N and K any trial uses (every draw is stored, so
    no trial pays twice), each space key checked against the config first."""
    for name, spec in space.items():
        kind, values = _kind_and_values(name, spec)
        apply_overrides(copy.deepcopy(cfg), {name: values[0]})          # an unknown key fails here, in one line
    cfg = copy.deepcopy(cfg)
    for key, draws in (("fusion.lalm_answers_used", "lalm.answers_per_clip"),
                       ("fusion.source_passes_used", "source.passes_per_clip")):
        if key in space:
            section, field = draws.split(".")
            largest = int(max(_kind_and_values(key, space[key])[1]))
            setattr(getattr(cfg, section), field, max(getattr(getattr(cfg, section), field), largest))
    return cfg


def trial_config(base: MiFuseConfig, trial: dict) -> MiFuseConfig:
    return apply_overrides(copy.deepcopy(base), trial)


def _trial(trial: dict, base: MiFuseConfig, tables: dict, dev_df, source_checkpoint: str, out_dir: str) -> None:
    import ray.tune
    from .pipeline import choose_split_fusion, train_students
    cfg = trial_config(base, trial)
    name = f"trial_{ray.tune.get_context().get_trial_id()}"
    train_students(cfg, tables, choose_split_fusion(cfg, tables), dev_df, source_checkpoint, out_dir,
                   {name: cfg.train.mode}, report_to_tune=True, progress=False)


def run_tune(cfg: MiFuseConfig, tables: dict, dev_df, source_checkpoint: str, out_dir: str, space: dict | None = None,
             num_samples: int = 8, search_alg: str = "random", max_concurrent: int = 2, grace_epochs: int = 2):
    """Search ``space`` around ``cfg`` over the labelled splits ``tables`` ({split: labels table},
    from ``pipeline.label_run``). Writes tune_results.csv, best_config.json (a config file) and
    best_trial.json (its metric); returns (table of trials, best result)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    space = space or DEFAULT_SPACE
    metric = "final_dev_uar" if dev_df is not None and len(dev_df) > 0 else "train_agreement"
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=cfg, tables={k: v for k, v in tables.items() if k != "test"}, dev_df=dev_df,
                             source_checkpoint=source_checkpoint, out_dir=out_dir),
        {"CPU": 0.1})
    tuner = tune.Tuner(
        trainable, param_space=to_tune_space(space),
        tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=num_samples, search_alg=_searcher(search_alg),
                                    scheduler=ASHAScheduler(max_t=cfg.train.epochs,
                                                            grace_period=min(grace_epochs, cfg.train.epochs)),
                                    max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(storage_path=os.path.abspath(os.path.join(out_dir, "_ray_tune")), name="search",
                                  verbose=0, callbacks=[TrialLines(metric)]))
    results = _quietly(tuner.fit)
    df = results.get_dataframe()
    keep = [c for c in df.columns if c.startswith("config/") or c in (metric, "dev_uar", "ema_dev_uar", "epoch",
                                                                       "trial_id", "train_agreement")]
    table = df[keep].sort_values(metric, ascending=False)
    table.to_csv(os.path.join(out_dir, "tune_results.csv"), index=False)
    best = results.get_best_result(metric=metric, mode="max")
    with open(os.path.join(out_dir, "best_config.json"), "w") as fh:
        json.dump(to_dict(trial_config(cfg, best.config)), fh, indent=2, default=str)
    with open(os.path.join(out_dir, "best_trial.json"), "w") as fh:
        json.dump({"metric": metric, "value": best.metrics.get(metric), "trial": best.config}, fh, indent=2)
    return table, best


class TrialLines(Callback):
    """One console line per finished trial (its settings and metric) instead of Tune's status table."""

    def __init__(self, metric: str):
        self.metric, self.done = metric, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        value = (trial.last_result or {}).get(self.metric)
        settings = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())
        shown = f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"
        epochs = (trial.last_result or {}).get("epoch", -1) + 1
        print(f"trial {self.done} ({trial.trial_id}) finished after {epochs} epochs: {self.metric} {shown}  [{settings}]",
              flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        print(f"trial {self.done} ({trial.trial_id}) failed: see {trial.local_path or 'the Tune folder'}", flush=True)


def _quietly(fit):
    """Run Tune with its console output off: Tune's newer output engine prints an experiment box and
    paths even at ``verbose=0``, the legacy reporter prints nothing there. ``TrialLines`` is the console."""
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        return fit()
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT")
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def _searcher(search_alg: str):
    if search_alg == "random":
        return None
    if search_alg == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise ConfigError("search_alg 'optuna' needs `pip install optuna`") from None
        return OptunaSearch()
    raise ConfigError("search_alg must be 'random' or 'optuna'")
