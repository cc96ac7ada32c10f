"""Labels as a folder of Parquet shards, written by the cluster: one shard per slice of the manifest.

Why shards: at millions of clips no single process may hold the labels table. The manifest is cut
into slices from its Parquet metadata alone (``plan_shards``: file, row group, rows), a read task
turns each slice into clip rows, and the pipeline's last stage (``ShardWriter``) writes a slice's
rows as one file once all of them have arrived. A shard is the unit of resume: it is written to a
temporary name and renamed, so it is complete or absent, and a rerun labels only the slices whose
file is missing (the LALM's response cache keeps answers already paid for). The driver holds the
list of slices and per-shard summaries, never a row per clip.

Consumers read shards through ``LabelShards``: as a Ray Dataset (training, the fusion map), one
shard at a time (the driver's streamed statistics), or, for small splits, as one DataFrame.
"""
from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Iterator

import numpy as np
import pandas as pd

SHARD_ROWS = 1024        # clips per shard: ~1-2 MB of draws; the unit of resume and of the fusion map's tasks
SHARD_GLOB = "shard-"
EMPTY_SUFFIX = ".empty"  # a slice with no clip of the split: marked done without a Parquet file


# -- files, local or on object storage ---------------------------------------------------------
def _fs(path: str):
    """(pyarrow filesystem, path within it) for a local path or a URI (s3://, gs://, …)."""
    import pyarrow.fs as pafs
    if "://" in path and not path.startswith("file://"):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path.removeprefix("file://"))


def write_table_atomic(df: pd.DataFrame, path: str, row_group_rows: int | None = None) -> None:
    """Write ``df`` to ``path`` as Parquet so that a reader sees the whole file or none of it: a
    temporary name, then a rename (object stores make the final PUT atomic on their own)."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    fs, where = _fs(path)
    table = pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(None)
    parent = os.path.dirname(where)
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = os.path.join(parent, f".{os.path.basename(where)}.{uuid.uuid4().hex[:8]}.tmp")
        pq.write_table(table, tmp, filesystem=fs, row_group_size=row_group_rows)
        fs.move(tmp, where)
    else:
        pq.write_table(table, where, filesystem=fs, row_group_size=row_group_rows)


def list_files(root: str, suffix: str) -> list[str]:
    """The files under ``root`` whose name ends with ``suffix`` (hidden and temporary ones left out), sorted."""
    import pyarrow.fs as pafs
    fs, where = _fs(root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(where, recursive=False))
    except FileNotFoundError:
        return []
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
                   and not i.base_name.startswith("."))
    return [f"{root.rstrip('/')}/{n}" for n in names]


# -- the manifest, cut into slices ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of row group ``row_group`` of manifest file ``file``: one shard's clips."""

    file: str
    row_group: int
    start: int
    stop: int
    name: str


def manifest_files(manifest: str) -> list[str]:
    """A Parquet manifest is a file or a folder of ``.parquet`` files (local or a URI)."""
    if manifest.endswith(".parquet") and _is_file(manifest):
        return [manifest]
    files = list_files(manifest, ".parquet")
    if not files:
        raise FileNotFoundError(f"manifest not found: {manifest} (a .parquet file or a folder of them)")
    return files


def _is_file(path: str) -> bool:
    import pyarrow.fs as pafs
    fs, where = _fs(path)
    return fs.get_file_info(where).type == pafs.FileType.File


def plan_shards(manifest: str, rows_per_shard: int = SHARD_ROWS) -> list[Slice]:
    """Every slice of the manifest, from the files' Parquet metadata (no row is read): the same
    manifest gives the same slices, so a rerun finds the shards it wrote before."""
    import pyarrow.parquet as pq
    out = []
    for f_idx, path in enumerate(manifest_files(manifest)):
        fs, where = _fs(path)
        meta = pq.ParquetFile(where, filesystem=fs).metadata
        for rg in range(meta.num_row_groups):
            rows = meta.row_group(rg).num_rows
            for k, start in enumerate(range(0, rows, rows_per_shard)):
                out.append(Slice(path, rg, start, min(rows, start + rows_per_shard),
                                 f"{SHARD_GLOB}{f_idx:05d}-{rg:05d}-{k:04d}"))
    return out


def require_manifest_columns(names, path: str) -> None:
    """The columns every manifest needs, checked where it is read (its schema, or a slice's rows)."""
    missing = {"clip_id", "path"} - set(names)
    if missing:
        raise ValueError(f"manifest {path} lacks columns {sorted(missing)}")


def read_slice(s: Slice, split: str | None = None) -> pd.DataFrame:
    """A slice's manifest rows (relative paths made absolute, the split kept), as ``list_inputs`` would give them."""
    import pyarrow.parquet as pq
    fs, where = _fs(s.file)
    df = pq.ParquetFile(where, filesystem=fs).read_row_group(s.row_group).slice(s.start, s.stop - s.start).to_pandas()
    require_manifest_columns(df.columns, s.file)
    if "://" not in s.file:
        base = os.path.dirname(s.file)
        df["path"] = [p if os.path.isabs(p) or "://" in p else os.path.join(base, p) for p in df["path"]]
    if split is not None and "split" in df.columns:
        df = df[df["split"] == split].reset_index(drop=True)
    for col in ("label", "speaker_id", "domain"):
        if col not in df.columns:
            df[col] = None
    return df


