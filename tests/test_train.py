"""Student training: EMA and losses by hand, then real Ray Train runs (DDP, resume, worker failure)."""
import os

import numpy as np
import pytest
import torch

from mifuse_ray.config import MiFuseConfig
from mifuse_ray.fusion_fit import OnlineBalance
from mifuse_ray.train.ema import EMATeacher, decay_from_half_life, ema_decay_at
from mifuse_ray.train.losses import diversity_kl, information_maximization, soft_label_kl


def test_ema_update_matches_hand_computation():
    student = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    with torch.no_grad():
        student[0].weight.fill_(1.0)
    ema = EMATeacher(student, alpha=0.99)
    with torch.no_grad():
        student[0].weight.fill_(3.0)
        student[1].running_mean.fill_(7.0)
    a0 = ema.update(student, step=0)
    assert a0 == pytest.approx(1 / 10)                                 # min(0.99, (1+0)/(10+0))
    assert ema.model[0].weight[0, 0].item() == pytest.approx(0.1 * 1.0 + 0.9 * 3.0)
    assert ema.model[1].running_mean.item() == 7.0                     # buffers copied
    assert ema_decay_at(10_000, 0.99) == 0.99
    alpha = decay_from_half_life(2.0, 50)
    assert alpha ** 100 == pytest.approx(0.5)


def test_the_ema_of_a_frozen_weight_stays_that_weight_exactly():
    """A head-only student's EMA keeps the source trunk bit for bit (α·x + (1−α)·x rounds off x)."""
    student = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    student[0].requires_grad_(False)
    ema = EMATeacher(student, 0.9)
    frozen = student[0].weight.clone()
    for step in range(50):
        with torch.no_grad():
            student[1].weight.add_(0.1)
        ema.update(student, step)
    assert torch.equal(ema.model[0].weight, frozen)
    assert not torch.equal(ema.model[1].weight, student[1].weight)         # the trained layer is averaged


def test_shrink_perturb_blends_source_and_fresh_weights_and_keeps_statistics():
    """θ = shrink·θ_source + perturb·θ_fresh parameter by parameter, the same for the same seed, the
    BatchNorm statistics untouched, and the caller's random stream not consumed."""
    from mifuse_ray.config import ConfigError, validate
    from mifuse_ray.models.cnn import LogMelCNN
    from mifuse_ray.train.common import shrink_perturb
    torch.manual_seed(0)
    source = LogMelCNN()
    source.blocks[0][1].running_mean.fill_(0.7)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    a = LogMelCNN()
    a.load_state_dict(before)
    assert all(torch.equal(v, before[k]) for k, v in shrink_perturb(a, 1.0, 0.0, 3).state_dict().items())
    b, c = LogMelCNN(), LogMelCNN()
    b.load_state_dict(before)
    c.load_state_dict(before)
    state = torch.random.get_rng_state()
    shrink_perturb(b, 0.5, 0.1, seed=3)
    shrink_perturb(c, 0.5, 0.1, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, p), q in zip(b.named_parameters(), c.parameters()):
        assert torch.equal(p, q), name
        if p.dim() > 1:                                   # conv and linear weights: 0.1 × a fresh draw
            assert not torch.allclose(p - 0.5 * before[name], 0.05 * before[name]), name
    conv = b.blocks[0][0]
    bound = 1 / (conv.in_channels * 9) ** 0.5             # Conv2d's own init bound, times 0.1
    assert (conv.weight - 0.5 * before["blocks.0.0.weight"]).abs().max() <= 0.1 * bound + 1e-7
    assert torch.equal(b.blocks[0][1].running_mean, before["blocks.0.1.running_mean"])
    cfg = MiFuseConfig()
    cfg.train.init, cfg.train.lora_rank, cfg.train.trainable = "shrink_perturb", 8, "all"
    with pytest.raises(ConfigError, match="train.init"):
        validate(cfg)
    # a head-only student (the default) keeps the trunk as the source's: a perturbed or re-normalised
    # trunk, or a LoRA adapter in it, is refused before anything runs; SHOT-IM adapts its trunk anyway
    for field, value in (("init", "shrink_perturb"), ("batchnorm", "update"), ("lora_rank", 4)):
        cfg = MiFuseConfig()
        setattr(cfg.train, field, value)
        with pytest.raises(ConfigError, match="set train.trainable all"):
            validate(cfg)
        cfg.train.mode = "shot_im"
        if field != "lora_rank":
            validate(cfg)


