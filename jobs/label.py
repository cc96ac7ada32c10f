"""Label target audio with both teachers and MI-Fuse: writes <output>/labels/labels.parquet.

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
    from mifuse_ray.api import check_lalm, check_output_writable, label, lalm_endpoint, resolve_inputs
    from mifuse_ray.labeling import estimate_spend
    from mifuse_ray.ray_utils import init_ray
    check_output_writable(cfg.output)
    init_ray(cfg.ray_address)
    inputs = resolve_inputs(cfg)
    spend = estimate_spend(cfg, inputs.adapt_df)
    if cfg.lalm.dry_run:
        print(json.dumps({"dry_run": spend}, indent=2))
        return
    with lalm_endpoint(cfg) as url:
        check_lalm(cfg, url)
        res = label(cfg, inputs.adapt_df, os.path.abspath(cfg.output), inputs.source_checkpoint, url)
    from mifuse_ray.report import plot_uncertainty
    plot_uncertainty(res.table, os.path.join(os.path.dirname(res.labels_path), "uncertainty.png"))
    print(json.dumps(res.summary, indent=2, default=str))
    print(f"labels: {res.labels_path}")


if __name__ == "__main__":
    main(run)
