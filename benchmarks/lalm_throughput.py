"""LALM stage throughput against the offline endpoint (100 ms latency), same requests in flight.

    python -m benchmarks.lalm_throughput [--requests 4000] [--concurrency 64] [--latency 0.1]

Compares: a plain sequential loop, a bare asyncio+aiohttp loop (the reference), Ray's own
ray.data.llm HTTP request processor, and mifuse_ray's LALM stage on Ray Data. Throughput is
steady state, from the server's completion times between the 10th and 90th percentile (Ray
start-up and actor launch excluded), and is compared with Little's law (concurrency / latency).
"""
import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, data=None):
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def steady_rate(base, n_expected):
    times = np.array(http(base + "/stats/times")["times"])
    if len(times) < 10:
        return float("nan"), len(times)
    t10, t90 = np.percentile(times, [10, 90])
    return 0.8 * len(times) / max(t90 - t10, 1e-9), len(times)


def clips(n, seed=0):
    from mifuse_ray.audio import encode_wav
    rng = np.random.default_rng(seed)
    return [encode_wav(0.1 * rng.standard_normal(4000).astype(np.float32), 16000) for _ in range(n)]


def body(b64, model="mifuse-standin-lalm"):
    return {"model": model, "temperature": 1.0, "max_tokens": 8, "seed": 1, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "emotion?"}, {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}]}]}


def run_sequential(url, wavs):
    from mifuse_ray.config import LALMConfig
    from mifuse_ray.label_set import DEFAULT_LABELS
    from mifuse_ray.lalm.client import LALMClient, resolve_endpoint

    async def go():
        async with LALMClient(resolve_endpoint(LALMConfig(answers_per_clip=1), DEFAULT_LABELS, url), None) as client:
            for w in wavs:
                await client.ask(w, 1)
    asyncio.run(go())


def run_bare_asyncio(url, wavs, concurrency):
    import aiohttp

    async def go():
        sem = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def one(w):
                async with sem:
                    async with session.post(url + "/chat/completions", json=body(base64.b64encode(w).decode())) as r:
                        await r.read()
            await asyncio.gather(*(one(w) for w in wavs))
    asyncio.run(go())


def run_ray_data_llm(url, wavs, batch):
    import ray
    from ray.data.llm import HttpRequestProcessorConfig, build_processor
    cfg = HttpRequestProcessorConfig(url=url + "/chat/completions", batch_size=batch, concurrency=1)
    proc = build_processor(cfg, preprocess=lambda row: {"payload": body(row["b64"])},
                           postprocess=lambda row: {"ok": "choices" in row["http_response"]})
    ds = ray.data.from_items([{"b64": base64.b64encode(w).decode()} for w in wavs])
    return proc(ds).materialize().count()


def run_mifuse_stage(url, wavs, concurrency, batch, batches_in_flight):
    """The same stage construction as labeling (add_lalm_stage), on pre-decoded clips."""
    import io

    import pandas as pd
    import ray
    import soundfile as sf

    from mifuse_ray.config import LALMConfig
    from mifuse_ray.label_set import DEFAULT_LABELS
    from mifuse_ray.lalm.stage import add_lalm_stage
    audio = [sf.read(io.BytesIO(w), dtype="float32")[0] for w in wavs]
    df = pd.DataFrame({"clip_id": [str(i) for i in range(len(wavs))], "audio": audio, "error": [None] * len(wavs)})
    cfg = LALMConfig(answers_per_clip=1, concurrency=concurrency, batch_size=batch, batches_in_flight=batches_in_flight)
    ds = ray.data.from_pandas(df).repartition(max(1, len(df) // batch))
    return add_lalm_stage(ds, cfg, DEFAULT_LABELS, url, cache_dir="").materialize().count()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--sequential-requests", type=int, default=50)
    p.add_argument("--ray-data-llm-requests", type=int, default=600, help="it runs at ~12 req/s")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--latency", type=float, default=0.1)
    p.add_argument("--batches-in-flight", type=int, nargs="+", default=[1, 4, 8],
                   help="mifuse stage variants (lalm.batches_in_flight; the default config uses 8)")
    args = p.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, os.path.join(REPO, "jobs", "serve_lalm.py"), "--port", str(port),
                               "--latency-s", str(args.latency), "--benchmark"], stdout=subprocess.PIPE, text=True)
    server.stdout.readline()
    base = f"http://127.0.0.1:{port}"
    url = base + "/v1"
    import ray

    from mifuse_ray.ray_utils import init_ray
    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    bound = args.concurrency / args.latency
    rows = []
    try:
        for name, fn, n, inflight in (
                ("sequential loop (1 in flight)", lambda w: run_sequential(url, w), args.sequential_requests, 1),
                ("bare asyncio + aiohttp", lambda w: run_bare_asyncio(url, w, args.concurrency), args.requests,
                 args.concurrency),
                ("ray.data.llm HttpRequestProcessor", lambda w: run_ray_data_llm(url, w, args.concurrency),
                 args.ray_data_llm_requests, args.concurrency),
                *((f"mifuse_ray LALM stage, {b} batch(es) in flight per actor",
                   lambda w, b=b: run_mifuse_stage(url, w, args.concurrency, 64, b), args.requests, args.concurrency)
                  for b in args.batches_in_flight)):
            http(base + "/stats/reset", b"")
            wavs = clips(n, seed=len(rows))
            t = time.perf_counter()
            fn(wavs)
            wall = time.perf_counter() - t
            rate, served = steady_rate(base, n)
            rows.append((name, inflight, served, rate, n / wall, rate / (inflight / args.latency)))
    finally:
        server.terminate()
    ray_llm = rows[2][3]
    print(f"\nLALM throughput, {args.latency * 1000:.0f} ms endpoint latency, Little's-law bound at "
          f"{args.concurrency} in flight = {bound:.0f} req/s\n")
    print("| client | in flight | requests | steady req/s | end-to-end req/s | of bound | vs ray.data.llm |")
    print("|---|---|---|---|---|---|---|")
    for name, inflight, served, rate, e2e, frac in rows:
        print(f"| {name} | {inflight} | {served} | {rate:,.1f} | {e2e:,.1f} | {frac:.0%} | {rate / ray_llm:.1f}x |")


if __name__ == "__main__":
    main()