def test_lr_schedule_warms_up_then_anneals_or_stays():
    from mifuse_ray.train.common import lr_schedule
    rates = {}
    for decay in ("cosine", "constant"):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = lr_schedule(opt, 100, 0.1, decay)
        rates[decay] = []
        for _ in range(100):
            rates[decay].append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    for decay, r in rates.items():
        assert np.allclose(r[:10], np.arange(1, 11) / 10)           # linear warm-up over 10 % of the steps
    assert rates["cosine"][55] == pytest.approx(0.5, abs=0.02) and rates["cosine"][-1] < 0.01
    assert all(v == 1.0 for v in rates["constant"][10:])
    with pytest.raises(ValueError, match="'cosine' or 'constant'"):      # no silent fallback to the cosine
        lr_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 100, 0.1, "linear")


def test_mixup_mixes_clips_labels_and_weights_by_one_lambda():
    from mifuse_ray.train.common import mixup
    wav = torch.stack([torch.full((6,), float(i)) for i in range(4)])
    lengths = torch.tensor([6, 3, 5, 2])
    q = torch.eye(4)
    q[3] = float("nan")                                               # a clip without a label
    weight = torch.tensor([1.0, 1.0, 0.5, 0.0])
    same = mixup(wav, lengths, q, weight, 0.0, np.random.default_rng(0))
    assert same[0] is wav and same[2] is q                            # α = 0: off
    mixed_wav, mixed_len, mixed_q, mixed_w = mixup(wav, lengths, q, weight, 1.0, np.random.default_rng(0))
    again = mixup(wav, lengths, q, weight, 1.0, np.random.default_rng(0))
    assert all(torch.equal(a, b) for a, b in zip((mixed_wav, mixed_len, mixed_q, mixed_w), again))   # seeded
    rng = np.random.default_rng(0)
    lam, partner = rng.beta(1.0, 1.0), rng.permutation(4)
    for i, j in enumerate(partner):
        assert mixed_wav[i, 0].item() == pytest.approx(lam * i + (1 - lam) * j, abs=1e-6)
        assert mixed_len[i] == max(lengths[i], lengths[j])
        assert mixed_w[i].item() == pytest.approx(float(lam * weight[i] + (1 - lam) * weight[j]), abs=1e-6)
        assert mixed_q[i].sum().item() == pytest.approx(1.0, abs=1e-6) and not mixed_q[i].isnan().any()
        if i != 3 and j != 3:
            assert mixed_q[i, i].item() == pytest.approx(lam if i != j else 1.0, abs=1e-6)


def test_losses_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    logits = torch.log(torch.tensor([[0.8, 0.2], [0.5, 0.5]]))
    kl = soft_label_kl(q, logits, torch.tensor([1.0, 0.0]))          # second clip weighted out
    assert kl.item() == pytest.approx(-np.log(0.8), abs=1e-6)
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    assert diversity_kl(probs, torch.tensor([0.5, 0.5])).item() == pytest.approx(
        0.9 * np.log(1.8) + 0.1 * np.log(0.2), abs=1e-6)
    uniform = torch.zeros(4, 3)
    assert information_maximization(uniform).item() == pytest.approx(0.0, abs=1e-6)


def test_generalised_cross_entropy_by_hand_and_its_gradient():
    from mifuse_ray.train.losses import soft_label_gce
    q = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    logits = torch.log(torch.tensor([[0.8, 0.2], [0.5, 0.5], [0.9, 0.1]])).requires_grad_()
    weight = torch.tensor([1.0, 1.0, 0.0])                                # the third clip weighted out
    gce = soft_label_gce(q, logits, weight, 0.7)
    assert gce.item() == pytest.approx(((1 - 0.8 ** 0.7) + (1 - 0.5 ** 0.7)) / 0.7 / 2, abs=1e-6)
    # k → 0: the cross-entropy; k = 1: 1 − p_y
    assert soft_label_gce(q[:1], logits[:1], weight[:1], 1e-4).item() == pytest.approx(-np.log(0.8), rel=1e-3)
    assert soft_label_gce(q[:1], logits[:1], weight[:1], 1.0).item() == pytest.approx(0.2, abs=1e-6)
    # the gradient is the cross-entropy's times p_y^k: a label the student doubts pulls less
    one_hot = q[:1]
    for p_y in (0.8, 0.2):
        z = torch.log(torch.tensor([[p_y, 1 - p_y]])).requires_grad_()
        soft_label_gce(one_hot, z, torch.ones(1), 0.7).backward()
        ce_grad = torch.tensor([[p_y - 1, 1 - p_y]])
        assert torch.allclose(z.grad, p_y ** 0.7 * ce_grad, atol=1e-6)
    from mifuse_ray.config import ConfigError, validate
    cfg = MiFuseConfig()
    cfg.train.label_loss, cfg.train.gce_k = "gce", 0.0
    with pytest.raises(ConfigError, match="train.gce_k"):
        validate(cfg)


