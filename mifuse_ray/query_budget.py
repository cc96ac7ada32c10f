"""Which clips to ask the LALM about when its calls are budgeted (docs/method.md §6).

The source model's MC-dropout uncertainty says where a second opinion is worth paying for; the
embeddings keep the chosen clips spread over the target domain, so the budget is not spent on
one confusing corner of it. Pure numpy: the labeling pipeline and ``benchmarks/budget.py`` both
call ``select_clips`` on the same inputs.
"""
from __future__ import annotations

import numpy as np

METHODS = ("mi_diverse", "random")


def budget_count(budget: float, clips: int, budget_clips: int = 0) -> int:
    """The number of clips to ask the LALM: ``budget_clips`` when set (capped at ``clips``), else the
    fraction ``budget`` of them."""
    if budget_clips > 0:
        return int(min(budget_clips, clips))
    return int(round(budget * clips))


def k_center_greedy(points: np.ndarray, k: int, first: int = 0) -> np.ndarray:
    """Indices of ``k`` points, each the farthest (Euclidean) from those already chosen."""
    n = len(points)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    chosen = [first]
    dist = np.linalg.norm(points - points[first], axis=1)
    for _ in range(k - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(points - points[nxt], axis=1))
    return np.asarray(chosen, dtype=np.int64)


def select_clips(uncertainty: np.ndarray, embeddings: np.ndarray, k: int, method: str = "mi_diverse",
                 seed: int = 0, pool_factor: float = 3.0) -> np.ndarray:
    """A boolean mask of the ``k`` clips to ask.

    ``mi_diverse``: the ``pool_factor × k`` most uncertain clips form the pool; k-center greedy on
    their (standardised) embeddings, started from the most uncertain, picks ``k`` of them.
    ``random``: ``k`` clips uniformly at random (the baseline).
    """
    n = len(uncertainty)
    mask = np.zeros(n, dtype=bool)
    k = int(min(max(k, 0), n))
    if k == 0:
        return mask
    if k == n:
        mask[:] = True
        return mask
    if method == "random":
        mask[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
        return mask
    if method != "mi_diverse":
        raise ValueError(f"unknown selection method {method!r}; one of {METHODS}")
    u = np.nan_to_num(np.asarray(uncertainty, dtype=np.float64), nan=-np.inf)
    order = np.argsort(-u, kind="stable")
    pool = order[:int(min(n, max(k, np.ceil(pool_factor * k))))]
    x = np.asarray(embeddings, dtype=np.float64)[pool]
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    mask[pool[k_center_greedy(x, k, first=0)]] = True
    return mask
