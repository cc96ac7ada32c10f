"""The endpoint families ``lalm.preset`` names, registered once: ``config.LALMPreset`` is derived
from this table, and the client reads each row's request mode and default model from it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    model: str              # the model asked for when lalm.model is empty
    base_url: str           # the endpoint when lalm.base_url is empty ("" for the offline stand-in)
    supports_n: bool        # one request with n=N answers (else N requests with different seeds)
    logprobs: bool          # token logprobs are returned (soft LALM answers)


PRESETS: dict[str, Preset] = {
    "offline": Preset("mifuse-standin-lalm", "", True, True),
    "vllm-qwen2-audio": Preset("Qwen/Qwen2-Audio-7B-Instruct", "http://127.0.0.1:8000/v1", True, True),
    "vllm-qwen2.5-omni": Preset("Qwen/Qwen2.5-Omni-7B", "http://127.0.0.1:8000/v1", True, True),
    "openai": Preset("gpt-4o-audio-preview", "https://api.openai.com/v1", False, False),
    "gemini": Preset("gemini-2.5-flash", "https://generativelanguage.googleapis.com/v1beta/openai", False, False),
}