@pytest.fixture(scope="module")
def small_labels(ray_cluster, source_model, demo_root, tmp_path_factory):
    """A labels.parquet for 48 adaptation clips (real teachers over real HTTP)."""
    from mifuse_ray.audio import list_inputs
    from mifuse_ray.labeling import label_target
    from mifuse_ray.demo.lalm_server import BackgroundServer, ServerConfig
    from mifuse_ray.train.source import labelled_split
    from mifuse_ray.label_set import DEFAULT_LABELS
    target = os.path.join(demo_root, "call_centre", "manifest.parquet")
    cfg = MiFuseConfig()
    cfg.lalm.answers_per_clip, cfg.source.passes_per_clip = 3, 4
    out = str(tmp_path_factory.mktemp("labels"))
    with BackgroundServer(ServerConfig()) as server:
        res = label_target(cfg, list_inputs(target, split="adapt").head(48), out, source_model, server.url)
    dev = labelled_split(target, "dev", DEFAULT_LABELS).head(24)
    return res.table, dev


def tiny_cfg(**train):
    cfg = MiFuseConfig()
    cfg.lalm.answers_per_clip, cfg.source.passes_per_clip = 3, 4
    cfg.train.epochs, cfg.train.batch_size, cfg.train.online_fusion_from_epoch = 2, 8, 1
    cfg.train.cpus_per_worker = 0.5
    cfg.audio.train_crop_s = 1.0
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_two_worker_ddp_ends_with_identical_weights(small_labels, source_model, tmp_path):
    from mifuse_ray.train.student import train_student
    table, dev = small_labels
    res = train_student(tiny_cfg(num_workers=2), table, dev, source_model, str(tmp_path), run_name="ddp")
    assert len(res.history) == 2
    assert all(h["process_group_size"] == 2 for h in res.history)       # two ranks really trained together
    assert all(h["weights_rank_spread"] == 0.0 for h in res.history)
    assert os.path.exists(os.path.join(res.student_dir, "mifuse_model.json"))
    assert os.listdir(os.path.join(tmp_path, "tensorboard", "ddp"))


@pytest.fixture(scope="module")
def small_dev_labels(ray_cluster, source_model, demo_root, small_labels, tmp_path_factory):
    """The dev clips of ``small_labels`` labelled too: the source stage's stored trunk output for them."""
    from mifuse_ray.labeling import label_target
    from mifuse_ray.demo.lalm_server import BackgroundServer, ServerConfig
    _, dev = small_labels
    with BackgroundServer(ServerConfig()) as server:
        return label_target(tiny_cfg(), dev, str(tmp_path_factory.mktemp("dev_labels")), source_model, server.url).table


def test_two_workers_learn_on_the_stored_trunk_output(small_labels, small_dev_labels, source_model, tmp_path, caplog):
    """Without waveform augmentation a head-only student learns on the trunk output its labels carry:
    two DDP ranks in step, dev scored from the stored output too, only the head saved (on the source
    checkpoint, whose trunk it kept), and the saved student predicting on the audio what its head gave
    on the stored output."""
    import logging

    import pandas as pd
    from mifuse_ray.models.base import TRUNK_FEATURES, OnStoredTrunk, load_model, read_meta
    from mifuse_ray.predict import PredictorStage
    from mifuse_ray.train.student import train_student
    from mifuse_ray.data import decode_locally
    table, dev = small_labels
    caplog.set_level(logging.INFO, logger="mifuse_ray")
    cfg = tiny_cfg(num_workers=2, augment=False)
    res = train_student(cfg, table, dev, source_model, str(tmp_path), run_name="stored", dev_labels=small_dev_labels)
    assert "learns on the trunk output stored while labelling" in caplog.text
    assert [h["process_group_size"] for h in res.history] == [2, 2]
    assert all(h["weights_rank_spread"] == 0.0 and h["ema_dev_uar"] is not None for h in res.history)
    assert read_meta(res.model_dir) == {"arch": "head_on_base", "base": os.path.abspath(source_model),
                                        "labels": load_model(source_model).labels}
    source, student = load_model(source_model), load_model(res.model_dir)
    for (name, a), b in zip(source.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b) == (not name.startswith("head_net.")), name      # only the head moved
    decoded = decode_locally(dev, cfg.audio)
    on_audio = PredictorStage(res.model_dir, passes_per_clip=0, amp=False)(decoded)
    stored = pd.DataFrame({"clip_id": small_dev_labels["clip_id"], "v": small_dev_labels[TRUNK_FEATURES]})
    stored = stored.set_index("clip_id").loc[on_audio["clip_id"], "v"]
    with torch.no_grad():
        on_stored = torch.softmax(OnStoredTrunk(student)(torch.tensor(np.stack(stored.to_list()), dtype=torch.float32)), -1).numpy()
    np.testing.assert_allclose(np.stack(on_audio["probs"].to_list()), on_stored, atol=1e-4)


