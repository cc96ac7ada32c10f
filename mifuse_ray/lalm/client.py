"""Async client for OpenAI-compatible chat-completions endpoints serving audio LLMs.

One clip → N answers: one request with ``n=N`` where the endpoint supports it, else N
requests with seeds that differ per answer index. Every answer is cached under a key of
everything that changes it, so a rerun (or a Tune trial asking for N ≤ what is held) sends
nothing for answers already paid for. Retries use jittered exponential backoff, honour
``Retry-After``, and draw on a retry budget; a non-retryable 4xx fails the clip, not the job.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import aiohttp

from ..config import ConfigError, LALMConfig
from .cache import ResponseCache, cache_key
from .limits import RateLimiter, RetryBudget, SpendCapReached
from .parsing import logprob_distribution, parse_answer
from .presets import PRESETS

log = logging.getLogger(__name__)


DEFAULT_PROMPT = ("Listen to the speech clip and classify the speaker's emotion. "
                  "Answer with exactly one word from this list: {labels}.")


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Secret:
    """An API key on its way from the driver to the stage actors: printing, logging or an error
    message that formats the actor's arguments shows ``Secret(***)``, never the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __reduce__(self):
        return (Secret, (self._value,))


def api_key_from_env(cfg: LALMConfig) -> Secret | None:
    """The key named by ``lalm.api_key_env`` in this process's environment, if it is set."""
    value = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
    return Secret(value) if value else None


@dataclass
class ResolvedLALM:
    """LALMConfig with the preset applied and the key read from the environment (never stored)."""

    base_url: str
    model: str
    supports_n: bool
    logprobs: bool
    prompt: str
    labels: list[str]
    cfg: LALMConfig
    api_key: str = field(default="", repr=False)

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


def resolve_endpoint(cfg: LALMConfig, labels, base_url: str = "", api_key: Secret | None = None) -> ResolvedLALM:
    """The preset applied and the key taken from ``api_key`` (forwarded by the driver) or else from
    this process's environment."""
    if cfg.preset not in PRESETS:
        raise ConfigError(f"lalm.preset must be one of {sorted(PRESETS)}, got {cfg.preset!r}")
    preset = PRESETS[cfg.preset]
    url = base_url or cfg.base_url or preset.base_url
    if not url:
        raise ConfigError("lalm.base_url is empty: give the endpoint's URL (or use the demo, which starts one)")
    if urlparse(url).scheme not in ("http", "https"):
        raise ConfigError(f"lalm.base_url must be an http(s) URL, got {url!r}")
    if not is_loopback(url) and not cfg.allow_remote_audio:
        raise ConfigError(f"lalm.base_url {url} is not on this machine: sending audio there needs "
                          "lalm.allow_remote_audio=true in the config")
    api_key = (api_key or api_key_from_env(cfg) or Secret("")).reveal()
    if not api_key and not is_loopback(url):
        raise ConfigError(f"no API key: set the environment variable {cfg.api_key_env} "
                          f"(named by lalm.api_key_env) for {url}")
    prompt = (cfg.prompt or DEFAULT_PROMPT).format(labels=", ".join(labels))
    return ResolvedLALM(base_url=url, model=cfg.model or preset.model,
                        supports_n=preset.supports_n if cfg.use_n is None else cfg.use_n,
                        logprobs=preset.logprobs if cfg.logprobs is None else cfg.logprobs,
                        prompt=prompt, labels=list(labels), cfg=cfg, api_key=api_key)


class LALMAuthError(RuntimeError):
    pass


async def preflight(lalm: ResolvedLALM, timeout_s: float = 10.0) -> None:
    """Reach the endpoint (GET /models, no audio) so a bad URL or key fails before any spend."""
    headers = {"Authorization": f"Bearer {lalm.api_key}"} if lalm.api_key else {}
    url = lalm.base_url.rstrip("/") + "/models"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.get(url, headers=headers) as resp:
                if resp.status in (401, 403):
                    raise LALMAuthError(f"the LALM endpoint {lalm.base_url} rejected the API key (HTTP {resp.status}); "
                                        f"check the environment variable {lalm.cfg.api_key_env}")
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
        raise ConnectionError(f"cannot reach the LALM endpoint {lalm.base_url} ({type(exc).__name__}); "
                              "check lalm.base_url and that the server is running") from None


