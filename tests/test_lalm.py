import asyncio
import logging

import numpy as np
import pytest

from mifuse_ray.audio import encode_wav
from mifuse_ray.config import ConfigError, LALMConfig
from mifuse_ray.label_set import DEFAULT_LABELS, DEFAULT_SYNONYMS
from mifuse_ray.lalm.cache import ResponseCache
from mifuse_ray.lalm.client import LALMAuthError, LALMClient, preflight, resolve_endpoint
from mifuse_ray.lalm.parsing import logprob_distribution, parse_answer
from mifuse_ray.demo.lalm_server import BackgroundServer, ServerConfig

SECRET = "sk-test-SECRET-do-not-leak-123"


def wave(seed=0, seconds=1.0):
    from mifuse_ray.demo.domains import DEMO_DOMAINS, sample_prosody
    from mifuse_ray.demo.synth import Speaker, synthesize_utterance
    rng = np.random.default_rng(seed)
    return synthesize_utterance(sample_prosody(DEMO_DOMAINS["acted_studio"], seed % 4, rng),
                                Speaker(150, 1.0, 1.0, 0.0), seconds, 16000, rng)


def clip(seed=0, seconds=1.0):
    return encode_wav(wave(seed, seconds), 16000)


def run(coro):
    return asyncio.run(coro)


async def ask_all(server_url, cfg, clips, n, cache_dir=None, key_env=None):
    lalm = resolve_endpoint(cfg, DEFAULT_LABELS, server_url)
    cache = ResponseCache(cache_dir) if cache_dir else None
    async with LALMClient(lalm, cache) as client:
        return await asyncio.gather(*(client.ask(c, n) for c in clips)), client


@pytest.mark.parametrize("text,want", [
    ("angry", "angry"), ("Angry.", "angry"), ("The speaker sounds ANGRY!", "angry"), ('{"emotion": "Sad"}', "sad"),
    ("I'd say frustration", "angry"), ("Emotion: happiness", "happy"), ("calm", "neutral")])
def test_parse_answer(text, want):
    idx, reason = parse_answer(text, DEFAULT_LABELS, DEFAULT_SYNONYMS)
    assert reason is None and DEFAULT_LABELS[idx] == want


@pytest.mark.parametrize("text,reason", [("", "empty_answer"), ("I cannot tell.", "no_label_in_answer"),
                                         ("happy or sad", "ambiguous_answer")])
def test_unparseable_answers_keep_a_reason(text, reason):
    idx, why = parse_answer(text, DEFAULT_LABELS, DEFAULT_SYNONYMS)
    assert idx is None and why.startswith(reason)


def test_logprob_distribution():
    lp = {"content": [{"token": "The", "top_logprobs": [{"token": "The", "logprob": 0.0}]},
                      {"token": "sad", "top_logprobs": [{"token": " sad", "logprob": np.log(0.6)},
                                                        {"token": "Sadness", "logprob": np.log(0.1)},
                                                        {"token": "angry", "logprob": np.log(0.3)}]}]}
    np.testing.assert_allclose(logprob_distribution(lp, DEFAULT_LABELS, DEFAULT_SYNONYMS), [0, 0, 0.3, 0.7])
    assert logprob_distribution(None, DEFAULT_LABELS, DEFAULT_SYNONYMS) is None


def test_n_answers_cached_and_rerun_sends_nothing(tmp_path):
    with BackgroundServer(ServerConfig(latency_s=0.01)) as server:
        clips = [clip(i) for i in range(6)]
        cfg = LALMConfig(answers_per_clip=5, seed=3)
        results, client = run(ask_all(server.url, cfg, clips, 5, str(tmp_path / "cache")))
        assert all(len(r.votes) == 5 and all(v >= 0 for v in r.votes) for r in results)
        assert all(len(s) == 4 for r in results for s in r.soft)                  # logprobs → distributions
        assert server.stats["requests"] == 6 and server.stats["answers"] == 30   # one request with n=5 per clip
        assert len({tuple(r.votes) for r in results}) > 1
        again, client2 = run(ask_all(server.url, cfg, clips, 5, str(tmp_path / "cache")))
        assert server.stats["requests"] == 6                                       # zero new requests
        assert all(r.cache_hits == 5 and r.requests == 0 for r in again)
        assert [r.votes for r in again] == [r.votes for r in results]
        fewer, _ = run(ask_all(server.url, cfg, clips, 3, str(tmp_path / "cache")))  # a Tune trial with N=3
        assert server.stats["requests"] == 6 and [r.votes for r in fewer] == [r.votes[:3] for r in results]