@pytest.fixture(scope="module")
def uninterrupted_run(small_labels, source_model, tmp_path_factory):
    """Three epochs that nothing interrupts: what a resumed run must reproduce, and whose checkpoints
    the resume test reads. One run serves both tests (a Ray Train run costs ~20 s here)."""
    from mifuse_ray.train.student import train_student
    table, dev = small_labels
    cfg = tiny_cfg(epochs=3, max_failures=2)
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    return train_student(cfg, table, dev, source_model, out, run_name="clean"), out, cfg


def test_resume_restores_step_and_optimizer_state(uninterrupted_run, source_model):
    """A rerun after an interruption continues from the saved step with the saved optimiser state."""
    from mifuse_ray.models.base import load_model
    from mifuse_ray.train.common import lr_schedule
    from mifuse_ray.train.modes import MODES
    from mifuse_ray.train.checkpoint import load_checkpoint
    from mifuse_ray.train.loop import learning_rate_groups, trained_parameters
    run, out, cfg = uninterrupted_run
    runs = os.path.join(out, "_ray_train", "clean")
    ckpts = [os.path.join(runs, d) for d in os.listdir(runs) if d.startswith("checkpoint_")
             and os.path.isdir(os.path.join(runs, d))]
    states = {c: torch.load(os.path.join(c, "train_state.pt"), weights_only=True) for c in ckpts}
    latest = max(ckpts, key=lambda c: states[c]["epoch"])
    state = states[latest]
    assert state["epoch"] == 2 and state["step"] == run.history[-1]["step"] > 0   # the last epoch's is kept
    student = load_model(source_model)
    ema = EMATeacher(student, 0.9)
    params = trained_parameters(student, MODES[cfg.train.mode], cfg.train.trainable)    # the loop's optimiser
    opt = torch.optim.AdamW(learning_rate_groups(student, params, cfg.train.lr, cfg.train.head_lr))
    sched = lr_schedule(opt, 100, 0.1)
    balances = {"ema": OnlineBalance([0.25] * 4), "fused": OnlineBalance([0.25] * 4),
                "consistency": OnlineBalance([0.25] * 4)}
    step, epoch, history = load_checkpoint(latest, student, ema, opt, sched, balances)
    assert (step, epoch) == (state["step"], 2)
    assert history == run.history                                    # the metrics so far travel with it
    assert opt.state_dict()["state"][0]["step"].item() == step       # Adam moments restored, not zero
    assert sched.last_epoch == step
    assert np.allclose(balances["consistency"].mean, state["balances"]["consistency"])   # running means too


def fail_once(marker: str, after_epoch: int):
    """A step hook (the loop's test seam): the last rank dies once, mid-epoch, in the epoch after
    ``after_epoch``'s checkpoint, once Ray Train has collected that checkpoint's report."""
    import sys
    import ray.cloudpickle
    # the hook runs inside Ray Train workers, which cannot import this test module: pickle it by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    def hook(epoch, batch_no, rank, world):
        if epoch != after_epoch + 1 or batch_no != 2 or rank != world - 1 or os.path.exists(marker):
            return
        _wait_until_reports_are_collected()
        with open(marker, "w") as fh:
            fh.write(f"killed at epoch {epoch}, batch {batch_no}\n")
        os._exit(1)
    return hook


