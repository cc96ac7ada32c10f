"""Train the source classifier with Ray Train on a labelled manifest (train/dev/test splits).

    python jobs/train_source.py --source_manifest corpus/manifest.parquet --output runs/source
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mifuse_ray.cli import main, parse_config, parser  # noqa: E402


def run() -> None:
    import json
    cfg, _ = parse_config(parser(__doc__.splitlines()[0]))
    from mifuse_ray.inputs import check_output_writable
    from mifuse_ray.config import ConfigError
    from mifuse_ray.ray_utils import init_ray
    from mifuse_ray.train.source import train_source
    manifest = cfg.source_manifest
    if not manifest:
        from mifuse_ray.demo.domains import ensure_domain
        manifest = ensure_domain(cfg.demo.source_domain, cfg.demo.root, cfg.demo.scale)
    if not os.path.exists(manifest) and "://" not in manifest:
        raise ConfigError(f"source_manifest not found: {manifest}")
    check_output_writable(cfg.output)
    init_ray(cfg.ray_address)
    summary = train_source(cfg, manifest, cfg.output)
    from mifuse_ray.evaluation import score
    from mifuse_ray.predict import predict_files
    from mifuse_ray.train.source import labelled_split
    test = labelled_split(manifest, cfg.test_split, cfg.labels)
    if len(test):
        pred = predict_files(manifest, summary["checkpoint"], cfg, split=cfg.test_split)
        pred = pred[pred["error"].isna()].merge(test[["clip_id", "label_index"]], on="clip_id")
        y_hat = [cfg.labels.index(p) for p in pred["pred"]]
        m = score(pred["label_index"].to_numpy(), y_hat, len(cfg.labels))
        summary["test"] = {k: m[k] for k in ("uar", "wa", "macro_f1", "uar_ci95")}
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main(run)
