"""What a person running a job sees: one line per stage with its elapsed time, Ray's own logs in
a file (``--verbose`` shows them live), and a short summary at the end."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

log = logging.getLogger("mifuse_ray")


def quiet_ray(log_dir: str, verbose: bool) -> str | None:
    """Send the ``ray`` loggers (Ray Data's plans and progress, Train, Tune) to ``<log_dir>/ray.log``
    instead of the console, unless ``verbose``. Returns the log file's path."""
    if verbose:
        return None
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, "ray.log")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    ray_logger = logging.getLogger("ray")
    ray_logger.handlers = [handler]
    ray_logger.setLevel(logging.INFO)
    ray_logger.propagate = False
    return path


@contextlib.contextmanager
def stage(name: str, total: int | None = None, index: int | None = None):
    """``[2/5] labelling … 42 s`` on one line (finished in place when stdout is a terminal)."""
    prefix = f"[{index}/{total}] " if index and total else ""
    start = time.time()
    print(f"{prefix}{name} …", end="" if sys.stdout.isatty() else "\n", flush=True)
    try:
        yield
    except BaseException:
        print(f"\r{prefix}{name}: failed after {time.time() - start:.0f} s", flush=True)
        raise
    print(f"\r{prefix}{name}: done in {time.time() - start:.0f} s", flush=True)


def summary_table(results: dict, report_path: str) -> str:
    """The run's end: test UAR of the adapted model, each teacher and the fused label."""
    rows = [("system", "test UAR", "WA", "macro-F1")]
    for name in ("mifuse_ema", "mifuse_student", "fused_label", "lalm_zero_shot", "source_only"):
        m = results.get("test", {}).get(name)
        if m:
            rows.append((name, f"{m['uar']:.3f}", f"{m['wa']:.3f}", f"{m['macro_f1']:.3f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{r[0]:<{width}}  {r[1]:>8}  {r[2]:>6}  {r[3]:>8}" for r in rows]
    return "\n".join(["", *lines, "", f"report: {report_path}"])
