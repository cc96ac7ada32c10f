"""What a person running a job sees: one line per stage with its elapsed time, Ray's own logs in
a file (``--verbose`` shows them live), and a short summary at the end."""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import threading
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


# A line of Ray's C++ logger: "[2026-12-04 20:01:12,374 E 2647 2647] core_worker.cc:2465: ..."
NATIVE_LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] ")
_diverted: dict = {}


def divert_native_logs(path: str) -> None:
    """Ray's C++ core worker inside this driver logs to file descriptor 2 (e.g. core_worker.cc's
    "constructor arguments in the object store" line for every Ray Data actor pool), out of reach
    of Python's logging. Route fd 2 through a pipe: lines in the C++ logger's format go to ``path``
    (Ray's own log file), every other line to the console. Python's own ``sys.stderr`` writes to the
    console directly, so a user error or a traceback never waits on the pipe."""
    if _diverted or not hasattr(os, "pipe"):
        return
    sys.stderr.flush()
    console = os.fdopen(os.dup(2), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                        errors="backslashreplace")
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    for handler in logging.getLogger().handlers:          # cli.main's handler still holds the old stream
        if _writes_to_console(handler) and handler.stream in (sys.stderr, sys.__stderr__):
            handler.setStream(console)
    sys.stderr = console
    log = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")

    def pump():
        with os.fdopen(read_end, encoding="utf-8", errors="backslashreplace") as source:
            for line in source:
                (log if NATIVE_LOG_LINE.match(line) else console).write(line)

    thread = threading.Thread(target=pump, name="native-log-pump", daemon=True)
    thread.start()
    _diverted.update(console=console, thread=thread)
    atexit.register(_restore_native_logs)


def _restore_native_logs() -> None:
    """Put the console back on fd 2 at exit and let the pump drain what is in the pipe."""
    console = _diverted.get("console")
    if console is None:
        return
    os.dup2(console.fileno(), 2)              # our end of the pipe closes: the pump reads to its end
    _diverted["thread"].join(timeout=2.0)


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
