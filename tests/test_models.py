"""Models: HF wrapper, MC dropout, checkpoints, LoRA students."""
import os

import numpy as np
import pytest
import torch

from mifuse_ray.models.base import load_model
from mifuse_ray.models.cnn import LogMelCNN
from mifuse_ray.models.mc import mc_seeds
from mifuse_ray.models.mc import mc_predict
from mifuse_ray.source_teacher import SourceTeacherStage


def batch(n=3, seconds=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    wav = 0.1 * torch.randn(n, int(16000 * seconds), generator=g)
    lengths = torch.tensor([wav.shape[1] - 800 * i for i in range(n)])
    return wav, lengths


def test_hf_wrapper_loads_from_local_directory_and_round_trips(tiny_hf_dir, tmp_path):
    model = load_model(tiny_hf_dir)
    assert model.labels == ["neutral", "happy", "angry", "sad"]
    wav, lengths = batch()
    with torch.no_grad():
        a = model(wav, lengths)
        b = model(wav, lengths)   # eval: no SpecAugment, no LayerDrop → deterministic
    torch.testing.assert_close(a, b)
    model.save(str(tmp_path / "saved"))
    again = load_model(str(tmp_path / "saved"))
    with torch.no_grad():
        torch.testing.assert_close(again(wav, lengths), a)


@pytest.mark.parametrize("kind", ["cnn", "hf"])
def test_mc_dropout_passes_differ_when_on_and_match_when_off(kind, tiny_hf_dir):
    model = LogMelCNN() if kind == "cnn" else load_model(tiny_hf_dir)
    model.eval()
    wav, lengths = batch()
    seeds = mc_seeds(0, ["a", "b", "c"], 5)
    out = mc_predict(model, wav, lengths, seeds, scope="full")
    assert out.probs.shape == (3, 5, 4)
    assert (out.probs[:, 0] - out.probs[:, 1]).abs().max() > 1e-4          # dropout on: passes differ
    off = mc_predict(model, wav, lengths, seeds, scope="full", p_override=0.0)
    torch.testing.assert_close(off.probs, off.det_probs[:, None].expand_as(off.probs))  # dropout off: identical
    assert model.training is False
    assert all(not m.training for m in model.modules())                     # nothing left switched on


def test_full_scope_batched_equals_loop_and_head_scope_runs():
    torch.manual_seed(0)
    model = LogMelCNN().eval()
    wav, lengths = batch()
    seeds = mc_seeds(3, ["a", "b", "c"], 4)
    batched = mc_predict(model, wav, lengths, seeds, scope="full", full_strategy="batched")
    looped = mc_predict(model, wav, lengths, seeds, scope="full", full_strategy="loop")
    torch.testing.assert_close(batched.probs, looped.probs, atol=1e-5, rtol=1e-4)
    head = mc_predict(model, wav, lengths, seeds, scope="head")
    assert (head.probs[:, 0] - head.probs[:, 1]).abs().max() > 1e-4


def test_source_stage_results_do_not_depend_on_batching(tmp_path):
    torch.manual_seed(0)
    LogMelCNN().save(str(tmp_path / "m"))
    stage = SourceTeacherStage(str(tmp_path / "m"), passes_per_clip=6, scope="full", seed=5)
    rng = np.random.default_rng(0)
    audio = [0.1 * rng.standard_normal(int(16000 * s)).astype(np.float32) for s in (1.0, 1.7, 0.6, 2.2)]
    ids = ["w", "x", "y", "z"]
    together = stage.predict(ids, audio)
    for i in range(4):
        alone = stage.predict([ids[i]], [audio[i]])
        np.testing.assert_allclose(alone["probs"][0], together["probs"][i], atol=1e-5)
        np.testing.assert_array_equal(alone["votes"][0], together["votes"][i])


def test_models_stage_gives_each_model_what_it_gives_alone(tmp_path):
    """The evaluation's one pass over the audio (``ModelsStage``) predicts for each model exactly what
    that model's own ``PredictorStage`` does, the clip that failed to decode included."""
    import pandas as pd
    from mifuse_ray.predict import PREDICTION_COLUMNS, ModelsStage, PredictorStage
    paths = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        LogMelCNN().save(str(tmp_path / name))
        paths[name] = str(tmp_path / name)
    rng = np.random.default_rng(0)
    clips = pd.DataFrame({"clip_id": ["w", "x", "y"], "error": [None, "decode_failed", None],
                          "audio": [0.1 * rng.standard_normal(16000 * s).astype(np.float32) for s in (1, 0, 2)]})
    together = ModelsStage(paths)(clips)
    assert sorted(together.columns) == sorted(["model", *PREDICTION_COLUMNS])
    for name, path in paths.items():
        alone = PredictorStage(checkpoint=path, passes_per_clip=0, amp=False)(clips)
        mine = together[together["model"] == name].drop(columns="model").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, alone)
    a, b = (np.stack(together.loc[(together.model == m) & together.error.isna(), "probs"].to_list()) for m in "ab")
    assert np.abs(a - b).max() > 1e-3                                  # two different models, not one twice


