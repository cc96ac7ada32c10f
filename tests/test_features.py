"""The stored trunk output (train.features): what the source stage stores, the head fed from it, and
when a run may learn on it instead of the audio."""
import dataclasses

import numpy as np
import pytest
import torch

from mifuse_ray.config import MiFuseConfig
from mifuse_ray.models.base import TRUNK_FEATURES, OnStoredTrunk
from mifuse_ray.models.cnn import LogMelCNN
from mifuse_ray.models.mc import mc_predict, mc_seeds
from mifuse_ray.train.features import learns_on_stored_trunk, waveform_needs
from mifuse_ray.train.modes import MODES


def _clips(seconds=(1.0, 1.7, 0.6), seed=0):
    rng = np.random.default_rng(seed)
    return [0.1 * rng.standard_normal(int(16000 * s)).astype(np.float32) for s in seconds]


def test_the_head_on_the_stored_output_is_the_model_on_the_audio():
    """OnStoredTrunk(model)(pooled) gives the model's logits, and head-scope MC dropout on it gives the
    same draws as on the audio (same seeds): the EMA teacher's re-fusion passes need no audio."""
    from mifuse_ray.data import pad_batch
    torch.manual_seed(0)
    model = LogMelCNN().eval()
    wav, lengths = (torch.from_numpy(a) for a in pad_batch(_clips()))
    with torch.no_grad():
        pooled = model.pooled(model.trunk(wav, lengths))
        torch.testing.assert_close(OnStoredTrunk(model)(pooled), model(wav, lengths))
    seeds = mc_seeds(3, ["a", "b", "c"], 5)
    on_audio = mc_predict(model, wav, lengths, seeds, scope="head")
    on_stored = mc_predict(OnStoredTrunk(model), pooled, torch.zeros(3, dtype=torch.long), seeds, scope="head")
    assert (on_audio.probs[:, 0] - on_audio.probs[:, 1]).abs().max() > 1e-4        # the head's dropout is on
    torch.testing.assert_close(on_stored.probs, on_audio.probs)
    torch.testing.assert_close(on_stored.det_probs, on_audio.det_probs)
    assert sum(p.numel() for p in OnStoredTrunk(model).parameters()) == sum(p.numel() for p in model.parameters())


def test_the_source_stage_stores_the_deterministic_trunk_output(tmp_path):
    """Each clip's stored vector is the trunk's eval-mode output on that clip alone, padded to its
    length bucket as every prediction of the stage is, whatever the MC scope (full-scope passes run the
    trunk with dropout; the stored output is the clean pass's)."""
    from mifuse_ray.data import pad_batch
    from mifuse_ray.source_teacher import PAD_BUCKET_S
    import pandas as pd
    from mifuse_ray.source_teacher import SourceTeacherStage
    torch.manual_seed(0)
    LogMelCNN().save(str(tmp_path / "m"))
    stage = SourceTeacherStage(str(tmp_path / "m"), passes_per_clip=4, scope="full", seed=5)
    audio = _clips()
    out = stage(pd.DataFrame({"clip_id": ["x", "y", "z", "bad"], "error": [None, None, None, "decode_failed"],
                              "audio": audio + [np.zeros(0, np.float32)]}))
    assert out[TRUNK_FEATURES].iloc[3] is None                          # an error row stores nothing
    for i, clip in enumerate(audio):
        bucket = int(PAD_BUCKET_S * 16000)
        wav, lengths = pad_batch([clip], -(-len(clip) // bucket) * bucket)
        with torch.no_grad():
            alone = stage.model.pooled(stage.model.trunk(torch.from_numpy(wav), torch.from_numpy(lengths)))
        np.testing.assert_allclose(out[TRUNK_FEATURES].iloc[i], alone[0].numpy(), atol=1e-4)


def _cfg(**train):
    cfg = MiFuseConfig()
    cfg.train = dataclasses.replace(cfg.train, **train)
    return cfg


@pytest.mark.parametrize("train,mode,needs", [
    ({}, "mifuse", "train.augment"),                                       # the default augments the waveform
    ({"augment": False}, "mifuse", None),
    ({"augment": False}, "lalm_labels", None),
    ({"augment": False}, "shot_im", "the trunk learns"),                   # SHOT-IM adapts its trunk
    ({"augment": False, "trainable": "all"}, "mifuse", "the trunk learns"),
    ({"augment": False, "consistency_weight": 1.0}, "mifuse", "train.consistency_weight"),
    ({"augment": False, "consistency_weight": 1.0}, "no_ema", None),      # a mode without the term ignores it
    ({"augment": False, "cka_weight": 0.5}, "mifuse", "distillation"),
    ({"augment": False, "adapt_norm": True}, "mifuse", "train.adapt_norm"),
    ({"augment": False, "ema_mc_scope": "full"}, "mifuse", "train.ema_mc_scope"),
    ({"augment": False, "ema_mc_scope": "full"}, "lalm_labels", None),    # no EMA teacher to sample
])
def test_what_needs_the_audio(train, mode, needs):
    found = waveform_needs(_cfg(**train), MODES[mode])
    assert (found[0].startswith(needs) if needs else found == [])


def test_auto_learns_on_the_stored_output_only_where_every_table_has_it():
    import pandas as pd
    cfg = _cfg(augment=False)
    with_it = pd.DataFrame({"clip_id": ["a", "b"], "error": [None, "decode_failed"], TRUNK_FEATURES: [[0.1, 0.2], None]})
    without = with_it.drop(columns=[TRUNK_FEATURES])
    assert learns_on_stored_trunk(cfg, MODES["mifuse"], with_it, with_it) == (True, "")
    assert learns_on_stored_trunk(cfg, MODES["mifuse"], with_it, without)[0] is False       # dev without it
    assert learns_on_stored_trunk(cfg, MODES["mifuse"], with_it, None)[0] is False          # dev labels missing
    hole = with_it.assign(**{TRUNK_FEATURES: [None, None]})
    assert learns_on_stored_trunk(cfg, MODES["mifuse"], hole)[0] is False                   # a labelled clip lacks it
    assert learns_on_stored_trunk(_cfg(augment=False, features="waveform"), MODES["mifuse"], with_it) == \
        (False, "train.features waveform")
