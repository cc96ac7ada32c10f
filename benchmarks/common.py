"""What the benchmarks share: where their run trees and tables go, the machine and commit a table
records, and the mean ± std they report."""
from __future__ import annotations

import os
import platform
import subprocess

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join("outputs", "benchmarks")          # run trees: never inside a tracked folder
RESULTS = os.path.join("benchmarks", "results")       # tables and figures: committed


def runs_dir(name: str) -> str:
    """The default folder of a benchmark's run trees (``outputs/benchmarks/<name>``)."""
    return os.path.join(RUNS, name)


def results_dir(name: str) -> str:
    """The default folder of a benchmark's committed tables (``benchmarks/results/<name>``)."""
    return os.path.join(RESULTS, name)


def machine() -> str:
    return f"{platform.node()} {os.cpu_count()} cores {platform.machine()}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO).stdout.strip()
    except OSError:
        return ""


def mean_std(values) -> str:
    """'mean ± sample std' of the finite values ('' for none; one value alone without a spread)."""
    values = [v for v in values if v == v]
    if not values:
        return ""
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def merge_record(path: str, rows: list[dict], columns: list[str], keys: list[str]):
    """The long-format record at ``path`` with ``rows`` added: a row with the same ``keys`` as an old one
    replaces it, and rows this invocation did not produce (other seeds, sizes, encoders) stay."""
    import pandas as pd
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    old = pd.read_csv(path) if os.path.exists(path) else pd.DataFrame(columns=columns)
    table = pd.concat([old, pd.DataFrame(rows, columns=columns)], ignore_index=True)
    table = table.drop_duplicates(keys, keep="last")
    table.to_csv(path, index=False)
    return table