@dataclasses.dataclass(frozen=True)
class ManifestSplit:
    """One split of a Parquet manifest, known from one streamed pass over three of its columns: how a
    run holds its adaptation split without a row per clip in the driver. ``digest`` identifies its
    clips (ids and paths, in any order) for reuse; ``mean_seconds`` is 0 without a ``duration_s`` column."""

    path: str
    split: str | None
    clips: int
    mean_seconds: float
    digest: str
    splits_present: frozenset = frozenset()     # every value of the manifest's ``split`` column
    has_labels: bool = False                    # the manifest has a ``label`` column

    def __len__(self) -> int:
        return self.clips

    def to_pandas(self) -> pd.DataFrame:
        """The split as a frame, for a tool that wants one (a small benchmark split)."""
        return pd.concat([read_slice(s, self.split) for s in plan_shards(self.path)], ignore_index=True)


def scan_manifest(manifest: str, split: str | None) -> ManifestSplit:
    """``ManifestSplit`` of ``manifest`` (a file or a folder of them), reading it a row group at a time,
    and checking what a run would otherwise find only after paying for answers: the columns, a split
    with clips, and unique clip ids (8 bytes a clip while checking, then dropped)."""
    import hashlib

    import pyarrow.parquet as pq
    clips, seconds, digest, id_hashes, present, has_labels = 0, 0.0, 0, [], set(), False
    for path in manifest_files(manifest):
        fs, where = _fs(path)
        file = pq.ParquetFile(where, filesystem=fs)
        names = set(file.schema_arrow.names)
        require_manifest_columns(names, path)
        columns = ["clip_id", "path", *(c for c in ("split", "duration_s") if c in names)]
        has_labels |= "label" in names
        for rg in range(file.metadata.num_row_groups):
            df = file.read_row_group(rg, columns=columns).to_pandas()
            present |= set(df["split"].dropna().unique()) if "split" in df else set()
            if split is not None and "split" in df:
                df = df[df["split"] == split]
            clips += len(df)
            seconds += float(df["duration_s"].fillna(0).sum()) if "duration_s" in df else 0.0
            id_hashes.append(pd.util.hash_array(df["clip_id"].astype(str).to_numpy()))
            digest = (digest + shard_rows_digest(df, ["clip_id", "path"])[1]) % 2**64
    ids = np.sort(np.concatenate(id_hashes)) if id_hashes else np.zeros(0, np.uint64)
    if len(ids) and (ids[1:] == ids[:-1]).any():
        raise ValueError(f"duplicate clip_id in {manifest} (split {split!r}): every clip needs its own id")
    key = f"{clips}:{digest}:{split}".encode()
    return ManifestSplit(manifest, split, clips, seconds / clips if clips else 0.0, hashlib.sha256(key).hexdigest(),
                         frozenset(present), has_labels)


def write_manifest(df: pd.DataFrame, path: str, rows_per_shard: int = SHARD_ROWS) -> str:
    """A manifest held in memory (a folder listing, a small split) as a Parquet manifest whose row
    groups are the shards' slices: the one form the labelling pipeline reads."""
    keep = [c for c in df.columns if c != "audio"]
    df = df[keep].reset_index(drop=True)
    if "path" in df:    # a relative path in a frame is relative to here; in a manifest file, to the file's folder
        df["path"] = [p if not isinstance(p, str) or os.path.isabs(p) or "://" in p else os.path.abspath(p)
                      for p in df["path"]]
    write_table_atomic(df, path, row_group_rows=rows_per_shard)
    return path


