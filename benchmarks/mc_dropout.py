"""MC-dropout throughput: clips/s for K = 1, 5, 10, 20, batched vs a naive K-loop, full vs head scope.

    python -m benchmarks.mc_dropout [--model cnn|wav2vec2] [--clips 64] [--device cpu|cuda]

Ratios are against one deterministic pass of the same batch, measured in the same run.
"""
import argparse
import os
import time

import torch


def build(kind: str, tmp: str):
    from mifuse_ray.models.base import load_model
    from mifuse_ray.models.cnn import LogMelCNN
    if kind == "cnn":
        LogMelCNN().save(os.path.join(tmp, "cnn"))
        return load_model(os.path.join(tmp, "cnn"))
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification
    cfg = Wav2Vec2Config(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                         num_labels=4, hidden_dropout=0.1, activation_dropout=0.1, final_dropout=0.1)
    Wav2Vec2ForSequenceClassification(cfg).save_pretrained(os.path.join(tmp, "w2v"))
    return load_model(os.path.join(tmp, "w2v"), labels=["neutral", "happy", "angry", "sad"])


def main():
    import tempfile
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn", choices=["cnn", "wav2vec2"])
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from mifuse_ray.models.mc import mc_predict, mc_seeds
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model = build(args.model, tmp).to(device).eval()
    wav = 0.1 * torch.randn(args.clips, int(16000 * args.seconds), device=device)
    lengths = torch.full((args.clips,), wav.shape[1], device=device)
    ids = [f"c{i}" for i in range(args.clips)]

    def timed(fn):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best

    det = timed(lambda: mc_predict(model, wav, lengths, mc_seeds(0, ids, 0).to(device), amp=args.amp))
    rows = [("deterministic", 0, det)]
    for K in (1, 5, 10, 20):
        seeds = mc_seeds(0, ids, K).to(device)
        for scope, strategy in (("head", "batched"), ("full", "batched"), ("full", "loop")):
            rows.append((f"{scope} {strategy}", K, timed(lambda: mc_predict(model, wav, lengths, seeds, scope=scope,
                                                                             amp=args.amp, full_strategy=strategy))))
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nMC dropout, {args.model}, {args.clips} clips × {args.seconds:g} s, {name}, amp={args.amp}\n")
    print("| mode | K | clips/s | time vs one deterministic pass |")
    print("|---|---|---|---|")
    for mode, K, t in rows:
        print(f"| {mode} | {K} | {args.clips / t:,.1f} | {t / det:.2f}x |")


if __name__ == "__main__":
    main()
