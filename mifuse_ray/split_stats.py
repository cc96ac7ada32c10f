"""A sharded split's teacher draws held by a few Ray actors, so that the fusion's fit runs on the cluster.

Fitting a fusion takes many passes over the whole split (Sinkhorn balancing, and the dev choice
fits it once per candidate weight vector): read from the shards every time, that is the split
read hundreds of times; collected in the driver, it is a row per clip there. Instead each
``_Holder`` actor reads some of the shards once, keeps their draws as numpy arrays (~0.4 kB a clip),
and answers a pass with its partial column sums; the driver adds a handful of vectors
(``fusion_fit._column_means``). Passes that need every batch in turn (the label model's EM) stream
the held batches to the driver one at a time.
"""
from __future__ import annotations

from .fused_labels import draws_used, stored_draws, teachers_from_draws
from .fusion_fit import column_sums

_HELD: dict = {}            # (shards root, shard files) → HeldSplit: a run fits the same split many times
_KEEP = 2                   # held splits kept at once (the adaptation split, and one more)


class _Holder:
    """Some shards' draws (decoded clips only), and their teacher statistics for each (N, K) asked."""

    def __init__(self, paths: list[str], num_classes: int):
        from .label_shards import read_frames
        self.C, self.draws = num_classes, []
        for frame in read_frames(paths, columns=_draw_columns(paths[0]) if paths else None):
            ok = frame[frame["error"].isna()].reset_index(drop=True)
            if len(ok):
                self.draws.append(stored_draws(ok, num_classes))
        self._stats: dict = {}

    def teachers(self, answers_used: int, passes_used: int) -> list:
        key = (answers_used, passes_used)
        if key not in self._stats:
            self._stats = {key: [teachers_from_draws(draws_used(d, answers_used, passes_used), self.C)
                                 for d in self.draws]}            # one (N, K) at a time
        return self._stats[key]

    def column_sums(self, answers_used: int, passes_used: int, rows_of):
        return column_sums(self.teachers(answers_used, passes_used), rows_of)

    def batch(self, answers_used: int, passes_used: int, i: int):
        return self.teachers(answers_used, passes_used)[i]

    def batch_count(self) -> int:
        return len(self.draws)


def _draw_columns(path: str) -> list[str]:
    """The columns the fit reads: the teachers' draws and the error (not embeddings or audio paths)."""
    from .fused_labels import draw_columns, teacher_names
    from .label_shards import LabelShards
    import os
    names = LabelShards(os.path.dirname(path)).columns
    return ["error", *[c for t in teacher_names(names) for c in draw_columns(t)]]


class HeldBatches:
    """``fit_fusion``'s ``batches`` for a held split: sums on the holders, or the batches one at a time."""

    def __init__(self, held: "HeldSplit", answers_used: int, passes_used: int):
        self.held, self.n, self.k = held, answers_used, passes_used

    def column_sums(self, rows_of):
        import ray
        parts = ray.get([h.column_sums.remote(self.n, self.k, rows_of) for h in self.held.holders])
        sums = counts = None
        for s, c in parts:
            if s is None:
                continue
            sums = s if sums is None else [a + b for a, b in zip(sums, s)]
            counts = c if counts is None else [a + b for a, b in zip(counts, c)]
        return sums, counts

    def __call__(self):
        import ray
        for holder, count in zip(self.held.holders, self.held.counts):
            for i in range(count):
                yield ray.get(holder.batch.remote(self.n, self.k, i))


class HeldSplit:
    def __init__(self, paths: list[str], num_classes: int, holders: int):
        import ray
        # "DEFAULT": outside any placement group, so that a Tune trial (whose bundles hold its own work
        # and its Train workers) can fit a fusion too; a holder is memory, and 0.05 of a CPU
        actor = ray.remote(num_cpus=0.05, scheduling_strategy="DEFAULT")(_Holder)
        groups = [paths[i::holders] for i in range(holders)]
        self.holders = [actor.remote(g, num_classes) for g in groups if g]
        self.counts = ray.get([h.batch_count.remote() for h in self.holders])

    def batches(self, answers_used: int, passes_used: int) -> HeldBatches:
        return HeldBatches(self, answers_used, passes_used)

    def release(self) -> None:
        import ray
        for h in self.holders:
            try:
                ray.kill(h)
            except ray.exceptions.ActorHandleNotFoundError:    # its cluster is gone, and the holder with it
                pass


SHARDS_PER_HOLDER = 128     # ~130k clips, ~50 MB of draws: a holder is a worker process (~130 MB) before its data


def holder_count(shards: int, cluster_cpus: float) -> int:
    """Holders for a split of ``shards`` shards: one per ``SHARDS_PER_HOLDER`` (more would each cost a
    process for a few MB of draws), at most one per 2 of the cluster's CPUs (the passes' parallelism)."""
    return max(1, min(-(-shards // SHARDS_PER_HOLDER), int(cluster_cpus // 2)))


def held_split(shards, num_classes: int) -> HeldSplit:
    """The split's holders, started on first use (``holder_count`` of them)."""
    import ray
    paths = shards.paths()
    # the driver's node id: a new cluster (ray.shutdown, ray.init) starts new holders
    key = (ray.get_runtime_context().get_node_id(), shards.root, tuple(paths), num_classes)
    if key not in _HELD:
        while len(_HELD) >= _KEEP:
            _HELD.pop(next(iter(_HELD))).release()
        holders = holder_count(len(paths), ray.cluster_resources().get("CPU", 2))
        _HELD[key] = HeldSplit(paths, num_classes, holders)
    return _HELD[key]


def release_all() -> None:
    """Stop every holder (the end of a run; a stopped cluster takes them with it anyway)."""
    while _HELD:
        _HELD.pop(next(iter(_HELD))).release()