def read_frames(paths: list[str], columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq
    for path in paths:
        fs, where = _fs(path)
        yield pq.read_table(where, filesystem=fs, columns=columns).to_pandas()


# -- the shards of a split's labels -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LabelShards:
    """A folder of label shards (``shard-*.parquet``), how every stage after labelling reads them."""

    root: str

    def paths(self) -> list[str]:
        return list_files(self.root, ".parquet")

    def done(self) -> set[str]:
        """Names of the slices already written (with clips, or marked empty)."""
        return {os.path.basename(p).rsplit(".", 1)[0] for p in self.paths() + list_files(self.root, EMPTY_SUFFIX)}

    @property
    def columns(self) -> list[str]:
        import pyarrow.parquet as pq
        paths = self.paths()
        if not paths:
            return []
        fs, where = _fs(paths[0])
        return list(pq.read_schema(where, filesystem=fs).names)

    def frames(self, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        """One shard at a time (memory: one shard, whatever the split's size)."""
        return read_frames(self.paths(), columns)

    def dataset(self, columns: list[str] | None = None):
        """The shards as a lazy Ray Dataset, read by the cluster's tasks."""
        import ray.data
        paths = self.paths()
        if not paths:
            raise FileNotFoundError(f"no label shards under {self.root}")
        return ray.data.read_parquet(paths, columns=columns)

    def to_pandas(self, columns: list[str] | None = None) -> pd.DataFrame:
        """The whole split in one frame: for the labelled dev and test splits and small runs only."""
        frames = list(self.frames(columns))
        return pd.concat(frames, ignore_index=True).sort_values("clip_id").reset_index(drop=True) if frames \
            else pd.DataFrame(columns=columns or ["clip_id", "error"])

    def head(self, max_rows: int, columns: list[str] | None = None) -> pd.DataFrame:
        """The first shards, up to ``max_rows`` rows: what a plot of the split needs."""
        out, n = [], 0
        for frame in self.frames(columns):
            out.append(frame)
            n += len(frame)
            if n >= max_rows:
                break
        return pd.concat(out, ignore_index=True) if out else pd.DataFrame()

    def prune(self, keep: set[str]) -> int:
        """Delete what is not a shard of the current plan: shards of another ``shard_rows`` or manifest,
        and temporary files a killed writer left behind. Returns how many files went."""
        import pyarrow.fs as pafs
        fs, where = _fs(self.root)
        try:
            infos = fs.get_file_info(pafs.FileSelector(where, recursive=False))
        except FileNotFoundError:
            return 0
        gone = 0
        for info in infos:
            stem = info.base_name.split(".", 1)[0] if not info.base_name.startswith(".") else None
            if info.type == pafs.FileType.File and (stem is None or stem not in keep):
                fs.delete_file(info.path)
                gone += 1
        return gone

    def shard_path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}.parquet"

    def mark_empty(self, name: str) -> None:
        fs, where = _fs(f"{self.root.rstrip('/')}/{name}{EMPTY_SUFFIX}")
        fs.create_dir(os.path.dirname(where), recursive=True)
        with fs.open_output_stream(where):
            pass


# -- the pipeline's ends: a slice in, a shard out -------------------------------------------------
def slice_rows(batch: pd.DataFrame, split: str | None, audio_cfg, root: str) -> pd.DataFrame:
    """Ray Data UDF over slices (one row each): the slices' clips, long files split into windows
    (``data.expand_segments``), each row tagged with its shard and the shard's row count, which is
    how the writer knows a shard is whole. A slice without a clip of the split is marked done here."""
    from .data import expand_segments
    shards, out = LabelShards(root), []
    for rec in batch.to_dict("records"):
        s = Slice(**rec)
        rows = read_slice(s, split)
        if rows.empty:
            shards.mark_empty(s.name)
            continue
        rows = expand_segments(rows, audio_cfg)
        out.append(rows.assign(shard=s.name, shard_rows=len(rows)))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame({"shard": pd.Series(dtype=object)})


class ShardWriter:
    """The last stage (an actor): holds each shard's rows until all ``shard_rows`` have arrived, then
    writes the shard (``write_table_atomic``), sorted by clip id. Emits one row per shard written.

    Rows of one shard come through different batches, actors and nodes, so one writer collects
    them; it holds only the shards in flight (Ray Data works through the slices roughly in order).
    If it dies its held rows are gone, their shards are missing, and ``label_target`` labels them
    again, from the response cache."""

    def __init__(self, root: str):
        import ray
        self.shards, self.held = LabelShards(root), {}
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        written = []
        for name, rows in batch.groupby("shard", sort=False):
            parts = self.held.setdefault(name, [])
            parts.append(rows)
            if sum(len(p) for p in parts) >= int(rows["shard_rows"].iloc[0]):
                table = pd.concat(self.held.pop(name), ignore_index=True).drop(columns=["shard_rows"])
                table = table.sort_values("clip_id").reset_index(drop=True)
                write_table_atomic(table, self.shards.shard_path(name))
                written.append({"shard": name, "rows": len(table),
                                "errors": int(table["error"].notna().sum()), "node": self.node})
        return pd.DataFrame(written, columns=["shard", "rows", "errors", "node"])


def slices_dataset(slices: list[Slice]):
    """The slices to label as a Ray Dataset, one block per slice (so the reads spread over the cluster)."""
    import ray.data
    items = [dataclasses.asdict(s) for s in slices]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


def shard_rows_digest(batch: pd.DataFrame, columns: list[str]) -> tuple[int, int]:
    """(rows, sum of a 64-bit hash per row of ``columns`` mod 2^64): a fingerprint of a split's rows
    that is the same however the rows are batched or ordered, summed over batches by the driver."""
    if not len(batch):
        return 0, 0
    hashed = pd.util.hash_pandas_object(batch[columns].astype(str), index=False).to_numpy(np.uint64)
    return len(batch), int(hashed.sum(dtype=np.uint64))