def _wait_until_reports_are_collected(timeout_s: float = 30.0) -> None:
    """Ray Train's controller collects a worker's reports every couple of seconds; a worker that dies
    before that loses its last checkpoint report, and the run restarts from the one before. A real
    failure comes long after the report; the injected one waits for the queue to drain, so the test
    proves a resume from the checkpoint it just wrote."""
    import time
    try:
        from ray.train.v2._internal.execution.context import get_train_context
        queue = get_train_context().get_result_queue()
    except (ImportError, AttributeError):       # another Ray Train version: give the controller time
        time.sleep(5.0)
        return
    deadline = time.time() + timeout_s
    while not queue.empty() and time.time() < deadline:
        time.sleep(0.2)


def test_worker_failure_resumes_from_checkpoint(small_labels, source_model, uninterrupted_run, tmp_path):
    from mifuse_ray.train.student import train_student
    table, dev = small_labels
    clean, _, cfg = uninterrupted_run                                # the same settings, never interrupted
    marker = os.path.join(tmp_path, "fail.injected_failure")
    res = train_student(cfg, table, dev, source_model, str(tmp_path), run_name="fail", step_hook=fail_once(marker, 0))
    assert os.path.exists(marker)                                     # a worker really died mid-epoch
    assert [h["epoch"] for h in res.history] == [0, 1, 2]                 # every epoch's metrics, in order
    assert [h["attempt_start_epoch"] for h in res.history] == [0, 1, 1]   # restarted at epoch 1, from epoch 0's checkpoint
    steps_per_epoch = res.history[1]["step"] - res.history[0]["step"]
    assert res.history[-1]["step"] == 3 * steps_per_epoch           # the step counter was restored too
    # the logged EMA decay is the one the warm-up applied (far below the configured decay on 18 steps)
    assert [h["ema_alpha"] for h in res.history] == pytest.approx(
        [ema_decay_at(h["step"] - 1, cfg.train.ema_decay) for h in res.history])
    assert res.history[-1]["ema_alpha"] < res.history[-1]["ema_alpha_configured"] == cfg.train.ema_decay
    again = train_student(cfg, table, dev, source_model, str(tmp_path), run_name="fail", step_hook=fail_once(marker, 0))
    assert again.best_metrics == res.best_metrics                   # a rerun reuses the finished run
    keys = ("step", "train_loss", "dev_uar", "ema_dev_uar")
    resumed, uninterrupted = ([{k: h[k] for k in keys} for h in run.history] for run in (res, clean))
    print("after failure:", resumed, "uninterrupted:", uninterrupted)
    # Per-epoch seeding and ordered ingest: the resumed run draws the same batches, crops and dropout
    # masks as a separate, uninterrupted run at the same seed, epoch by epoch.
    for after_failure, clean_epoch in zip(resumed, uninterrupted, strict=True):
        assert after_failure == pytest.approx(clean_epoch, rel=1e-5, abs=1e-6)


def test_lora_student_with_distillation_terms(small_labels, tiny_hf_dir, tmp_path):
    """train.lora_rank > 0 on a transformers source: the run trains adapters, and the exported
    student and EMA are adapter directories that load back onto the base model. The same run has
    the logit-KL and CKA distillation terms on (source teacher): both are logged and finite."""
    from mifuse_ray.models.base import load_model
    from mifuse_ray.train.student import train_student
    table, dev = small_labels
    cfg = tiny_cfg(epochs=1, lora_rank=4, lora_alpha=8.0, trainable="all", online_fusion_from_epoch=5,
                   distill_teacher="source", distill_kl_weight=0.5, cka_weight=0.5)
    res = train_student(cfg, table, dev, tiny_hf_dir, str(tmp_path), run_name="lora")
    last = res.history[-1]
    assert np.isfinite(last["train_distill_kl"]) and last["train_distill_kl"] >= 0
    assert 0 <= last["train_cka"] <= 0.5 + 1e-6                       # 0.5 · (1 − CKA), CKA ∈ [0, 1]
    assert last["train_loss"] >= last["train_anchor"] + last["train_cka"] - 1e-6
    for d in (res.student_dir, res.ema_dir):
        assert "adapter_model.safetensors" in os.listdir(d) and "model.safetensors" not in os.listdir(d)
        assert load_model(d).arch == "hf_lora"
    base = load_model(tiny_hf_dir).state_dict()
    trained = load_model(res.student_dir).state_dict()
    frozen = {k.replace("model.base_model.model.", "model.").replace(".base_layer", "").replace(".original_module", ""): v
              for k, v in trained.items()
              if "lora_" not in k and "modules_to_save" not in k}
    assert frozen.keys() == base.keys() and all(torch.equal(frozen[k], base[k]) for k in base)   # base untouched
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)          # adapters trained (B starts at zero)
    head = [k for k in trained if "modules_to_save" in k and "classifier.modules_to_save" in k and k.endswith("weight")]
    assert head and not torch.equal(trained[head[0]], base[head[0].replace("model.base_model.model.", "model.")
                                                          .replace(".modules_to_save.default", "")])


