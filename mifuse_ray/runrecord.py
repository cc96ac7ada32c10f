"""A record of every run, stored with its outputs: what ran, on what, with which settings."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from importlib import metadata

from .config import MiFuseConfig, to_dict

PACKAGES = ("mifuse_ray", "ray", "torch", "torchaudio", "transformers", "aiohttp", "numpy", "pandas", "pyarrow",
            "soundfile")


def git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_sha256(path: str) -> str | None:
    if not path or not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_run_record(cfg: MiFuseConfig, out_dir: str, extra: dict) -> str:
    """``run.json``: resolved config, git commit, package versions, seeds, input hashes, endpoint.

    The config holds only the *name* of the API-key variable, never its value.
    """
    from .lalm.client import DEFAULT_PROMPT
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": git_commit(), "host": platform.node(),
        "python": platform.python_version(), "packages": package_versions(), "config": to_dict(cfg),
        "seeds": {"lalm": cfg.lalm.seed, "source_mc": cfg.source.seed, "train": cfg.train.seed},
        "prompt_sha256": hashlib.sha256((cfg.lalm.prompt or DEFAULT_PROMPT).encode()).hexdigest(), **extra}
    path = os.path.join(out_dir, "run.json")
    with open(path, "w") as fh:
        json.dump(record, fh, indent=2, default=str)
    return path