def test_models_with_one_trunk_share_its_pass_and_predict_as_alone(tmp_path, monkeypatch):
    """A head-only student keeps its source model's trunk, so the evaluation's ``ModelsStage`` runs that
    trunk once for both and gives each model what it gives alone; a model whose trunk differs (another
    seed) runs its own."""
    import pandas as pd
    from mifuse_ray.predict import ModelsStage, PredictorStage
    torch.manual_seed(0)
    source = LogMelCNN()
    source.save(str(tmp_path / "source"))
    with torch.no_grad():
        for p in source.head_module().parameters():
            p.add_(0.5 * torch.randn_like(p))         # a student that learnt its head only
    source.save(str(tmp_path / "student"))
    torch.manual_seed(1)
    LogMelCNN().save(str(tmp_path / "other"))
    paths = {name: str(tmp_path / name) for name in ("source", "student", "other")}
    stage = ModelsStage(paths)
    assert stage.groups == [["source", "student"], ["other"]]
    calls = []
    trunk = LogMelCNN.trunk
    monkeypatch.setattr(LogMelCNN, "trunk", lambda self, *a: calls.append(1) or trunk(self, *a))
    rng = np.random.default_rng(0)
    clips = pd.DataFrame({"clip_id": ["w", "x", "y"], "error": [None, "decode_failed", None],
                          "audio": [0.1 * rng.standard_normal(16000 * s).astype(np.float32) for s in (1, 0, 2)]})
    together = stage(clips)
    assert len(calls) == 2 * 2                     # two trunks, each over the clips' two padded lengths
    monkeypatch.setattr(LogMelCNN, "trunk", trunk)
    for name, path in paths.items():
        alone = PredictorStage(checkpoint=path, passes_per_clip=0, amp=False)(clips)
        mine = together[together["model"] == name].drop(columns="model").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine.drop(columns=["probs", "confidence"]), alone.drop(columns=["probs", "confidence"]))
        ok = alone["error"].isna()
        np.testing.assert_allclose(np.stack(mine.probs[ok]), np.stack(alone.probs[ok]), atol=1e-6)
        assert mine.probs[~ok].isna().all()
    s, t = (np.stack(together.loc[(together.model == m) & together.error.isna(), "probs"].to_list()) for m in ("source", "student"))
    assert np.abs(s - t).max() > 1e-3                                  # the student's own head, not the source's


def test_cnn_checkpoint_is_self_describing(tmp_path):
    model = LogMelCNN(labels=["calm", "joy", "rage"])
    model.save(str(tmp_path / "c"))
    loaded = load_model(str(tmp_path / "c"), dropout_override=0.5)
    assert loaded.labels == ["calm", "joy", "rage"] and loaded.num_classes == 3
    assert all(m.p == 0.5 for m in loaded.modules() if isinstance(m, torch.nn.Dropout))
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "nothing"))