def _cpu_run(cfg, student, model=None, lr=0.0, train_shard=None):
    """A one-worker training state without Ray: what ``_setup`` builds, for the step-level tests."""
    from mifuse_ray.train.modes import MODES
    from mifuse_ray.fused_labels import LALM, SOURCE
    from mifuse_ray.train.loop import LoopInputs, _Run
    from mifuse_ray.train.refusion import initial_balances
    inp = LoopInputs(cfg, MODES["mifuse"], "", 4, [0.25] * 4, cfg.fusion, None, None, [LALM, SOURCE], "")
    opt = torch.optim.SGD(student.parameters(), lr=lr)
    return _Run(inp, student, model or student, EMATeacher(student, 0.9), opt,
                torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), list(student.parameters()), torch.device("cpu"),
                0, 1, 0, 0, [], initial_balances(inp), None, None, train_shard, None)


def _noise_batch(rng, n=4):
    audio = [rng.standard_normal(int(0.5 * 16000)).astype(np.float32) * 0.1 for _ in range(n)]
    return {"audio": audio, "q": np.full((n, 4), 0.25), "clip_weight": np.ones(n), "clip_id": [str(i) for i in range(n)]}


@pytest.mark.parametrize("batchnorm", ["frozen", "update"])
def test_batchnorm_statistics_stay_frozen_or_follow_the_target(batchnorm):
    """train.batchnorm: frozen keeps the source statistics through an epoch (a small step from the source
    weights); update lets them follow the target's batches (a start far from them, train.init shrink_perturb)."""
    import dataclasses

    from mifuse_ray.models.cnn import LogMelCNN
    from mifuse_ray.train.loop import _train_epoch

    class Shard:
        def iter_batches(self, **kw):
            return iter([_noise_batch(np.random.default_rng(i)) for i in range(2)])

    cfg = MiFuseConfig()
    cfg.train = dataclasses.replace(cfg.train, batchnorm=batchnorm, consistency_weight=1.0, consistency_threshold=0.0,
                                    trainable="all")
    student = LogMelCNN(channels=(4, 4), embed_dim=8)
    before = student.blocks[0][1].running_mean.clone()
    run = _cpu_run(cfg, student, lr=1e-3, train_shard=Shard())
    sums = _train_epoch(run, 0)
    assert sums["n"] == 2 and np.isfinite(sums["loss"])
    assert torch.equal(student.blocks[0][1].running_mean, before) == (batchnorm == "frozen")
    if batchnorm == "update":                             # ... but only the weak view's batches move them
        from mifuse_ray.train.common import running_statistics_kept
        after = student.blocks[0][1].running_mean.clone()
        student.train()
        with running_statistics_kept(student):
            student(torch.randn(2, 8000), torch.tensor([8000, 8000]))
        assert torch.equal(student.blocks[0][1].running_mean, after) and student.blocks[0][1].momentum == 0.1


@pytest.mark.parametrize("mode,trainable", [("mifuse", "all"), ("mifuse", "head"), ("shot_im", "head")])
def test_a_head_only_student_keeps_the_source_trunk(mode, trainable):
    """train.trainable head: an epoch moves the head and leaves every trunk weight as the source's;
    SHOT-IM adapts its trunk (classifier frozen) whatever the setting."""
    import dataclasses

    from mifuse_ray.models.cnn import LogMelCNN
    from mifuse_ray.train.modes import MODES
    from mifuse_ray.train.loop import _train_epoch, trained_parameters

    class Shard:
        def iter_batches(self, **kw):
            return iter([_noise_batch(np.random.default_rng(i)) for i in range(2)])

    cfg = MiFuseConfig()
    cfg.train = dataclasses.replace(cfg.train, trainable=trainable, mode=mode)
    student = LogMelCNN(channels=(4, 4), embed_dim=8)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    run = _cpu_run(cfg, student, lr=1e-2, train_shard=Shard())
    params = trained_parameters(student, MODES[mode], trainable)
    run.opt = torch.optim.SGD(params, lr=1e-2)
    run.inp = dataclasses.replace(run.inp, mode=MODES[mode])
    _train_epoch(run, 0)
    moved = {k for k, v in student.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])}
    trunk_moved = {k for k in moved if k.startswith("blocks.")}
    head_moved = {k for k in moved if k.startswith("head_net.")}
    assert bool(trunk_moved) == (trainable == "all" or mode == "shot_im")
    assert "head_net.1.weight" in head_moved
    assert ("head_net.4.weight" in head_moved) == (mode != "shot_im")      # SHOT's classifier stays the source's
    # a frozen trunk is a fixed feature map: no dropout in it while the head learns
    assert student.blocks[0][4].training == (trainable == "all" or mode == "shot_im")
    assert student.head_net.training


