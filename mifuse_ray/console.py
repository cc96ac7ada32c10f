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
    """Send the ``ray`` loggers (Ray Data's plans and progress, Train, Tune) and Python's warnings to
    ``<log_dir>/ray.log`` instead of the console, unless ``verbose``. Returns the log file's path.

    Ray Data configures its ``ray.data`` logger on import with a console handler of its own and no
    propagation, so quieting ``ray`` alone leaves three lines per dataset on stderr: that logger keeps
    its session log file and writes to ours instead of the console."""
    if verbose:
        return None
    import ray.data  # noqa: F401  (configures the "ray.data" logger: it must exist before it is redirected)
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, "ray.log")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    handler.setLevel(logging.INFO)
    ray_logger = logging.getLogger("ray")
    ray_logger.handlers = [handler]
    ray_logger.setLevel(logging.INFO)
    ray_logger.propagate = False
    data_logger = logging.getLogger("ray.data")        # keeps its session log file (and its level)
    data_logger.handlers = [h for h in data_logger.handlers if not _writes_to_console(h)] + [handler]
    logging.captureWarnings(True)                      # library deprecation warnings: the file, not the console
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.handlers = [handler]
    warnings_logger.propagate = False
    return path


def _writes_to_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


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