def test_lora_student_saves_only_the_adapter_and_round_trips_exactly(tiny_hf_dir, tmp_path):
    from mifuse_ray.models.lora import apply_lora, trainable_fraction
    base = load_model(tiny_hf_dir)
    student = apply_lora(base, tiny_hf_dir, rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    trainable, total = trainable_fraction(student)
    print(f"LoRA r=4 on q/v + head: {trainable} of {total} parameters trainable ({trainable / total:.1%})")
    assert 0 < trainable < 0.25 * total
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "projector" in n or "classifier" in n for n in names)
    # one optimiser step moves the adapter and head only
    wav, lengths = batch()
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5)
    student.eval()
    torch.nn.functional.cross_entropy(student(wav, lengths), torch.tensor([0, 1, 2])).backward()
    opt.step()
    with torch.no_grad():
        want = student(wav, lengths)
    student.save(str(tmp_path / "adapter"))
    files = os.listdir(tmp_path / "adapter")
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    adapter_bytes = os.path.getsize(tmp_path / "adapter" / "adapter_model.safetensors")
    base_bytes = os.path.getsize(os.path.join(tiny_hf_dir, "model.safetensors"))
    assert adapter_bytes < 0.5 * base_bytes
    again = load_model(str(tmp_path / "adapter"))
    assert again.arch == "hf_lora" and again.labels == student.labels
    with torch.no_grad():
        torch.testing.assert_close(again(wav, lengths), want, rtol=0, atol=0)     # exact
        assert not torch.equal(load_model(tiny_hf_dir)(wav, lengths), want)         # and not the base model


@pytest.mark.parametrize("kind", ["cnn", "hf"])
def test_head_on_base_checkpoint_keeps_only_the_head_and_round_trips_exactly(kind, tiny_hf_dir, tmp_path):
    from mifuse_ray.models.base import HEAD_WEIGHTS, save_head_on_base
    base_dir = tiny_hf_dir if kind == "hf" else str(tmp_path / "base")
    if kind == "cnn":
        LogMelCNN(labels=["calm", "joy", "rage"]).save(base_dir)
    student = load_model(base_dir)
    student.requires_grad_(False)
    for layer in student.head_layers():
        layer.requires_grad_(True)
    with torch.no_grad():                                    # the head moves, the trunk does not
        for p in student.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    wav, lengths = batch()
    with torch.no_grad():
        want = student.eval()(wav, lengths)
    save_head_on_base(student, str(tmp_path / "head"), base_dir)
    assert sorted(os.listdir(tmp_path / "head")) == sorted([HEAD_WEIGHTS, "mifuse_model.json"])
    saved = torch.load(str(tmp_path / "head" / HEAD_WEIGHTS), weights_only=True)
    assert 0 < sum(v.numel() for v in saved.values()) < 0.5 * sum(p.numel() for p in student.parameters())
    again = load_model(str(tmp_path / "head"))
    assert again.labels == student.labels
    with torch.no_grad():
        torch.testing.assert_close(again(wav, lengths), want, rtol=0, atol=0)             # exact
        assert not torch.equal(load_model(base_dir)(wav, lengths), want)                   # not the base
    next(p for name, p in student.named_parameters() if name not in saved).requires_grad_(True)
    with pytest.raises(ValueError, match="learns outside"):        # a trunk that learns is not dropped
        save_head_on_base(student, str(tmp_path / "refused"), base_dir)


def test_head_on_base_names_its_missing_base(tmp_path):
    from mifuse_ray.models.base import save_head_on_base
    LogMelCNN().save(str(tmp_path / "base"))
    frozen = load_model(str(tmp_path / "base")).requires_grad_(False)
    save_head_on_base(frozen, str(tmp_path / "head"), str(tmp_path / "base"))
    os.rename(tmp_path / "base", tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="put that checkpoint back"):
        load_model(str(tmp_path / "head"))