def test_an_epoch_on_the_stored_trunk_output_equals_the_epoch_on_the_audio():
    """A head-only student without waveform augmentation learns the same from the trunk output stored
    beside its labels as from the audio: same head weights, same EMA, same losses, after an epoch
    with mixup (of the stored vectors, against mixup of the waveforms through a frozen trunk: equal
    only in the loss terms' inputs, so mixup is off here) and the head's dropout on."""
    import copy
    import dataclasses

    from mifuse_ray.data import pad_batch
    from mifuse_ray.models.base import TRUNK_FEATURES
    from mifuse_ray.models.cnn import LogMelCNN
    from mifuse_ray.train.features import shuffled_batches
    from mifuse_ray.train.loop import _train_epoch, trained_parameters
    from mifuse_ray.train.modes import MODES

    cfg = MiFuseConfig()
    cfg.train = dataclasses.replace(cfg.train, augment=False, mixup_alpha=0.0, online_fusion_from_epoch=1000,
                                    batch_size=4)
    cfg.audio.train_crop_s = 0.5                       # the noise clips' length: no crop, the same padding
    torch.manual_seed(0)
    source = LogMelCNN(channels=(4, 4), embed_dim=8).eval()
    rows = _noise_batch(np.random.default_rng(0), n=12)
    wav, lengths = pad_batch(rows["audio"], 8000)
    with torch.no_grad():                              # what the source stage stores for each clip
        rows[TRUNK_FEATURES] = source.pooled(source.trunk(torch.from_numpy(wav), torch.from_numpy(lengths))).numpy()
    rows = {k: np.asarray(v) if k != "audio" else np.array(v + [None], dtype=object)[:-1] for k, v in rows.items()}
    # the stored path holds its rows and shuffles them itself; the audio path gets the same batches
    order = shuffled_batches(12, 4, cfg.train.seed, 0, 0, whole_only=False)

    class Shard:
        def __init__(self, drop):
            self.drop = drop

        def iter_batches(self, batch_size=4, **kw):
            batches = [{k: v[i] for k, v in rows.items()} for i in order] if self.drop == TRUNK_FEATURES else \
                [{k: v[i:i + batch_size] for k, v in rows.items()} for i in range(0, 12, batch_size)]
            return iter([{k: v for k, v in b.items() if k != self.drop} for b in batches])

    runs = {}
    for stored in (False, True):
        student = copy.deepcopy(source)
        run = _cpu_run(cfg, student, lr=1e-2, train_shard=Shard("audio" if stored else TRUNK_FEATURES))
        run.inp = dataclasses.replace(run.inp, stored_trunk=stored)
        run.model = run.fed(student)
        run.opt = torch.optim.AdamW(trained_parameters(student, MODES["mifuse"], "head"), lr=1e-2)
        runs[stored] = (_train_epoch(run, 0), student, run.ema.model)
    (on_audio, a, a_ema), (on_stored, b, b_ema) = runs[False], runs[True]
    assert on_audio["n"] == on_stored["n"] == 3
    for key in ("loss", "anchor", "div", "agreement"):
        assert on_stored[key] == pytest.approx(on_audio[key], rel=1e-5, abs=1e-6)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5, msg=name)
    for x, y in zip(a_ema.state_dict().values(), b_ema.state_dict().values()):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5)
    assert not torch.equal(a.head_net[4].weight, source.head_net[4].weight)      # the head did learn