def test_without_n_support_seeds_differ_per_answer(tmp_path):
    with BackgroundServer(ServerConfig(supports_n=False)) as server:
        cfg = LALMConfig(answers_per_clip=6, use_n=False, temperature=2.0)
        (res,), _ = run(ask_all(server.url, cfg, [clip(1)], 6, str(tmp_path / "c")))
        assert server.stats["requests"] == 6
        assert len(set(res.raw)) > 1


def test_429_retry_after_is_honoured():
    with BackgroundServer(ServerConfig(fail_rate=1.0, fault_mix={"429": 1}, retry_after_s=0.3)) as server:
        cfg = LALMConfig(max_retries=2, retry_budget=10.0, backoff_base_s=0.0)
        import time
        t = time.monotonic()
        (res,), client = run(ask_all(server.url, cfg, [clip()], 5))
        assert time.monotonic() - t >= 0.6          # two waits of ≥ Retry-After, not the 0 s backoff
        assert res.error and "http_429" in res.error and server.stats["requests"] == 3


@pytest.mark.parametrize("fault", ["500", "timeout", "malformed"])
def test_transient_faults_are_retried(fault):
    with BackgroundServer(ServerConfig(fail_rate=0.5, fault_mix={fault: 1}, hang_s=5.0, seed=1)) as server:
        cfg = LALMConfig(max_retries=6, retry_budget=5.0, backoff_base_s=0.01, timeout_s=0.5)
        results, client = run(ask_all(server.url, cfg, [clip(i) for i in range(8)], 3))
        assert all(r.error is None for r in results)
        assert server.stats["faults"].get(fault, 0) > 0 and client.retries >= server.stats["faults"][fault]


def test_retry_budget_caps_total_requests():
    with BackgroundServer(ServerConfig(fail_rate=1.0, fault_mix={"500": 1})) as server:
        cfg = LALMConfig(max_retries=10, retry_budget=0.25, backoff_base_s=0.0)
        results, client = run(ask_all(server.url, cfg, [clip(i) for i in range(8)], 2))
        assert server.stats["requests"] <= (1 + 0.25) * 8
        assert all("retry budget exhausted" in r.error or "http_500" in r.error for r in results)


def test_not_a_label_recorded_with_reason():
    with BackgroundServer(ServerConfig(fail_rate=1.0, fault_mix={"not_a_label": 1})) as server:
        (res,), _ = run(ask_all(server.url, LALMConfig(), [clip()], 3))
        assert res.votes == [-1, -1, -1] and all(r == "no_label_in_answer" for r in res.reasons)
        assert res.raw[0] and res.error.startswith("lalm_no_valid_answer")


