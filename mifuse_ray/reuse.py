"""Reusing finished work: one fingerprint scheme for labels, students and benchmark cells.

A rerun into the same output must pay for nothing twice (LALM answers, MC draws, training), and
must never hand back work done at other settings. Every reusable piece of work is stamped with
the digest of everything that changes it, in a ``reuse.json`` beside the work:

- labels (``<output>/labels*/``): the clips, the source checkpoint's bytes, the LALM, source and
  audio settings (``pipeline.labeling_fingerprint``);
- a student (``<output>/models/<run>/``): the training settings, the fusion and its fit, the labels
  and the dev clips (``train.student.student_fingerprint``); Ray Train's own resume state is
  stamped the same way, so that a run at other settings starts afresh instead of resuming;
- a finished run (``run.json``, written by every adapt run): its config, which the benchmarks read
  (``settings_changed``) to decide whether a cell must run again.

Config fields marked ``not_a_result`` (``config.py``) are left out of every fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np

STAMP = "reuse.json"


def digest(payload) -> str:
    """SHA-256 of a JSON-able payload: numpy arrays and scalars rounded to 6 digits (float noise does not
    count), anything else JSON cannot write by its ``str``."""
    text = json.dumps(payload, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()


def _jsonable(value):
    if isinstance(value, (np.ndarray, np.generic)):
        return np.asarray(value).round(6).tolist() if np.asarray(value).dtype.kind in "fc" else value.tolist()
    return str(value)


def stamp(directory: str, fingerprint: str, **extra) -> None:
    """Mark ``directory`` as finished work with this fingerprint (``extra``: anything to hand back on reuse)."""
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, STAMP + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"fingerprint": fingerprint, **extra}, fh, default=str)
    os.replace(tmp, os.path.join(directory, STAMP))      # a stamp is whole or absent


def stamped(directory: str, fingerprint: str) -> dict | None:
    """The stamp of ``directory`` when it holds finished work with this fingerprint, else None."""
    path = os.path.join(directory, STAMP)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        stored = json.load(fh)
    return stored if stored.get("fingerprint") == fingerprint else None


def stamp_differs(directory: str, fingerprint: str) -> bool:
    """True when ``directory`` holds work stamped with *another* fingerprint (no stamp: False)."""
    path = os.path.join(directory, STAMP)
    return os.path.exists(path) and stamped(directory, fingerprint) is None


def remove_tree(path: str) -> None:
    """Delete a folder on local disk or under an fsspec URI (s3://, gs://); a missing one is fine."""
    if "://" in path and not path.startswith("file://"):
        import fsspec
        fs, root = fsspec.core.url_to_fs(path)
        if fs.exists(root):
            fs.rm(root, recursive=True)
        return
    shutil.rmtree(path.removeprefix("file://"), ignore_errors=True)


def settings_changed(run_dir: str, cfg, sections=("audio", "lalm", "source", "fusion", "train")) -> list[str]:
    """The settings (result fields of ``sections``) on which the finished run in ``run_dir`` differs
    from ``cfg``, read from its ``run.json``: a benchmark tree made before a default changed runs
    again instead of handing back the old default's numbers. A field the record lacks counts as changed."""
    from .config import result_fields
    record = os.path.join(run_dir, "run.json")
    if not os.path.exists(record):
        return ["no run.json"]
    with open(record) as fh:
        stored = json.load(fh)["config"]
    changed = []
    for section in sections:
        now = json.loads(json.dumps(result_fields(getattr(cfg, section)), default=str))
        then = stored.get(section, {})
        changed += [f"{section}.{k} {then.get(k, '(not recorded)')} → {v}" for k, v in now.items()
                    if k not in then or then[k] != v]
    return changed
