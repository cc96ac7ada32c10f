"""Train the MI-Fuse student (or a baseline: --train.mode) from an existing labels.parquet.

    python jobs/train_student.py --output outputs/demo --train.mode mifuse
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mifuse_ray.cli import main, parse_config, parser  # noqa: E402


def run() -> None:
    import json
    import pandas as pd
    cfg, _ = parse_config(parser(__doc__.splitlines()[0]))
    from mifuse_ray.api import resolve_inputs
    from mifuse_ray.config import ConfigError
    from mifuse_ray.ray_utils import init_ray
    from mifuse_ray.train.student import train_student
    labels_path = os.path.join(cfg.output, "labels", "labels.parquet")
    if not os.path.exists(labels_path):
        raise ConfigError(f"{labels_path} not found: run jobs/label.py with the same --output first")
    init_ray(cfg.ray_address)
    inputs = resolve_inputs(cfg)
    if inputs.dev_df is None:
        raise ConfigError("a labelled dev split is needed to select the student (dev_split)")
    res = train_student(cfg, pd.read_parquet(labels_path), inputs.dev_df, inputs.source_checkpoint, cfg.output,
                        run_name=cfg.train.mode)
    print(json.dumps({"model": res.model_dir, "chosen": res.chosen, "best": res.best_metrics}, indent=2, default=str))


if __name__ == "__main__":
    main(run)