def test_models_on_the_stored_trunk_output_run_no_trunk_and_predict_as_alone(tmp_path, monkeypatch):
    """Rows that carry the source model's trunk output as labelling stored it: the models with that
    trunk run their heads on it (no trunk pass), a model with another trunk still runs its own, and
    each predicts what it predicts alone from the audio."""
    import pandas as pd
    from mifuse_ray.models.base import TRUNK_FEATURES
    from mifuse_ray.predict import ModelsStage, PredictorStage
    torch.manual_seed(0)
    source = LogMelCNN()
    source.save(str(tmp_path / "source"))
    with torch.no_grad():
        for p in source.head_module().parameters():
            p.add_(0.5 * torch.randn_like(p))
    source.save(str(tmp_path / "student"))
    torch.manual_seed(1)
    LogMelCNN().save(str(tmp_path / "other"))
    paths = {name: str(tmp_path / name) for name in ("student", "other")}      # the source itself not among them
    rng = np.random.default_rng(0)
    clips = pd.DataFrame({"clip_id": ["w", "y"], "error": [None, None],
                          "audio": [0.1 * rng.standard_normal(16000 * s).astype(np.float32) for s in (1, 2)]})
    stored = PredictorStage(checkpoint=str(tmp_path / "source"), passes_per_clip=0).with_trunk_output(clips)
    rows = clips.assign(**{TRUNK_FEATURES: stored[TRUNK_FEATURES]})
    stage = ModelsStage(paths, stored_trunk_of=str(tmp_path / "source"))
    assert stage.on_stored == ["student"]
    calls = []
    trunk = LogMelCNN.trunk
    monkeypatch.setattr(LogMelCNN, "trunk", lambda self, *a: calls.append(1) or trunk(self, *a))
    together = stage(rows)
    assert len(calls) == 2                         # the other model's trunk only, over the clips' two lengths
    monkeypatch.setattr(LogMelCNN, "trunk", trunk)
    for name, path in paths.items():
        alone = PredictorStage(checkpoint=path, passes_per_clip=0, amp=False)(clips)
        mine = together[together["model"] == name].drop(columns="model").reset_index(drop=True)
        assert list(mine.pred) == list(alone.pred) and TRUNK_FEATURES not in mine
        np.testing.assert_allclose(np.stack(mine.probs), np.stack(alone.probs), atol=1e-6)
    without = ModelsStage(paths, stored_trunk_of=str(tmp_path / "source"))(clips)    # rows without it: the audio
    pd.testing.assert_frame_equal(without.drop(columns="probs"), together.drop(columns="probs"))


def test_evaluation_takes_the_stored_trunk_only_where_every_test_clip_has_one():
    import pandas as pd
    from types import SimpleNamespace
    from mifuse_ray.evaluation import test_trunk_stored
    from mifuse_ray.models.base import TRUNK_FEATURES
    from mifuse_ray.train.labels import with_stored_trunk
    test = pd.DataFrame({"clip_id": ["a", "b"]})
    table = pd.DataFrame({"clip_id": ["b", "a", "z"], "error": None, TRUNK_FEATURES: [[1.0], [2.0], [3.0]]})
    assert test_trunk_stored(SimpleNamespace(table=table), test)
    assert list(with_stored_trunk(test, table)[TRUNK_FEATURES]) == [[2.0], [1.0]]      # the test split's order
    assert not test_trunk_stored(None, test)
    assert not test_trunk_stored(SimpleNamespace(table=table.drop(columns=[TRUNK_FEATURES])), test)
    assert not test_trunk_stored(SimpleNamespace(table=table.assign(**{TRUNK_FEATURES: [[1.0], None, [3.0]]})), test)
    assert not test_trunk_stored(SimpleNamespace(table=table.assign(parent_id=[None, "p", None])), test)
    assert not test_trunk_stored(SimpleNamespace(table=table.iloc[:1]), test)          # a test clip never labelled
