"""The fusion map over a sharded split: each draws shard fused by a Ray task into a labels shard.

The fit (``fused_labels.fit_table``) is the split-wide part; this is the per-clip part, shard by
shard on the cluster, each task returning its shard's counts (``labeling.label_counts``) so the
split's summary is assembled from a few numbers per shard. Reused draws are fused again this way
with each run's own fusion: a run that changes only the fusion pays for no answer.
"""
from __future__ import annotations

import os

FUSE_CPUS = 0.25        # a fusion task is numpy over one shard; small, so it never starves the others


def _fuse_one(draws_path: str, out_path: str, num_classes: int, fusion_cfg, fit, labels) -> dict:
    from .fused_labels import NO_TEACHER_ERROR, fusion_columns
    from .label_shards import read_frames, write_table_atomic
    from .labeling import label_counts
    table = next(read_frames([draws_path]))
    table.loc[table["error"] == NO_TEACHER_ERROR, "error"] = None        # fused afresh: the status may change
    fused = fusion_columns(table, num_classes, fusion_cfg, fit)
    write_table_atomic(fused, out_path)
    return label_counts(fused, labels)


def fuse_split(draws, out, labels, fusion_cfg, fit) -> dict:
    """Fuse every shard of ``draws`` (``LabelShards``) into ``out`` (``LabelShards``, emptied first);
    returns the split's summary (``labeling.finish_counts``)."""
    import ray

    from .labeling import add_counts, finish_counts
    from .reuse import remove_tree
    remove_tree(out.root)
    task = ray.remote(num_cpus=FUSE_CPUS)(_fuse_one)
    fit_ref = ray.put(fit)                          # one copy in the object store, not one per task
    todo, pending, counts = list(draws.paths()), [], {}
    in_flight = max(1, int(ray.cluster_resources().get("CPU", 1)))
    while todo or pending:
        # at most one task per declared CPU at a time: every task queued at once makes the raylet start a
        # worker process for each (~140 MB apiece: 20 of them were the 50k-clip run's memory peak)
        while todo and len(pending) < in_flight:
            path = todo.pop(0)
            pending.append(task.remote(path, out.shard_path(os.path.basename(path).rsplit(".", 1)[0]), len(labels),
                                       fusion_cfg, fit_ref, list(labels)))
        done, pending = ray.wait(pending, num_returns=1)
        counts = add_counts(counts, ray.get(done[0]))
    return finish_counts(counts, labels)
