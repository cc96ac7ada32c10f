"""The LALM teacher as a Ray Data stage: an actor pool whose async ``__call__`` fans out a
whole batch's requests at once (bounded by the per-actor concurrency and the cluster-wide
rate limit), caching every answer as it arrives."""
from __future__ import annotations

import asyncio

import numpy as np
import pandas as pd

from ..audio import encode_wav
from ..config import LALMConfig
from .cache import ResponseCache
from .client import LALMClient, Secret, SpendCapReached, resolve_endpoint
from .limits import RateLimiter

LIMITER_ACTOR = "mifuse_lalm_limiter"

OUTPUT_COLUMNS = ("lalm_votes", "lalm_soft", "lalm_raw", "lalm_reasons", "lalm_requests", "lalm_cache_hits",
                  "lalm_latency_s", "lalm_error")


class LALMStage:
    def __init__(self, cfg: LALMConfig, labels, base_url: str, cache_dir: str, sample_rate: int = 16000,
                 limiter_actor: str = "", max_requests: int = 0, api_key: Secret | None = None):
        # The driver forwards its key (workers of a cluster it joined do not share its environment);
        # without one, the key is read from this worker's environment (a cluster-wide secret).
        self.lalm = resolve_endpoint(cfg, labels, base_url, api_key)
        self.cfg, self.labels, self.sample_rate = cfg, list(labels), sample_rate
        self.cache = ResponseCache(cache_dir) if cache_dir else None
        self.limiter_actor, self.max_requests = limiter_actor, max_requests
        self.client: LALMClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None   # the loop the client's HTTP session lives on

    async def _client(self) -> LALMClient:
        if self.client is None:
            self._loop = asyncio.get_running_loop()
            actor = None
            if self.limiter_actor:
                import ray
                actor = ray.get_actor(self.limiter_actor)
            limiter = RateLimiter(self.cfg.qps, self.max_requests, actor=actor)
            self.client = await LALMClient(self.lalm, self.cache, limiter).__aenter__()
        return self.client

    async def ask_batch(self, batch: pd.DataFrame) -> pd.DataFrame:
        client = await self._client()
        n, C = self.cfg.answers_per_clip, len(self.labels)
        ask = batch["lalm_asked"].to_numpy(bool) if "lalm_asked" in batch.columns else np.ones(len(batch), bool)
        ok = batch["error"].isna().to_numpy() & ask

        async def one(i):
            try:
                return await client.ask(encode_wav(batch["audio"].iloc[i], self.sample_rate), n)
            except SpendCapReached as exc:
                return exc
        idx = np.flatnonzero(ok)
        results = await asyncio.gather(*(one(i) for i in idx))
        cols = {c: [None] * len(batch) for c in OUTPUT_COLUMNS}
        cols["lalm_requests"] = [0] * len(batch)
        cols["lalm_cache_hits"] = [0] * len(batch)
        cols["lalm_latency_s"] = [0.0] * len(batch)
        for i in range(len(batch)):
            if not ok[i]:
                cols["lalm_votes"][i] = [-1] * n
                cols["lalm_soft"][i] = [[float("nan")] * C] * n
                cols["lalm_error"][i] = "not_selected_for_lalm" if batch["error"].isna().iloc[i] else None
        for i, res in zip(idx, results):
            if isinstance(res, SpendCapReached):
                cols["lalm_votes"][i] = [-1] * n
                cols["lalm_soft"][i] = [[float("nan")] * C] * n
                cols["lalm_error"][i] = "spend_cap_reached"
                continue
            cols["lalm_votes"][i] = res.votes
            cols["lalm_soft"][i] = [s if s is not None else [float("nan")] * C for s in res.soft]
            cols["lalm_raw"][i] = [r if r is not None else "" for r in res.raw]
            cols["lalm_reasons"][i] = [r or "" for r in res.reasons]
            cols["lalm_requests"][i] = res.requests
            cols["lalm_cache_hits"][i] = res.cache_hits
            cols["lalm_latency_s"][i] = res.latency_s
            cols["lalm_error"][i] = res.error
        out = batch.drop(columns=[c for c in ("audio",) if c in batch.columns]).copy()
        for c, v in cols.items():
            out[c] = v
        return out

    async def __call__(self, batch: pd.DataFrame):
        yield await self.ask_batch(batch)

    def __del__(self):
        """Ray Data deletes the UDF when its actor pool shuts down. Close the HTTP session on the loop
        it lives on (Ray Data's own thread), or aiohttp prints 'Unclosed client session' and every
        pooled connection into the console at the end of each labelling pass."""
        client, loop = getattr(self, "client", None), getattr(self, "_loop", None)   # __init__ may have failed
        if client is None or client.session.closed or loop is None or loop.is_closed():
            return
        close = client.__aexit__(None, None, None)       # the client opened its session in __aenter__
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:                   # deleted on the loop's own thread: cannot wait for it here
            loop.create_task(close)
        elif loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(close, loop).result(timeout=5)
            except Exception:                 # a stuck close must not fail the actor's exit
                pass
        else:
            loop.run_until_complete(close)


def add_lalm_stage(ds, cfg: LALMConfig, labels, base_url: str, cache_dir: str, sample_rate: int = 16000,
                   limiter_actor: str = "", max_requests: int = 0, api_key: Secret | None = None):
    """Append the LALM stage to a Ray Data pipeline of decoded clips.

    Each actor works on ``batches_in_flight`` batches at once (async calls on one event loop), so
    the requests of the next batch are already out while the last answers of the current one
    arrive; ``concurrency`` still bounds the requests in flight per actor.
    """
    import ray.data
    compute = ray.data.ActorPoolStrategy(size=cfg.num_actors, max_tasks_in_flight_per_actor=cfg.batches_in_flight,
                                         max_concurrent_calls_per_actor=cfg.batches_in_flight)
    return ds.map_batches(
        LALMStage, batch_format="pandas", batch_size=cfg.batch_size, compute=compute, num_cpus=cfg.actor_cpus,
        fn_constructor_kwargs=dict(cfg=cfg, labels=labels, base_url=base_url, cache_dir=cache_dir,
                                   sample_rate=sample_rate, limiter_actor=limiter_actor, max_requests=max_requests,
                                   api_key=api_key))
