"""Adapt a source SER model to a target domain with MI-Fuse: label → train → evaluate → report.

    python jobs/adapt.py                          # the built-in demo, nothing else needed
    python jobs/adapt.py --config my_run.yaml     # your target, checkpoint, LALM endpoint
    ray job submit --working-dir . -- python jobs/adapt.py --output s3://bucket/run
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mifuse_ray.cli import main, parse_config, parser  # noqa: E402


def run() -> None:
    cfg, _ = parse_config(parser(__doc__.splitlines()[0]))
    from mifuse_ray.api import adapt
    result = adapt(cfg)
    if result.report_path:
        from mifuse_ray.console import summary_table
        print(summary_table(result.results, result.report_path))

if __name__ == "__main__":
    main(run)
