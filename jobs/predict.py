"""Batch inference with Ray Data: predictions (label, distribution, confidence) to Parquet.

    python jobs/predict.py --model outputs/demo/models/mifuse/ema --input clips/ --out preds.parquet
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mifuse_ray.cli import main, parse_config, parser  # noqa: E402
from mifuse_ray.config import ConfigError  # noqa: E402


def run() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint directory (source, student or EMA)")
    p.add_argument("--input", required=True, help="manifest .parquet, folder, or URI")
    p.add_argument("--split", default=None, help="only this split of a manifest")
    p.add_argument("--out", required=True, help="output .parquet")
    p.add_argument("--by-speaker", action="store_true",
                   help="also pred_by_speaker: each speaker's predictions balanced over their clips (needs the "
                        "manifest's speaker_id; speakers under fusion.speaker_min_clips clips stay per clip)")
    cfg, args = parse_config(p)
    from mifuse_ray.api import predict
    from mifuse_ray.labeling import write_parquet
    target = args.input
    if args.by_speaker:             # checked before any model runs, on the listing predict then reads
        from mifuse_ray.audio import list_inputs
        target = list_inputs(args.input, split=args.split)
        if target["speaker_id"].isna().all():
            raise ConfigError("--by-speaker needs a speaker_id column in the manifest given to --input")
    df = predict(cfg, target, args.model, args.split)
    if args.by_speaker:
        from mifuse_ray.evaluation import by_speaker
        pred = by_speaker(df["probs"], df["speaker_id"], cfg)
        df["pred_by_speaker"] = [cfg.labels[k] if k >= 0 else None for k in pred]
    keep = [c for c in ("clip_id", "path", "parent_id", "offset_s", "speaker_id", "pred", "pred_by_speaker", "probs",
                        "confidence", "error") if c in df.columns]
    write_parquet(df[keep], args.out)
    print(f"{len(df)} clips ({int(df['error'].notna().sum())} errors) -> {args.out}")


if __name__ == "__main__":
    main(run)
