"""Teachers are a list end to end: a third teacher (a second source model, ``source2``) is labelled,
fused, weighted on dev, carried into training and re-fused online next to the EMA teacher."""
import os

import numpy as np
import pandas as pd
import pytest

from mifuse_ray.calibration import choose_fusion, weight_grid
from mifuse_ray.config import FusionConfig, MiFuseConfig
from mifuse_ray.fused_labels import fit_table, fusion_columns, teacher_names

C = 4


def _draws(y, accuracy, n, rng):
    """n draws per clip from a teacher right with probability ``accuracy``."""
    probs = np.full((len(y), n, C), (1 - accuracy) / (C - 1))
    wrong = (y + rng.integers(1, C, size=len(y))) % C
    hit = rng.random((len(y), n)) < 0.8
    for i, (t, w) in enumerate(zip(y, wrong)):
        probs[i, :, t] = np.where(hit[i], accuracy, probs[i, :, t])
        probs[i, :, w] = np.where(hit[i], probs[i, :, w], accuracy)
    probs /= probs.sum(-1, keepdims=True)
    votes = np.array([[rng.choice(C, p=p) for p in clip] for clip in probs])
    return [list(v) for v in votes], [p.tolist() for p in probs]


def three_teacher_table(n_clips=240, seed=0, accuracies=(0.45, 0.4, 0.85)):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n_clips)
    labels = MiFuseConfig().labels
    table = pd.DataFrame({"clip_id": [f"c{i:04d}" for i in range(n_clips)], "error": None,
                          "label": [labels[k] for k in y]})
    for (votes_col, probs_col), acc, n in zip([("lalm_votes", "lalm_soft"), ("source_votes", "source_probs"),
                                               ("source2_votes", "source2_probs")], accuracies, (5, 6, 6)):
        table[votes_col], table[probs_col] = _draws(y, acc, n, rng)
    return table, y


def test_teacher_names_come_from_the_table_in_fusion_order():
    table, _ = three_teacher_table(20)
    table["source10_votes"], table["source10_probs"] = table["source2_votes"], table["source2_probs"]
    assert teacher_names(table) == ["lalm", "source", "source2", "source10"]
    assert teacher_names(["lalm_votes", "source_votes"]) == ["lalm", "source"]


def test_fusion_columns_weigh_every_teacher():
    table, y = three_teacher_table()
    cfg = FusionConfig(weighting="exp")
    out = fusion_columns(table, C, cfg, fit_table(table, C, cfg))
    weights = out[["weight_lalm", "weight_source", "weight_source2"]].to_numpy()
    assert np.allclose(weights.sum(1), 1.0) and (weights > 0).all()
    assert {"source2_pred", "source2_pbar", "source2_vote_entropy"} <= set(out.columns)
    # the one-teacher variants still mean one teacher: the others get weight 0, not a share
    lalm_only = fusion_columns(table, C, FusionConfig(weighting="fixed", fixed_weights=[1.0, 0.0],
                                                      balance_teachers="none", balance_fused="none"))
    assert (lalm_only["weight_source2"] == 0).all() and (lalm_only["fused_pred"] == lalm_only["lalm_pred"]).all()


def test_dev_weights_find_the_best_of_three_teachers():
    assert len(weight_grid(3)) == 55 and np.allclose(weight_grid(3).sum(1), 1)
    assert np.allclose(weight_grid(2)[:, 0], np.arange(0.05, 1.0, 0.1))      # two teachers: as before
    adapt, _ = three_teacher_table(seed=1)
    dev, _ = three_teacher_table(seed=2)
    choice = choose_fusion(adapt, dev, FusionConfig(), MiFuseConfig().labels)
    w = choice.config.fixed_weights
    assert len(w) == 3 and w[2] == max(w), w            # source2 is by far the most accurate teacher
    assert "source2" in choice.note


def test_a_third_teacher_through_labelling_and_training(ray_cluster, source_model, demo_root, tmp_path):
    """The labelling pipeline with a second source checkpoint, then a student that re-fuses online
    with all three teachers (the EMA in the source model's place)."""
    import torch
    from mifuse_ray.audio import list_inputs
    from mifuse_ray.demo.lalm_server import BackgroundServer, ServerConfig
    from mifuse_ray.labeling import label_target
    from mifuse_ray.models.cnn import LogMelCNN
    from mifuse_ray.train.labels import training_table
    from mifuse_ray.train.student import train_student
    torch.manual_seed(1)
    second = str(tmp_path / "second_source")
    LogMelCNN().save(second)
    clips = list_inputs(os.path.join(demo_root, "podcast", "manifest.parquet"), split="adapt").head(40)
    cfg = MiFuseConfig()
    cfg.source.passes_per_clip, cfg.lalm.answers_per_clip = 3, 2
    cfg.source.extra_checkpoints = (second,)
    with BackgroundServer(ServerConfig(labels=tuple(cfg.labels))) as server:
        res = label_target(cfg, clips, str(tmp_path / "labels"), source_model, server.url)
    table = res.table
    assert teacher_names(table) == ["lalm", "source", "source2"]
    assert table["error"].isna().all() and len(table) == len(clips)
    assert all(len(v) == 3 for v in table["source2_votes"])
    assert not np.allclose(np.stack(table["source2_pbar"]), np.stack(table["source_pbar"]))   # another model
    assert set(res.summary["predicted_classes"]) == {"lalm", "source", "source2", "fused"}
    assert "uar_source2" in res.summary and "weight_source2" in table
    stored = pd.read_parquet(res.labels_path)
    assert {"source2_votes", "source2_probs", "weight_source2"} <= set(stored.columns)

    train_rows = training_table(table, cfg, cfg.fusion, None)
    assert {"lalm_votes", "source2_votes", "source2_probs"} <= set(train_rows.columns)
    assert "source_votes" not in train_rows           # the EMA takes the source model's place
    cfg.train.epochs, cfg.train.batch_size, cfg.train.cpus_per_worker = 1, 8, 0.5
    cfg.train.online_fusion_from_epoch, cfg.train.online_fusion_gate = 0, False
    student = train_student(cfg, table, None, source_model, str(tmp_path / "student"), run_name="three")
    assert student.history[-1]["online_fusion"] is True
    assert np.isfinite(student.history[-1]["train_loss"])


@pytest.mark.parametrize("count", [1, 3])
def test_fixed_weights_must_name_every_teacher(count, tmp_path):
    """A fixed-weight fusion with the wrong number of weights is a user error, found before labelling."""
    from mifuse_ray.config import ConfigError
    from mifuse_ray.inputs import Inputs, check_run
    cfg = MiFuseConfig()
    cfg.fusion.weighting, cfg.fusion.fixed_weights = "fixed", [1.0 / count] * count
    cfg.source.extra_checkpoints = ("a", "b") if count == 1 else ()
    inputs = Inputs("t", "c", pd.DataFrame({"clip_id": ["x"]}), None, None)
    with pytest.raises(ConfigError, match="fixed_weights needs"):
        check_run(cfg, inputs)