@dataclass
class Answer:
    text: str | None
    logprobs: dict | None = None
    error: str | None = None       # transport-level failure (after retries)
    cached: bool = False


@dataclass
class ClipAnswers:
    votes: list[int]               # N entries, -1 where no valid label
    soft: list[list[float] | None]
    raw: list[str | None]
    reasons: list[str | None]
    requests: int
    cache_hits: int
    latency_s: float

    @property
    def error(self) -> str | None:
        if any(v >= 0 for v in self.votes):
            return None
        reasons = sorted({r for r in self.reasons if r})
        return "lalm_no_valid_answer: " + ", ".join(reasons) if reasons else "lalm_no_valid_answer"


_AUDIO_SLOT = "\x00audio\x00"                       # where _body splices the audio in
_AUDIO_SLOT_JSON = json.dumps(_AUDIO_SLOT).encode()


class LALMClient:
    """Asks one endpoint about clips. One instance per event loop (per Ray Data actor)."""

    def __init__(self, lalm: ResolvedLALM, cache: ResponseCache | None, limiter: RateLimiter | None = None,
                 concurrency: int | None = None):
        self.lalm, self.cfg, self.cache = lalm, lalm.cfg, cache
        self.limiter = limiter or RateLimiter(self.cfg.qps, self.cfg.max_requests)
        self.semaphore = asyncio.Semaphore(concurrency or self.cfg.concurrency)
        self.budget = RetryBudget(self.cfg.retry_budget)
        self.session: aiohttp.ClientSession | None = None
        self.requests_sent = 0
        self.retries = 0

    async def __aenter__(self):
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(connector=connector, json_serialize=json.dumps)
        return self

    async def __aexit__(self, *exc):
        await self.session.close()

    # -- one HTTP request with retries ----------------------------------------------------
    def _body(self, audio_b64: bytes, n: int, seed: int) -> bytes:
        """The request's JSON bytes. The base64 audio (100+ kB a clip, nothing in it to escape) is spliced
        into the serialised rest rather than scanned by the JSON encoder on every request."""
        body = {"model": self.lalm.model, "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens,
                "seed": seed, "messages": [{"role": "user", "content": [
                    {"type": "text", "text": self.lalm.prompt},
                    {"type": "input_audio", "input_audio": {"data": _AUDIO_SLOT, "format": "wav"}}]}]}
        if n > 1:
            body["n"] = n
        if self.lalm.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = self.cfg.top_logprobs
        head, _, tail = json.dumps(body).encode().rpartition(_AUDIO_SLOT_JSON)
        return b"".join((head, b'"', audio_b64, b'"', tail))

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after * random.uniform(1.0, 1.2)
        return min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** attempt) * random.uniform(0.5, 1.5)

    async def _post(self, body: bytes) -> list[dict]:
        """The response's choices. Raises _Fail with a reason and whether to retry."""
        headers = {"Content-Type": "application/json"}
        if self.lalm.api_key:
            headers["Authorization"] = f"Bearer {self.lalm.api_key}"
        try:
            async with self.session.post(self.lalm.endpoint, data=body, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s)) as resp:
                text = await resp.text()
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            raise _Fail("timeout", True) from None
        except aiohttp.ClientError as exc:
            raise _Fail(f"connection_error: {type(exc).__name__}", True) from None
        if status == 200:
            try:
                choices = json.loads(text)["choices"]
                if not isinstance(choices, list) or not choices:
                    raise ValueError
                return choices
            except (ValueError, KeyError, TypeError):
                raise _Fail("malformed_response", True) from None
        message = _error_message(text)
        if status == 429 or status >= 500:
            raise _Fail(f"http_{status}", True, retry_after)
        raise _Fail(f"http_{status}: {message}", False)

    async def request(self, body: bytes) -> tuple[list[dict] | None, str | None, int]:
        """(choices, None, requests sent) or (None, reason, requests sent)."""
        sent, reason = 0, ""
        self.budget.add_needed(1)
        for attempt in range(self.cfg.max_retries + 1):
            if attempt > 0 and not self.budget.try_spend():
                return None, f"{reason} (retry budget exhausted)", sent
            await self.limiter.acquire()
            async with self.semaphore:
                sent += 1
                self.requests_sent += 1
                if attempt:
                    self.retries += 1
                try:
                    return await self._post(body), None, sent
                except _Fail as fail:
                    reason = fail.reason
                    if not fail.retryable:
                        return None, reason, sent
                    wait = self._backoff(attempt, fail.retry_after)
            await asyncio.sleep(wait)
        return None, f"{reason} (after {self.cfg.max_retries} retries)", sent

    # -- one clip, N answers ---------------------------------------------------------------
    def _key(self, audio_sha: str, index: int) -> str:
        c = self.cfg
        return cache_key(audio=audio_sha, endpoint=self.lalm.base_url.rstrip("/"), model=self.lalm.model,
                         prompt=self.lalm.prompt, labels=self.lalm.labels, temperature=c.temperature,
                         seed=c.seed + index, logprobs=self.lalm.logprobs,
                         top_logprobs=c.top_logprobs if self.lalm.logprobs else 0, max_tokens=c.max_tokens,
                         answer_index=index, mode="n" if self.lalm.supports_n else "single")

    async def ask(self, wav_bytes: bytes, answers_per_clip: int) -> ClipAnswers:
        start = time.monotonic()
        audio_sha = hashlib.sha256(wav_bytes).hexdigest()
        keys = [self._key(audio_sha, i) for i in range(answers_per_clip)]
        answers: list[Answer | None] = [None] * answers_per_clip
        if self.cache is not None:
            for i, key in enumerate(keys):
                hit = self.cache.get(key)
                if hit is not None:
                    answers[i] = Answer(hit.get("text"), hit.get("logprobs"), cached=True)
        missing = [i for i in range(answers_per_clip) if answers[i] is None]
        sent = 0
        if missing:
            audio_b64 = base64.b64encode(wav_bytes)
            if self.lalm.supports_n:
                groups = [missing]
            else:
                groups = [[i] for i in missing]
            results = await asyncio.gather(*(self.request(self._body(audio_b64, len(g), self.cfg.seed + g[0]))
                                             for g in groups))
            for group, (choices, reason, n_sent) in zip(groups, results):
                sent += n_sent
                for j, i in enumerate(group):
                    if choices is not None and j < len(choices):
                        msg = choices[j].get("message") or {}
                        answers[i] = Answer(msg.get("content"), choices[j].get("logprobs"))
                        if self.cache is not None:
                            self.cache.put(keys[i], {"text": answers[i].text, "logprobs": answers[i].logprobs})
                    else:
                        answers[i] = Answer(None, error=reason or "short_response")
        votes, soft, raw, reasons = [], [], [], []
        for a in answers:
            raw.append(a.text)
            if a.error:
                votes.append(-1), soft.append(None), reasons.append(a.error)
                continue
            label, why = parse_answer(a.text, self.lalm.labels, self.cfg.synonyms)
            votes.append(-1 if label is None else label)
            reasons.append(why)
            dist = logprob_distribution(a.logprobs, self.lalm.labels, self.cfg.synonyms) if label is not None else None
            soft.append(None if dist is None else dist.tolist())
        hits = sum(1 for a in answers if a.cached)
        return ClipAnswers(votes, soft, raw, reasons, sent, hits, time.monotonic() - start)


class _Fail(Exception):
    def __init__(self, reason: str, retryable: bool, retry_after: float | None = None):
        self.reason, self.retryable, self.retry_after = reason, retryable, retry_after


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return text[:200]


__all__ = ["LALMClient", "ResolvedLALM", "resolve_endpoint", "preflight", "PRESETS", "SpendCapReached", "LALMAuthError",
           "is_loopback", "ClipAnswers"]
