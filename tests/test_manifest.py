"""A Parquet manifest read as a split's counts and digest (``label_shards.scan_manifest``), never as a frame."""
import pandas as pd
import pytest

from mifuse_ray.label_shards import plan_shards, scan_manifest


def manifest(tmp_path, rows, name="m.parquet", row_group_size=3):
    path = str(tmp_path / name)
    pd.DataFrame(rows).to_parquet(path, row_group_size=row_group_size)
    return path


def rows(n, split_of=lambda i: "adapt" if i % 3 else "test"):
    return [{"clip_id": f"c{i:02d}", "path": f"a/{i}.wav", "split": split_of(i), "label": "happy",
             "duration_s": 1.0 + i % 2} for i in range(n)]


def test_a_split_is_counted_from_its_row_groups(tmp_path):
    path = manifest(tmp_path, rows(10))
    m = scan_manifest(path, "adapt")
    expected = pd.DataFrame(rows(10)).query("split == 'adapt'")
    assert (m.clips, len(m)) == (len(expected), len(expected))
    assert m.mean_seconds == pytest.approx(expected["duration_s"].mean())
    assert m.splits_present == {"adapt", "test"} and m.has_labels
    assert sorted(m.to_pandas()["clip_id"]) == sorted(expected["clip_id"])
    assert len(plan_shards(path, 2)) == 7            # row groups of 3, 3, 3 and 1 rows, in slices of at most 2


def test_the_digest_names_the_clips_not_their_order_or_row_groups(tmp_path):
    a = scan_manifest(manifest(tmp_path, rows(10), "a.parquet"), "adapt")
    b = scan_manifest(manifest(tmp_path, rows(10)[::-1], "b.parquet", row_group_size=4), "adapt")
    assert a.digest == b.digest
    moved = rows(10)
    moved[1]["path"] = "b/1.wav"
    assert scan_manifest(manifest(tmp_path, moved, "c.parquet"), "adapt").digest != a.digest
    assert scan_manifest(manifest(tmp_path, rows(10), "d.parquet"), "test").digest != a.digest


def test_a_duplicate_id_or_a_missing_column_is_found_before_labelling(tmp_path):
    dup = rows(6)
    dup[4]["clip_id"] = dup[1]["clip_id"]
    with pytest.raises(ValueError, match="duplicate clip_id"):
        scan_manifest(manifest(tmp_path, dup, "dup.parquet"), "adapt")
    with pytest.raises(ValueError, match=r"lacks columns \['path'\]"):
        scan_manifest(manifest(tmp_path, [{"clip_id": "x"}], "nopath.parquet"), None)


def test_a_run_counts_and_prices_a_streamed_split_with_its_frames(tmp_path):
    from mifuse_ray.config import MiFuseConfig
    from mifuse_ray.inputs import Inputs
    from mifuse_ray.labeling import estimate_spend
    adapt = scan_manifest(manifest(tmp_path, rows(10)), "adapt")          # 6 clips, 1.5 s on average
    test = pd.DataFrame(rows(10)).query("split == 'test'").reset_index(drop=True)      # 4 clips
    inputs = Inputs("m.parquet", "ckpt", adapt, None, test)
    clips, seconds = inputs.clip_totals()
    assert clips == 10 and seconds == pytest.approx((6 * 1.5 + test["duration_s"].sum()) / 10)
    spend = estimate_spend(MiFuseConfig(), inputs.clip_totals())
    assert spend["clips"] == spend["clips_asked"] == 10
    assert spend["audio_seconds_sent"] == pytest.approx(spend["requests"] * seconds)
