"""Fusion throughput: clips/s fusing 1M clips (N=5 LALM answers, K=10 MC passes, 4 classes) on one core.

    python -m benchmarks.fusion_throughput [--clips 1000000]

Compares the library's fusion (vote-entropy lookup table, float32) with the direct numpy
version a reader would write first (per-draw one-hot, log of every histogram entry, float64).
"""
import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np


def direct_numpy(lalm_votes, src_probs, src_votes, C, tau=0.5):
    def hist(v):
        onehot = (v[..., None] == np.arange(C)).astype(np.float64)
        return onehot.mean(1)

    def H(p):
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)
    h_l, h_s = hist(lalm_votes), hist(src_votes)
    U = np.stack([H(h_l), H(h_s)], 1)
    w = np.exp(-U / tau)
    w /= w.sum(1, keepdims=True)
    return w[:, :1] * h_l + w[:, 1:] * src_probs.astype(np.float64).mean(1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=1_000_000)
    p.add_argument("--chunk", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import torch
    torch.set_num_threads(1)
    from mifuse_ray.fusion import fuse, teacher_stats
    rng = np.random.default_rng(0)
    B, N, K, C = args.clips, 5, 10, 4
    lalm_votes = rng.integers(0, C, (B, N)).astype(np.int8)
    src_probs = rng.dirichlet(np.ones(C), size=(B, K)).astype(np.float32)
    src_votes = rng.integers(0, C, (B, K)).astype(np.int8)

    def library(lib_lalm, lib_probs, lib_votes):
        for s in range(0, B, args.chunk):
            e = s + args.chunk
            fuse([teacher_stats(lib_lalm[s:e], C), teacher_stats(lib_votes[s:e], C, lib_probs[s:e], with_mi=False)])

    def library_torch():
        library(torch.from_numpy(lalm_votes), torch.from_numpy(src_probs), torch.from_numpy(src_votes))

    def direct():
        for s in range(0, B, args.chunk):
            e = s + args.chunk
            direct_numpy(lalm_votes[s:e], src_probs[s:e], src_votes[s:e], C)

    rows = []
    for name, fn in (("direct numpy (float64, one-hot, log)", direct),
                     ("mifuse fusion, numpy", lambda: library(lalm_votes, src_probs, src_votes)),
                     ("mifuse fusion, torch CPU", library_torch)):
        best = min(_timed(fn) for _ in range(args.repeats))
        rows.append((name, B / best))
    base = rows[0][1]
    print(f"\nfusion of {B:,} clips, N={N}, K={K}, C={C}, one thread (best of {args.repeats})\n")
    print(f"| {'implementation':40s} | {'clips/s':>12s} | {'vs direct':>9s} |")
    print(f"|{'-' * 42}|{'-' * 14}|{'-' * 11}|")
    for name, rate in rows:
        print(f"| {name:40s} | {rate:12,.0f} | {rate / base:8.2f}x |")


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
