"""Batch inference with Ray Data: predictions (label, distribution, confidence) to Parquet.

    python jobs/predict.py --model outputs/demo/models/mifuse/ema --input clips/ --out preds.parquet
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mifuse_ray.cli import main, parse_config, parser  # noqa: E402


def run() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint directory (source, student or EMA)")
    p.add_argument("--input", required=True, help="manifest .parquet, folder, or URI")
    p.add_argument("--split", default=None, help="only this split of a manifest")
    p.add_argument("--out", required=True, help="output .parquet")
    cfg, args = parse_config(p)
    from mifuse_ray.api import predict
    from mifuse_ray.labeling import write_parquet
    df = predict(cfg, args.input, args.model, args.split)
    keep = [c for c in ("clip_id", "path", "parent_id", "offset_s", "pred", "probs", "confidence", "error")
            if c in df.columns]
    write_parquet(df[keep], args.out)
    print(f"{len(df)} clips ({int(df['error'].notna().sum())} errors) -> {args.out}")


if __name__ == "__main__":
    main(run)
