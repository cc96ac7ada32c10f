"""An offline, OpenAI-compatible LALM endpoint (a stand-in for a real audio LLM API).

``POST /v1/chat/completions`` with an ``input_audio`` content part (base64 WAV) returns an
emotion label sampled at the request's temperature from the stand-in scorer
(``lalm_scorer.py``), ``n`` choices, and token logprobs when asked. It exists so that the demo
and the tests drive the real client over real HTTP; point the jobs at a real endpoint with
``--lalm.base_url``. Faults (429 with Retry-After, 500, hangs, malformed bodies, answers that
are not a label), latency and a rate limit are configurable for tests and benchmarks.
Binds 127.0.0.1 unless told otherwise; rejects bodies over a size limit.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
from aiohttp import web

from ..label_set import DEFAULT_LABELS

MODEL_NAME = "mifuse-standin-lalm"
TEMPLATES = ("{label}", "{Label}.", "The speaker sounds {label}.", "Emotion: {Label}", '{{"emotion": "{label}"}}',
             "I would say {label}")
NOT_A_LABEL = ("I cannot determine the emotion from this audio.", "Sorry, I can't help with that.", "¯\\_(ツ)_/¯")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0                        # 0: a free port
    api_key: str = ""                    # when set, requests must carry "Authorization: Bearer <key>"
    labels: tuple[str, ...] = DEFAULT_LABELS
    latency_s: float = 0.0               # added per request
    latency_jitter_s: float = 0.0        # uniform extra latency in [0, jitter]
    rate_limit_qps: float = 0.0          # server-side limit; excess gets 429 + Retry-After
    fail_rate: float = 0.0               # fraction of requests that get an injected fault
    fault_mix: dict = field(default_factory=lambda: {"429": 1, "500": 1, "timeout": 1, "malformed": 1,
                                                     "not_a_label": 1})
    retry_after_s: float = 0.2
    hang_s: float = 30.0                 # how long a "timeout" fault stalls
    max_body_bytes: int = 8 * 1024 * 1024
    supports_n: bool = True
    seed: int = 0
    benchmark: bool = False              # skip feature extraction: deterministic scores from the audio hash


class StandinLALM:
    """Request handling and counters; ``app()`` builds the aiohttp application."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.score_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.stats = {"requests": 0, "completions": 0, "answers": 0, "faults": {}, "rejected_auth": 0,
                      "rate_limited": 0}
        self.completion_times: deque[float] = deque(maxlen=200_000)  # for steady-state throughput
        self._bucket_tokens = 1.0
        self._bucket_time = time.monotonic()

    # -- helpers ---------------------------------------------------------------------
    def _count_fault(self, kind: str) -> None:
        self.stats["faults"][kind] = self.stats["faults"].get(kind, 0) + 1

    def _rate_limited(self) -> bool:
        qps = self.cfg.rate_limit_qps
        if qps <= 0:
            return False
        now = time.monotonic()
        self._bucket_tokens = min(max(1.0, qps), self._bucket_tokens + (now - self._bucket_time) * qps)
        self._bucket_time = now
        if self._bucket_tokens >= 1.0:
            self._bucket_tokens -= 1.0
            return False
        return True

    def _scores(self, audio_b64: str) -> np.ndarray:
        key = hashlib.sha256(audio_b64.encode()).hexdigest()
        if key in self.score_cache:
            self.score_cache.move_to_end(key)
            return self.score_cache[key]
        if self.cfg.benchmark:
            p = np.random.default_rng(int(key[:15], 16)).dirichlet(np.ones(len(self.cfg.labels)))
        else:
            import soundfile as sf
            from ..audio import resample
            from .lalm_scorer import scores
            wav, sr = sf.read(io.BytesIO(base64.b64decode(audio_b64)), dtype="float32", always_2d=True)
            p = scores(resample(wav.mean(1), sr, 16000), self.cfg.labels)
        self.score_cache[key] = p
        if len(self.score_cache) > 100_000:
            self.score_cache.popitem(last=False)
        return p

    @staticmethod
    def _find_audio(body: dict) -> str | None:
        for msg in body.get("messages", []):
            content = msg.get("content")
            if isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and part.get("type") == "input_audio":
                        return part.get("input_audio", {}).get("data")
        return None

    def _choice(self, index: int, p: np.ndarray, temperature: float, rng, logprobs: bool, top: int) -> dict:
        labels = self.cfg.labels
        logp = np.log(np.maximum(p, 1e-12)) / max(temperature, 1e-3)
        logp = logp - np.log(np.exp(logp - logp.max()).sum()) - logp.max()
        k = int(rng.choice(len(labels), p=np.exp(logp) / np.exp(logp).sum()))
        label = labels[k]
        text = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(label=label, Label=label.capitalize())
        choice = {"index": index, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        if logprobs:
            tokens = text.split(" ")
            content = []
            for tok in tokens:
                if label in tok.lower():
                    tops = [{"token": tok.replace(label, lab).replace(label.capitalize(), lab.capitalize()),
                             "logprob": float(logp[j]), "bytes": None} for j, lab in enumerate(labels)]
                    tops.sort(key=lambda t: -t["logprob"])
                    content.append({"token": tok, "logprob": float(logp[k]), "bytes": None, "top_logprobs": tops[:top]})
                else:
                    content.append({"token": tok, "logprob": 0.0, "bytes": None,
                                    "top_logprobs": [{"token": tok, "logprob": 0.0, "bytes": None}]})
            choice["logprobs"] = {"content": content}
        return choice

    # -- handlers --------------------------------------------------------------------
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        denied = self._check_key(request)
        if denied is not None:
            return denied
        if self._rate_limited():
            self.stats["rate_limited"] += 1
            return web.json_response({"error": {"message": "Rate limit reached", "type": "rate_limit_error"}},
                                     status=429, headers={"Retry-After": f"{self.cfg.retry_after_s:g}"})
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": {"message": "body is not JSON", "type": "invalid_request_error"}}, status=400)
        audio = self._find_audio(body)
        if not audio:
            return web.json_response({"error": {"message": "no input_audio content part", "type": "invalid_request_error"}},
                                     status=400)
        fault = self._draw_fault()
        delay = self.cfg.latency_s + (self.rng.uniform(0, self.cfg.latency_jitter_s) if self.cfg.latency_jitter_s else 0)
        if delay > 0:
            await asyncio.sleep(delay)
        if fault == "timeout":
            await asyncio.sleep(self.cfg.hang_s)
        failed = self._fault_response(fault)
        if failed is not None:
            return failed
        try:
            p = await asyncio.get_running_loop().run_in_executor(None, self._scores, audio) \
                if not self.cfg.benchmark else self._scores(audio)
        except Exception as exc:  # undecodable audio is the caller's error
            return web.json_response({"error": {"message": f"could not decode input_audio: {exc}",
                                                "type": "invalid_request_error"}}, status=400)
        n = int(body.get("n") or 1)
        if n > 1 and not self.cfg.supports_n:
            return web.json_response({"error": {"message": "n > 1 is not supported", "type": "invalid_request_error"}},
                                     status=400)
        temperature = float(body.get("temperature", 1.0))
        seed = body.get("seed")
        rng = np.random.default_rng([int(seed), 7] if seed is not None else None)
        want_logprobs = bool(body.get("logprobs"))
        top = int(body.get("top_logprobs") or len(self.cfg.labels))
        choices = [self._choice(i, p, temperature, rng, want_logprobs, top) for i in range(n)]
        if fault == "not_a_label":
            for c in choices:
                c["message"]["content"] = NOT_A_LABEL[int(self.rng.integers(len(NOT_A_LABEL)))]
                c.pop("logprobs", None)
        self.stats["completions"] += 1
        self.stats["answers"] += n
        self.completion_times.append(time.monotonic())
        return web.json_response({
            "id": f"chatcmpl-{self.stats['requests']}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", MODEL_NAME), "choices": choices,
            "usage": {"prompt_tokens": 100, "completion_tokens": 4 * n, "total_tokens": 100 + 4 * n}})

    def _draw_fault(self) -> str | None:
        """The injected fault of this request (``fail_rate``, ``fault_mix``), or None."""
        if not (self.cfg.fail_rate > 0 and self.rng.random() < self.cfg.fail_rate):
            return None
        kinds = list(self.cfg.fault_mix)
        weights = np.array([self.cfg.fault_mix[k] for k in kinds], dtype=float)
        fault = kinds[int(self.rng.choice(len(kinds), p=weights / weights.sum()))]
        self._count_fault(fault)
        return fault

    def _fault_response(self, fault: str | None) -> web.Response | None:
        """The response an injected fault answers with instead of a completion (None: answer)."""
        if fault == "429":
            return web.json_response({"error": {"message": "Rate limit reached", "type": "rate_limit_error"}},
                                     status=429, headers={"Retry-After": f"{self.cfg.retry_after_s:g}"})
        if fault == "500":
            return web.json_response({"error": {"message": "internal error", "type": "server_error"}}, status=500)
        if fault == "malformed":
            return web.Response(text='{"id": "chatcmpl-broken", "choices": [', content_type="application/json")
        return None

    def _check_key(self, request: web.Request) -> web.Response | None:
        if self.cfg.api_key and request.headers.get("Authorization", "") != f"Bearer {self.cfg.api_key}":
            self.stats["rejected_auth"] += 1
            return web.json_response({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                                "code": "invalid_api_key"}}, status=401)
        return None

    async def models(self, request: web.Request) -> web.Response:
        denied = self._check_key(request)
        if denied is not None:
            return denied
        return web.json_response({"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "mifuse"}]})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)

    async def get_times(self, request: web.Request) -> web.Response:
        return web.json_response({"times": list(self.completion_times)})

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.completion_times.clear()
        self.stats.update({"requests": 0, "completions": 0, "answers": 0, "faults": {}, "rejected_auth": 0,
                           "rate_limited": 0})
        return web.json_response(self.stats)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.get_stats)
        app.router.add_post("/stats/reset", self.reset_stats)
        app.router.add_get("/stats/times", self.get_times)
        return app


class BackgroundServer:
    """Runs the endpoint on its own thread and event loop; ``url`` is the OpenAI base URL."""

    def __init__(self, cfg: ServerConfig | None = None):
        self.cfg = cfg or ServerConfig()
        self.lalm = StandinLALM(self.cfg)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="standin-lalm")
        self.port = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self.lalm.app(), access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, self.cfg.host, self.cfg.port)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._runner = runner
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def start(self) -> "BackgroundServer":
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("the offline LALM endpoint did not start")
        return self

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}/v1"

    @property
    def stats(self) -> dict:
        return json.loads(json.dumps(self.lalm.stats))

    def stop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _serve(cfg: ServerConfig, urls) -> None:
    """A ``ServerProcess``'s body: the endpoint until the process is terminated."""
    server = BackgroundServer(cfg).start()
    urls.put(server.url)
    server._thread.join()


class ServerProcess:
    """The endpoint in a process of its own, for measurements of the pipeline's driver: in a thread
    (``BackgroundServer``) its answers' state and its share of the GIL would count as the driver's.
    A real LALM is never in the driver's process; ``pid`` lets a benchmark count its memory apart."""

    def __init__(self, cfg: ServerConfig | None = None):
        import multiprocessing
        self.cfg, self._ctx = cfg or ServerConfig(), multiprocessing.get_context("spawn")
        self._proc, self.url = None, ""

    def __enter__(self) -> "ServerProcess":
        urls = self._ctx.Queue()
        self._proc = self._ctx.Process(target=_serve, args=(self.cfg, urls), daemon=True, name="standin-lalm")
        self._proc.start()
        self.url = urls.get(timeout=60)
        return self

    @property
    def pid(self) -> int:
        return self._proc.pid

    def __exit__(self, *exc) -> None:
        self._proc.terminate()
        self._proc.join(10)
