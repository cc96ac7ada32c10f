"""A response cache so that no LALM answer is ever paid for twice.

Storage: one small JSON object per answer, content-addressed by the SHA-256 of everything
that changes an answer. One object per answer suits both a local disk and an object store
(S3/GCS PUTs are atomic, appends are not; concurrent actors on many nodes never write the
same object twice, so no locking is needed), and a crashed run loses at most the answers in
flight. Local writes go through a temporary file and a rename.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid


def cache_key(**fields) -> str:
    """SHA-256 of the canonical JSON of the fields (audio hash, endpoint, model, prompt, labels,
    temperature, seed, logprob settings, max tokens, answer index, request mode)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ResponseCache:
    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.remote = "://" in root and not root.startswith("file://")
        if self.remote:
            import fsspec
            self.fs, self.base = fsspec.core.url_to_fs(self.root)
        else:
            self.base = self.root.removeprefix("file://")
            os.makedirs(self.base, exist_ok=True)

    def _path(self, key: str) -> str:
        return f"{self.base}/{key[:2]}/{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        try:
            if self.remote:
                with self.fs.open(path, "rb") as fh:
                    return json.loads(fh.read())
            with open(path, "rb") as fh:
                return json.loads(fh.read())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):
            return None  # a torn write from a crash: treat as missing, it will be re-asked

    def put(self, key: str, value: dict) -> None:
        data = json.dumps(value).encode()
        path = self._path(key)
        if self.remote:
            with self.fs.open(path, "wb") as fh:
                fh.write(data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