@pytest.mark.parametrize("mode,trainable", [("mifuse", "head"), ("mifuse", "all"), ("shot_im", "head")])
def test_the_head_learns_at_train_head_lr_and_the_trunk_at_train_lr(mode, trainable, tiny_hf_dir):
    """The optimiser's groups: the head's parameters at head_lr, the trunk's at lr, frozen ones in
    neither. A transformers model's head is its projector and classifier (not only its dropout)."""
    from mifuse_ray.models.base import load_model
    from mifuse_ray.models.cnn import LogMelCNN
    from mifuse_ray.train.modes import MODES
    from mifuse_ray.train.loop import learning_rate_groups, trained_parameters

    for student, head_prefixes in ((LogMelCNN(channels=(4, 4), embed_dim=8), ("head_net.",)),
                                   (load_model(tiny_hf_dir), ("model.projector.", "model.classifier."))):
        names = {id(p): n for n, p in student.named_parameters()}
        groups = learning_rate_groups(student, trained_parameters(student, MODES[mode], trainable), 3e-4, 1e-3)
        by_rate = {g["lr"]: {names[id(p)] for p in g["params"]} for g in groups}
        head = {n for n in names.values() if n.startswith(head_prefixes)}
        classifier = {n for n in head if n.startswith(("head_net.4.", "model.classifier."))}
        assert by_rate[1e-3] == (head - classifier if mode == "shot_im" else head)
        trunk = set(names.values()) - head
        assert by_rate.get(3e-4, set()) == (set() if (trainable, mode) == ("head", "mifuse") else trunk)


@pytest.mark.parametrize("setting", ["weak", "strong", "no_consistency"])
def test_consistency_step_learns_the_labels_on_the_weak_view(setting):
    """FixMatch's split: the fused label is learnt on the weak view (here: augmentation off, so the clean
    crop itself) and only the consistency term sees the strong view; anchor_view=strong is one pass on it;
    consistency_weight 0 (the default) is one pass on the labels' view and no consistency term at all."""
    import dataclasses

    from mifuse_ray.models.cnn import LogMelCNN
    from mifuse_ray.train.loop import _step

    cfg = MiFuseConfig()
    cfg.train = dataclasses.replace(cfg.train, augment=False, consistency_threshold=0.0,
                                    anchor_view="strong" if setting == "strong" else "weak",
                                    consistency_weight=0.0 if setting == "no_consistency" else 1.0,
                                    mixup_alpha=0.0)            # (mixup would mix the clean crops with each other)
    student = LogMelCNN(channels=(4, 4), embed_dim=8)
    seen = []

    class Recording(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, wav, lengths, **kw):
            seen.append(wav.detach().clone())
            return self.inner(wav, lengths, **kw)

    run = _cpu_run(cfg, student, Recording(student))
    rng = np.random.default_rng(0)
    batch = _noise_batch(rng)
    audio = batch["audio"]
    terms = _step(run, batch, rng, torch.Generator().manual_seed(0), online_fusion=False)
    assert np.isfinite(terms["loss"]) and ("consistency" in terms) == (setting != "no_consistency")
    clean = torch.stack([torch.from_numpy(a) for a in audio])
    if setting == "no_consistency":
        assert len(seen) == 1 and torch.equal(seen[0][:, :clean.shape[1]], clean)   # no strong view made or seen
    elif setting == "weak":
        assert len(seen) == 2                                   # the labels' view, then the strong view
        assert torch.equal(seen[0][:, :clean.shape[1]], clean)  # the labels were learnt on the clean crop
        assert not torch.equal(seen[1][:, :clean.shape[1]], clean)
    else:
        assert len(seen) == 1 and not torch.equal(seen[0][:, :clean.shape[1]], clean)


def test_readme_training_modes_table_matches_the_modes():
    """docs/configuration.md 'Training modes' is written by hand from train/modes.py: every flag must agree."""
    from mifuse_ray.train.modes import MODES
    readme = open(os.path.join(os.path.dirname(__file__), "..", "docs", "configuration.md")).read()
    section = readme.split("### Training modes", 1)[1].split("\n### ", 1)[0]
    header, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
                     if line.startswith("| `")]           # the header's first cell is `train.mode` too
    assert {r[0].strip("`") for r in rows} == set(MODES)
    for row in rows:
        cells, mode = dict(zip(header, row)), MODES[row[0].strip("`")]
        for column, flag in (("EMA", mode.ema), ("consistency", mode.consistency),
                             ("re-fusion", mode.online_fusion), ("mixup", mode.mixup)):
            assert cells[column].startswith("yes") == flag, (row[0], column)
        assert cells["frozen"] == (", ".join(mode.frozen) or "-"), row[0]
