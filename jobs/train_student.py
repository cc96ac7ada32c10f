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
    from mifuse_ray.calibration import choose_fusion, dev_halves
    from mifuse_ray.config import ConfigError
    from mifuse_ray.inputs import prepare
    from mifuse_ray.train.student import train_student
    labels_path = os.path.join(cfg.output, "labels", "labels.parquet")
    if not os.path.exists(labels_path):
        raise ConfigError(f"{labels_path} not found: run jobs/label.py with the same --output first")
    inputs = prepare(cfg)
    labels = pd.read_parquet(labels_path)
    dev_path = os.path.join(cfg.output, "labels_dev", "labels.parquet")
    dev_labels = pd.read_parquet(dev_path) if os.path.exists(dev_path) else None
    choice = choose_fusion(labels, dev_labels, cfg.fusion, cfg.labels)
    student_dev = inputs.dev_df[dev_halves(inputs.dev_df)[1]] if inputs.dev_df is not None else None
    res = train_student(cfg, labels, student_dev, inputs.source_checkpoint, cfg.output, run_name=cfg.train.mode,
                        choice=choice, dev_labels=dev_labels)
    print(json.dumps({"model": res.model_dir, "final model": res.chosen, "fusion": choice.name,
                      "last epoch": res.best_metrics}, indent=2, default=str))


if __name__ == "__main__":
    main(run)
