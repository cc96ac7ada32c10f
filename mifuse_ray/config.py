"""Typed configuration: one tree of dataclasses, the same dotted names everywhere.

``lalm.answers_per_clip`` is the same key on the command line (``--lalm.answers_per_clip 5``), in YAML
(``lalm: {answers_per_clip: 5}``) and in a Tune search space (``{"lalm.answers_per_clip": tune.choice(...)}``).
Defaults run the built-in demo.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from .audio import AudioConfig
from .label_set import DEFAULT_LABELS, DEFAULT_SYNONYMS


class ConfigError(ValueError):
    """A configuration a user wrote that cannot work; the message says what to change."""


def not_a_result(default, **kw):
    """A field that changes how a run goes, never what it computes (workers' CPUs, retries, logging):
    left out of the reuse fingerprints, which are derived from every other field."""
    if callable(default):
        return field(default_factory=default, metadata={"result": False}, **kw)
    return field(default=default, metadata={"result": False}, **kw)


@dataclass
class DemoConfig:
    """The built-in demo: synthetic domains generated on first use."""

    root: str = "demo_data"             # where domains and the demo source model are written
    source_domain: str = "acted_studio"
    target_domain: str = "call_centre"
    scale: float = 1.0                  # clips per speaker multiplier (0.25 for a quick run)


@dataclass
class LALMConfig:
    """The audio LLM behind an OpenAI-compatible chat-completions endpoint."""

    preset: Literal["offline", "vllm-qwen2-audio", "vllm-qwen2.5-omni", "openai", "gemini"] = "offline"
    base_url: str = ""                  # empty: start the offline stand-in endpoint on loopback
    model: str = ""                     # empty: the preset's model
    api_key_env: str = "MIFUSE_LALM_API_KEY"  # name of the environment variable holding the key
    allow_remote_audio: bool = False    # sending audio to a non-loopback host needs this opt-in
    answers_per_clip: int = 5           # N_max answers per clip, all stored
    temperature: float = 1.0
    use_n: bool | None = None           # one request with n=N; None: the preset decides
    logprobs: bool | None = None        # ask for token logprobs; None: the preset decides
    top_logprobs: int = 10
    max_tokens: int = 16
    seed: int = 1234
    prompt: str = ""                    # empty: the default prompt naming the label set
    synonyms: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SYNONYMS))
    timeout_s: float = 30.0
    max_retries: int = 5                # per request
    retry_budget: float = 0.5           # retries allowed, as a fraction of the requests needed
    backoff_base_s: float = 0.5
    backoff_max_s: float = 20.0
    concurrency: int = not_a_result(32)          # requests in flight per actor
    num_actors: int = not_a_result(1)
    actor_cpus: float = not_a_result(0.25)
    batch_size: int = not_a_result(64)
    batches_in_flight: int = not_a_result(8)     # batches one actor works on at once: no idle gap between batches
    qps: float = 0.0                    # cluster-wide requests/s (0: unlimited)
    cache_dir: str = not_a_result("")            # empty: <output>/lalm_cache
    max_requests: int = 0               # hard cap on requests sent by one run (0: none)
    max_cost_usd: float = 0.0           # hard cap on estimated spend (0: none)
    usd_per_request: float = 0.0
    usd_per_audio_minute: float = 0.0
    dry_run: bool = not_a_result(False)          # estimate requests, audio and cost, send nothing
    budget: float = 1.0                 # the fraction of decoded clips to ask, in (0, 1]
    budget_clips: int = 0               # > 0: ask this many clips instead of a fraction
    budget_selection: Literal["mi_diverse", "random"] = "mi_diverse"


@dataclass
class SourceConfig:
    """The source classifier as an MC-dropout teacher."""

    checkpoint: str = ""                # empty: the demo source model (trained if missing)
    extra_checkpoints: tuple[str, ...] = ()   # more source models, teachers source2, source3, … (same K, scope)
    passes_per_clip: int = 10           # K_max passes, all stored
    mc_scope: Literal["full", "head"] = "full"   # see README
    dropout_override: float | None = None
    seed: int = 4321
    batch_size: int = not_a_result(32)
    num_actors: int = not_a_result(1)
    actor_cpus: float = not_a_result(0.5)
    num_gpus: float = 0.0               # per actor
    amp: bool = True                    # bf16 autocast on GPU


@dataclass
class FusionConfig:
    """How stored draws become the soft label q (re-run per Tune trial, never re-querying).

    The defaults are the fusion the six-transfer label benchmark measured best (README 'Fusion');
    the MI-Fuse paper's own fusion is ``weighting: exp, balance_teachers: none, balance_fused:
    none, calibrate: false, select_on_dev: false`` (the named variant ``mifuse_paper``)."""

    lalm_answers_used: int = 0          # N ≤ N_max used (0: all)
    source_passes_used: int = 0         # K ≤ K_max used (0: all)
    uncertainty: Literal["vote_entropy", "mi", "entropy"] = "vote_entropy"
    # exp: the paper's w ∝ exp(-U/τ); dev: one global weight per teacher fitted on the dev split
    weighting: Literal["exp", "inverse", "equal", "fixed", "dev"] = "dev"
    combine: Literal["mean", "product", "label_model"] = "product"
    balance_teachers: Literal["none", "mean", "sinkhorn"] = "mean"     # each teacher towards the prior
    balance_fused: Literal["none", "mean", "sinkhorn"] = "sinkhorn"    # the fused label towards the prior
    prior: Literal["uniform", "given", "estimated"] = "uniform"        # the class prior balancing aims at
    prior_values: list[float] = field(default_factory=list)            # with prior: given
    # also balance each speaker's labels towards the prior (the manifest's speaker_id; see fusion.speaker_scales):
    # what stays constant over a speaker's clips (their pitch, loudness, rate) is not their emotion
    balance_speakers: bool = False
    speaker_min_clips: int = 20         # fewer clips than this: a speaker is not balanced (labels, and by-speaker inference)
    calibrate: bool = False             # a temperature per teacher, fitted on the dev split's labels
    select_on_dev: bool = False         # choose among `candidates` by fused-label UAR on half the dev split
    candidates: list[str] = field(default_factory=lambda: ["mean_balanced", "product_balanced", "mean_dev_weighted"])
    tau: float = 0.5
    eps: float = 1e-6
    fixed_weights: list[float] = field(default_factory=lambda: [0.5, 0.5])
    sharpen_temperature: float = 1.0
    min_confidence: float = 0.0


@dataclass
class TrainConfig:
    """Student adaptation (Ray Train). What each mode changes is the table in train/modes.py."""

    mode: Literal["mifuse", "mifuse_paper", "lalm_labels", "source_labels", "equal_weights", "no_ema",
                  "shot_im"] = "mifuse"
    epochs: int = 16
    batch_size: int = 16
    lr: float = 3e-4                    # the trunk's rate (what SHOT-IM and train.trainable all move)
    # the head's rate: a head on fixed source features needs larger steps than a fine-tuned trunk (16 epochs at
    # 3e-4 barely move it); 1e-3 against 3e-4: +4.3 on the demo's transfers (seed 0), +3.9 held out (3 seeds)
    head_lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_frac: float = 0.1
    # after the warm-up: "cosine" anneals the student to a zero learning rate (the EMA then equals it);
    # "constant" keeps the rate, and the EMA teacher averages the student's last ~1/(1 − α) steps
    lr_decay: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 5.0
    lambda_div: float = 1.0
    prior: Literal["uniform", "q_mean"] = "uniform"
    ema_decay: float = 0.97             # per optimiser step; see README 'EMA' for when it binds
    ema_half_life_steps: float = 0.0    # > 0 overrides ema_decay: the EMA forgets half in this many steps
    adapt_norm: bool = False            # re-estimate BatchNorm statistics on the target's clean clips first (AdaBN)
    # the student's start: the source weights, or shrink-and-perturb (θ ← shrink·θ_source + perturb·θ_fresh),
    # a warm start that keeps the source's direction but not its confidence in source-only cues
    init: Literal["source", "shrink_perturb"] = "source"
    init_shrink: float = 0.5
    init_perturb: float = 0.1
    # BatchNorm while the student trains: "frozen" keeps the source's (or AdaBN's) statistics, which suits a
    # small step from the source weights; "update" normalises by batch statistics and updates the running
    # ones, which a start far from the source weights (train.init shrink_perturb) needs
    batchnorm: Literal["frozen", "update"] = "frozen"
    # what the label-learning modes train: only the "head" (the trunk keeps the source's weights, in eval mode:
    # a student with fewer ways to learn its labels' errors; +4.0 on the demo's transfers, +8.4 held out against
    # the whole network, 3 seeds each), or "all" the student's weights. SHOT-IM always adapts the trunk (its
    # classifier is frozen)
    trainable: Literal["all", "head"] = "head"
    # the EMA-teacher consistency term (modes with consistency; 0 skips it and its strong view). Off by default:
    # with mixup on, turning it off gained +1.9 held out (3 seeds); level on the demo's transfers (0.526 vs 0.523)
    consistency_weight: float = 0.0
    # with consistency: the view the fused label is learnt on. "weak" (FixMatch): the usual augmentation,
    # and the strong view only in the consistency term (two student passes); "strong": both terms on it
    anchor_view: Literal["weak", "strong"] = "weak"
    consistency_threshold: float = 0.6  # clips whose balanced EMA confidence is below this do not count
    # > 0: the label term learns mixed pairs of clips and labels, λ ~ Beta(α, α) (not with anchor_view "strong";
    # only in the modes whose row says so); 0.4: +1.7 points on the demo's transfers, +0.9 held out (3 seeds each)
    mixup_alpha: float = 0.4
    # the label term: the KL to the soft label, or its generalised cross-entropy (train.gce_k), which lets
    # labels the student has come to disagree with pull less (losses.soft_label_gce)
    label_loss: Literal["kl", "gce"] = "kl"
    gce_k: float = 0.7
    consistency_sharpen: float = 0.5    # temperature of the EMA target (< 1 sharpens)
    online_fusion_from_epoch: int = 2   # from this epoch the EMA model may be the auxiliary teacher ...
    online_fusion_gate: bool = True     # ... once its dev UAR passes the fused label's (when a dev split exists)
    ema_passes_per_clip: int = 4        # MC passes of the EMA teacher when it is fused online
    ema_mc_scope: Literal["head", "full"] = "head"
    select: Literal["final", "smoothed_dev"] = "final"   # the final EMA (or student), or the best 3-epoch dev mean
    num_workers: int = 1
    cpus_per_worker: float = not_a_result(1.0)
    # stream: every epoch decodes again in Ray Data tasks (memory flat in the clips); materialize: decode
    # once into the object store (~160 kB per 2.5-s clip; faster epochs on small targets); auto: materialize
    # up to data.MATERIALIZE_MAX_CLIPS clips, stream beyond. The same batches either way.
    ingest: Literal["auto", "stream", "materialize"] = not_a_result("auto")
    # where the Train workers go: PACK fills a node first; SPREAD / STRICT_SPREAD put them on different nodes
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = not_a_result("PACK")
    # Ray Train's checkpoints and resume state: "" is <output>/_ray_train; on a multi-node cluster a
    # path every node shares (an NFS/EFS mount) or an fsspec URI (s3://bucket/run, gs://...)
    storage_path: str = not_a_result("")
    use_gpu: bool = False
    amp: bool = True
    max_failures: int = not_a_result(2)
    seed: int = 0
    augment: bool = True
    noise_snr_db: tuple[float, float] = (10.0, 30.0)
    gain_db: float = 6.0
    max_shift_s: float = 0.2
    speed_range: tuple[float, float] = (0.9, 1.1)
    distill_teacher: Literal["ema", "source"] = "ema"   # the model the distillation terms follow
    distill_kl_weight: float = 0.0      # > 0: + w · T² KL(teacher/T || student/T) on the logits
    distill_temperature: float = 2.0
    cka_weight: float = 0.0             # > 0: + w · (1 − attention-weighted CKA) of frame features
    lora_rank: int = 0                  # > 0: train a LoRA adapter + head on a transformers source model
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass
class SourceTrainConfig:
    """Training the source classifier (jobs/train_source.py)."""

    seed: int = 0
    num_workers: int = 1
    cpus_per_worker: float = not_a_result(1.0)
    use_gpu: bool = False
    epochs: int = 25
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4


@dataclass
class MiFuseConfig:
    """The whole adaptation run."""

    output: str = "outputs/demo"
    ray_address: str = ""               # empty: RAY_ADDRESS or a local cluster
    labels: list[str] = field(default_factory=lambda: list(DEFAULT_LABELS))
    target: str = ""                    # manifest .parquet or folder or URI; empty: the demo target
    adapt_split: str = "adapt"
    dev_split: str = "dev"
    test_split: str = "test"
    source_manifest: str = ""           # only for training a source model
    demo: DemoConfig = field(default_factory=DemoConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    lalm: LALMConfig = field(default_factory=LALMConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    source_train: SourceTrainConfig = field(default_factory=SourceTrainConfig)
    verbose: bool = not_a_result(False)   # Ray's own logs and progress bars on the console (else logs/ray.log)
    baselines: bool = False             # also train the baseline students for the report ...
    baseline_modes: list[str] = field(default_factory=lambda: ["lalm_labels", "source_labels", "shot_im",
                                                               "mifuse_paper", "equal_weights", "no_ema"])  # ... these


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if origin is Literal:                       # every choice field is checked here, and only here
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is typing.Union or (origin is not None and type(None) in args):
        inner = [a for a in args if a is not type(None)]
        if isinstance(value, str) and value.lower() in ("none", "null", ""):
            return None
        return _coerce(value, inner[0], key)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return bool(value)
    if tp in (int, float):
        try:
            result = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return result
    if tp is str:
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        items = [_coerce(v, args[0], key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        return dict(value)
    return value


def _set_path(cfg: Any, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    obj = cfg
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(f"unknown config key {dotted!r}")
        obj = getattr(obj, part)
    name = parts[-1]
    if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
        raise ConfigError(f"unknown config key {dotted!r}")
    tp = _field_types(type(obj))[name]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted}: expected a mapping")
        for k, v in value.items():
            _set_path(cfg, f"{dotted}.{k}", v)
        return
    setattr(obj, name, _coerce(value, tp, dotted))


def apply_overrides(cfg: MiFuseConfig, overrides: dict[str, Any]) -> MiFuseConfig:
    """Apply {dotted.key: value} (from CLI, YAML or a Tune trial) in place and validate."""
    for key, value in overrides.items():
        _set_path(cfg, key, value)
    validate(cfg)
    return cfg


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("synonyms",):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return flatten(data)


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
        (cfg.lalm.temperature > 0, "lalm.temperature must be > 0 (identical answers measure nothing)"),
        (cfg.source.passes_per_clip >= 1, "source.passes_per_clip must be ≥ 1"),
        (0 <= cfg.fusion.lalm_answers_used <= cfg.lalm.answers_per_clip,
         "fusion.lalm_answers_used must be between 0 (all) and lalm.answers_per_clip"),
        (0 <= cfg.fusion.source_passes_used <= cfg.source.passes_per_clip,
         "fusion.source_passes_used must be between 0 (all) and source.passes_per_clip"),
        (cfg.fusion.tau > 0, "fusion.tau must be > 0"),
        (all(c in VARIANTS for c in cfg.fusion.candidates),
         f"fusion.candidates must name fusion variants: {', '.join(VARIANTS)}"),
        (cfg.fusion.prior != "given" or len(cfg.fusion.prior_values) == len(cfg.labels),
         "fusion.prior_values needs one value per label with fusion.prior: given"),
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
        if not f.metadata.get("result", True):
            continue
        value = getattr(obj, f.name)
        out[f.name] = result_fields(value) if dataclasses.is_dataclass(value) else value
    return out


def add_config_arguments(parser: argparse.ArgumentParser, cls=MiFuseConfig, prefix: str = "") -> None:
    """One ``--dotted.name`` option per config field, all defaulting to 'not given'."""
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            add_config_arguments(parser, tp, f"{prefix}{f.name}.")
        else:
            flag = dict(nargs="?", const="true") if tp is bool else {}     # `--verbose` alone means true
            parser.add_argument(f"--{prefix}{f.name}", dest=f"cfg:{prefix}{f.name}", default=None,
                                metavar=getattr(tp, "__name__", "VALUE").upper(), help=argparse.SUPPRESS, **flag)


def config_from_args(args: argparse.Namespace, base: MiFuseConfig | None = None) -> MiFuseConfig:
    """Defaults, then the YAML file (``--config``), then ``--dotted.key`` options."""
    cfg = base or MiFuseConfig()
    overrides: dict[str, Any] = {}
    if getattr(args, "config", None):
        overrides.update(load_yaml(args.config))
    overrides.update({k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None})
    return apply_overrides(cfg, overrides)
