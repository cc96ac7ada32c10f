"""Label target audio with both teachers and fuse: writes <output>/labels{,_dev,_test}/labels.parquet.

    python jobs/label.py                                   # the demo target
    python jobs/label.py --target clips/ --source.checkpoint src_model --lalm.base_url http://host:8000/v1
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mifuse_ray.cli import main, parse_config, parser  # noqa: E402


def run() -> None:
    import json
    cfg, _ = parse_config(parser(__doc__.splitlines()[0]))
    from mifuse_ray.inputs import prepare
    from mifuse_ray.labeling import estimate_spend
    from mifuse_ray.pipeline import REPORT_PLOT_CLIPS, label_run
    inputs = prepare(cfg)
    spend = estimate_spend(cfg, inputs.clip_totals())
    if cfg.lalm.dry_run:
        print(json.dumps({"dry_run": spend}, indent=2))
        return
    results, _ = label_run(cfg, inputs, os.path.abspath(cfg.output), spend)
    res = results["adapt"]
    from mifuse_ray.report import plot_fusion
    plot_fusion(res.shards.head(REPORT_PLOT_CLIPS), cfg.labels, os.path.join(os.path.dirname(res.labels_path), "fusion.png"))
    print(json.dumps(res.summary, indent=2, default=str))
    print(f"labels: {res.labels_path}")


if __name__ == "__main__":
    main(run)
