"""Train the student (or a baseline: --train.mode) from the labels jobs/label.py wrote to the same --output.

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
    from mifuse_ray.config import ConfigError
    from mifuse_ray.inputs import prepare
    from mifuse_ray.pipeline import LABEL_STAGES, choose_split_fusion, train_students
    tables = {split: pd.read_parquet(os.path.join(cfg.output, stage_dir, "labels.parquet"))
              for split, stage_dir in LABEL_STAGES.items()
              if os.path.exists(os.path.join(cfg.output, stage_dir, "labels.parquet"))}
    if "adapt" not in tables:
        raise ConfigError(f"{os.path.join(cfg.output, 'labels', 'labels.parquet')} not found: run jobs/label.py "
                          "with the same --output first")
    inputs = prepare(cfg)
    choice = choose_split_fusion(cfg, tables)
    res = train_students(cfg, tables, choice, inputs.dev_df, inputs.source_checkpoint, cfg.output,
                         {cfg.train.mode: cfg.train.mode})[cfg.train.mode]
    print(json.dumps({"model": res.model_dir, "final model": res.chosen, "fusion": choice.name,
                      "last epoch": res.best_metrics}, indent=2, default=str))


if __name__ == "__main__":
    main(run)