def test_401_is_reported_clearly_and_key_never_leaks(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    with BackgroundServer(ServerConfig(api_key=SECRET)) as server:
        monkeypatch.setenv("MY_KEY", "wrong-key")
        cfg = LALMConfig(api_key_env="MY_KEY")
        with pytest.raises(LALMAuthError, match="MY_KEY"):
            run(preflight(resolve_endpoint(cfg, DEFAULT_LABELS, server.url)))
        (res,), _ = run(ask_all(server.url, cfg, [clip()], 2, str(tmp_path / "c")))
        assert res.error and "http_401" in res.error
        monkeypatch.setenv("MY_KEY", SECRET)
        (ok,), _ = run(ask_all(server.url, cfg, [clip()], 2, str(tmp_path / "c")))
        assert ok.error is None
        assert SECRET not in repr(resolve_endpoint(cfg, DEFAULT_LABELS, server.url))
    blob = caplog.text + "".join(p.read_text() for p in (tmp_path / "c").rglob("*.json"))
    assert SECRET not in blob


def test_remote_endpoint_needs_opt_in_and_key(monkeypatch):
    monkeypatch.delenv("MIFUSE_LALM_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="allow_remote_audio"):
        resolve_endpoint(LALMConfig(preset="openai"), DEFAULT_LABELS)
    with pytest.raises(ConfigError, match="MIFUSE_LALM_API_KEY"):
        resolve_endpoint(LALMConfig(preset="openai", allow_remote_audio=True), DEFAULT_LABELS)


def test_unreachable_endpoint_is_one_clear_error():
    lalm = resolve_endpoint(LALMConfig(), DEFAULT_LABELS, "http://127.0.0.1:9/v1")
    with pytest.raises(ConnectionError, match="cannot reach the LALM endpoint"):
        run(preflight(lalm, timeout_s=2))


def test_openai_sdk_gets_a_valid_completion():
    import base64
    import openai
    with BackgroundServer(ServerConfig()) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused")
        resp = client.chat.completions.create(
            model="mifuse-standin-lalm", n=2, temperature=0.7, logprobs=True, top_logprobs=4,
            messages=[{"role": "user", "content": [
                {"type": "text", "text": "Which emotion?"},
                {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip()).decode(), "format": "wav"}}]}])
        assert len(resp.choices) == 2
        assert parse_answer(resp.choices[0].message.content, DEFAULT_LABELS, DEFAULT_SYNONYMS)[0] is not None
        assert client.models.list().data[0].id == "mifuse-standin-lalm"


def test_server_binds_loopback_and_rejects_huge_bodies():
    import urllib.request
    with BackgroundServer(ServerConfig(max_body_bytes=10_000)) as server:
        assert server.cfg.host == "127.0.0.1"
        req = urllib.request.Request(server.url + "/chat/completions", data=b"x" * 50_000,
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req)
        assert err.value.code == 413


def test_stage_closes_its_http_session_when_ray_data_deletes_it():
    """Ray Data runs an async UDF on a loop in its own thread and deletes the UDF at pool shutdown;
    the session must be closed there (else aiohttp floods the console with 'Unclosed client session')."""
    import gc
    import threading

    import pandas as pd

    from mifuse_ray.lalm.stage import LALMStage
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    batch = pd.DataFrame({"audio": [wave(0), wave(1)], "error": [None, None]})
    try:
        with BackgroundServer(ServerConfig(latency_s=0.0)) as server:
            stage = LALMStage(LALMConfig(answers_per_clip=2), DEFAULT_LABELS, server.url, cache_dir="")
            out = asyncio.run_coroutine_threadsafe(stage.ask_batch(batch), loop).result(timeout=30)
            assert out["lalm_error"].isna().all() and server.stats["requests"] == 2
            session = stage.client.session
            assert not session.closed
            del stage
            gc.collect()
            assert session.closed
    finally:
        loop.call_soon_threadsafe(loop.stop)


def test_the_request_body_is_the_json_of_the_request_with_the_audio_spliced_in():
    """The audio is not passed through the JSON encoder; the bytes sent are still exactly the JSON of the
    request a user would write, with a prompt that quotes and escapes."""
    import base64
    import json
    lalm = resolve_endpoint(LALMConfig(prompt='Say "angry"\nor \\ calm'), DEFAULT_LABELS, "http://127.0.0.1:9/v1")
    audio = base64.b64encode(encode_wav(np.zeros(160, np.float32), 16000))
    body = json.loads(LALMClient(lalm, None)._body(audio, 3, 7))
    assert body["n"] == 3 and body["seed"] == 7 and body["messages"][0]["content"][0]["text"] == lalm.prompt
    assert body["messages"][0]["content"][1]["input_audio"] == {"data": audio.decode(), "format": "wav"}
