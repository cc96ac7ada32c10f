"""The Whisper encoders: the converter against CTranslate2's own encoder, the log-mel against
transformers' feature extractor, and the SER model's interface on a tiny random encoder."""
import os
import shutil

import numpy as np
import pytest
import torch

from mifuse_ray.models.base import load_model
from mifuse_ray.models.mc import mc_predict
from mifuse_ray.models.whisper import PACKAGED, WhisperSER, convert, log_mel, packaged_files

LABELS = ["neutral", "happy", "sad", "angry"]


def _clip(seconds, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t * (1 + 0.2 * t)) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def test_log_mel_is_whisper_feature_extractors_without_the_padding_to_30_s():
    from transformers import WhisperFeatureExtractor
    wav = _clip(2.7)
    reference = WhisperFeatureExtractor(feature_size=80)(wav, sampling_rate=16000, return_tensors="np").input_features
    mine, frames = log_mel(torch.from_numpy(wav)[None], torch.tensor([len(wav)]))
    n = int(frames[0])
    assert n == len(wav) // 160
    np.testing.assert_allclose(mine[0, :, :n].numpy(), reference[0, :, :n], atol=1e-4)


@pytest.fixture(scope="module")
def ctranslate2_dir(tmp_path_factory):
    """Encoder name -> a CTranslate2 model folder (whisper_base's two parts joined), for the reference."""
    def folder(name):
        parts = packaged_files(name)
        if len(parts) == 1:
            return os.path.dirname(parts[0])
        out = tmp_path_factory.mktemp(name)
        with open(out / "model.bin", "wb") as fh:
            for part in parts:
                fh.write(open(part, "rb").read())
        for extra in ("config.json", "vocabulary.txt", "tokenizer.json"):
            shutil.copy(os.path.join(os.path.dirname(parts[0]), extra), out / extra)
        return str(out)
    return folder


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_the_converted_encoder_gives_ctranslate2s_encoder_output(name, ctranslate2_dir):
    """Tolerance: cosine ≥ 0.9999 over the whole output and for every frame (float32 both sides)."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from transformers import WhisperFeatureExtractor
    wav = _clip(3.0, seed=1)
    features = WhisperFeatureExtractor(feature_size=80)(wav, sampling_rate=16000, return_tensors="np").input_features
    reference = ctranslate2.models.Whisper(ctranslate2_dir(name), device="cpu", compute_type="float32")
    theirs = np.array(reference.encode(ctranslate2.StorageView.from_array(features.astype(np.float32)), to_cpu=True))[0]
    model = convert(name, LABELS)
    with torch.no_grad():
        ours = model.model.encoder(torch.from_numpy(features)).last_hidden_state[0].numpy()
    assert ours.shape == theirs.shape
    whole = float(ours.ravel() @ theirs.ravel() / np.linalg.norm(ours) / np.linalg.norm(theirs))
    per_frame = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert whole >= 0.9999 and per_frame.min() >= 0.9999, (whole, per_frame.min())


def _tiny_whisper(head_dropout=0.3):
    from transformers import WhisperConfig, WhisperForAudioClassification
    torch.manual_seed(0)
    cfg = WhisperConfig(num_mel_bins=80, d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32,
                        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=8, max_source_positions=300,
                        classifier_proj_size=8, num_labels=len(LABELS), vocab_size=51865)
    return WhisperSER(WhisperForAudioClassification(cfg).eval(), LABELS, head_dropout=head_dropout).eval()


def test_a_short_clip_in_a_batch_reads_as_it_does_alone():
    """The padded frames of a shorter clip are masked out of attention and of the mean."""
    model = _tiny_whisper()
    short, long = _clip(0.9, 2), _clip(2.3, 3)
    wav = torch.zeros(2, len(long))
    wav[0, :len(short)], wav[1] = torch.from_numpy(short), torch.from_numpy(long)
    with torch.no_grad():
        together = model(wav, torch.tensor([len(short), len(long)]))
        alone = model(torch.from_numpy(short)[None], torch.tensor([len(short)]))
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=1e-4)


def test_a_clip_longer_than_the_window_is_cut_to_it():
    model = _tiny_whisper()                                  # 300 positions: a 6-s window
    wav = torch.from_numpy(_clip(7.0))[None]
    hidden, mask = model.encode(wav, torch.tensor([wav.shape[1]]))
    assert hidden.shape[1] == 300 and bool(mask.all())


def test_the_stored_pooled_vector_feeds_the_head_it_came_from(tmp_path):
    model = _tiny_whisper()
    wav = torch.from_numpy(_clip(1.5))[None]
    lengths = torch.tensor([wav.shape[1]])
    with torch.no_grad():
        features = model.trunk(wav, lengths)
        direct = model.head(features)
        stored = model.head(model.features_from_pooled(model.pooled(features)))
    torch.testing.assert_close(direct, stored)
    model.save(str(tmp_path / "ckpt"))
    again = load_model(str(tmp_path / "ckpt"))
    assert isinstance(again, WhisperSER) and again.labels == LABELS and again.head_dropout.p == 0.3
    with torch.no_grad():
        torch.testing.assert_close(again(wav, lengths), direct)
    from mifuse_ray.predict import trunk_groups           # the evaluation runs a shared encoder once
    student = _tiny_whisper()
    with torch.no_grad():
        student.model.classifier.weight.add_(1.0)
    other = _tiny_whisper()
    with torch.no_grad():
        next(other.model.encoder.parameters()).add_(1.0)
    assert trunk_groups({"source": again, "student": student, "other": other}) == [["source", "student"], ["other"]]


def test_head_mc_dropout_samples_only_the_pooled_vector():
    """Head-scope passes differ from each other; their trunk is the same single pass."""
    model = _tiny_whisper(head_dropout=0.5)
    wav = torch.from_numpy(_clip(1.2))[None].repeat(2, 1)
    out = mc_predict(model, wav, torch.tensor([wav.shape[1]] * 2), torch.arange(16).reshape(2, 8), scope="head")
    probs = out.probs
    assert probs.shape == (2, 8, len(LABELS)) and out.pooled.shape == (2, 16)
    assert not torch.allclose(probs[0, 0], probs[0, 1])
    np.testing.assert_allclose(probs.sum(-1).numpy(), 1.0, atol=1e-5)


def test_a_whisper_source_model_trains_its_head_on_the_frozen_encoder(ray_cluster, demo_root, tmp_path):
    """source_train.encoder: the encoder's weights leave training exactly as converted, the head moves
    and learns the source domain (dev UAR well above the 0.25 of chance), and the checkpoint loads as
    a WhisperSER whose stored pooled output feeds its head."""
    from mifuse_ray.config import MiFuseConfig
    from mifuse_ray.train.source import train_source
    cfg = MiFuseConfig()
    cfg.source_train.encoder, cfg.source_train.head_epochs, cfg.source_train.cpus_per_worker = "whisper_tiny_en", 20, 0.5
    summary = train_source(cfg, os.path.join(demo_root, "acted_studio", "manifest.parquet"), str(tmp_path))
    trained, fresh = load_model(summary["checkpoint"]), convert("whisper_tiny_en", cfg.labels)
    assert isinstance(trained, WhisperSER) and trained.encoder_name == "whisper_tiny_en"
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b) == name.startswith("model.encoder."), name
    assert summary["best_dev_uar"] > 0.4


def test_a_lora_adapter_on_the_whisper_encoder_saves_alone_and_loads_onto_its_base(tmp_path):
    """train.lora_rank on a Whisper source model: only the adapter and the head train, the adapted
    model starts as its base, and the saved adapter rebuilt on the base gives the same outputs."""
    from mifuse_ray.models.lora import WhisperLoRA, apply_lora, trainable_fraction
    base = _tiny_whisper()
    base.save(str(tmp_path / "base"))
    student = apply_lora(load_model(str(tmp_path / "base")), str(tmp_path / "base"), rank=4, alpha=8.0,
                         target_modules=["q_proj", "v_proj"])
    assert isinstance(student, WhisperLoRA) and not student.stores_trunk
    student.eval()
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    wav = torch.from_numpy(_clip(1.3))[None]
    lengths = torch.tensor([wav.shape[1]])
    with torch.no_grad():
        torch.testing.assert_close(student(wav, lengths), base(wav, lengths))
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
        moved = student(wav, lengths)
    assert not torch.allclose(moved, base(wav, lengths))
    student.save(str(tmp_path / "adapter"))
    assert not os.path.exists(tmp_path / "adapter" / "model.safetensors")       # the adapter alone
    again = load_model(str(tmp_path / "adapter"))
    assert isinstance(again, WhisperLoRA) and trainable_fraction(again)[1] == trainable_fraction(student)[1]
    with torch.no_grad():
        torch.testing.assert_close(again(wav, lengths), moved)
