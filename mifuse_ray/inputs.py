"""What a run starts from, resolved and checked before anything is paid for.

``prepare(cfg)`` is the one setup every job and notebook shares: the output is writable, Ray is
up, the inputs are found (the demo's are made when none are given), and every mistake a user can
make in the config or the inputs is reported now, in one line, before the first LALM request.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import pandas as pd

from .audio import list_inputs
from .config import ConfigError, MiFuseConfig
from .label_shards import ManifestSplit, scan_manifest

log = logging.getLogger("mifuse_ray")


@dataclasses.dataclass
class Inputs:
    """A run's inputs. ``adapt``: the adaptation split, as a ``ManifestSplit`` (its counts and digest;
    the cluster reads the rows) for a Parquet manifest, as a frame for a folder of audio; the labelled
    dev and test splits are frames (small)."""

    target: str
    source_checkpoint: str
    adapt: "pd.DataFrame | ManifestSplit"
    dev_df: pd.DataFrame | None
    test_df: pd.DataFrame | None

    def splits(self) -> dict:
        """Every split the teachers label: the adaptation split, and the dev and test splits that exist."""
        frames = {"adapt": self.adapt, "dev": self.dev_df, "test": self.test_df}
        return {split: df for split, df in frames.items() if df is not None and len(df)}

    def clip_totals(self) -> tuple[int, float]:
        """(clips, mean seconds) over every split: what the LALM will be asked about (spend, dry run)."""
        from .labeling import clip_totals
        totals = [clip_totals(df) for df in self.splits().values()]
        clips = sum(n for n, _ in totals)
        return clips, sum(n * s for n, s in totals) / clips if clips else 0.0


def demo_paths(cfg: MiFuseConfig) -> tuple[str, str]:
    """Create the demo domains and source model if missing; return (target manifest, source checkpoint)."""
    from .demo.domains import domain_named, ensure_domain
    from .train.source import train_source
    root = os.path.abspath(cfg.demo.root)
    for name in (cfg.demo.source_domain, cfg.demo.target_domain):
        try:
            if name != "game_voices":                    # real speech, built by mifuse_ray.game_voices
                domain_named(name)
        except KeyError as exc:
            raise ConfigError(f"demo.source_domain / demo.target_domain: {exc.args[0]}") from None
    source_manifest = ensure_domain(cfg.demo.source_domain, root, cfg.demo.scale)
    target_manifest = ensure_domain(cfg.demo.target_domain, root, cfg.demo.scale)
    encoder = "" if cfg.source_train.encoder == "cnn" else f"_{cfg.source_train.encoder}"
    model_root = os.path.join(root, "source_models", f"{cfg.demo.source_domain}_x{cfg.demo.scale:g}{encoder}")
    if not os.path.exists(os.path.join(model_root, "model", "mifuse_model.json")):
        log.info("training the demo source model on %s", cfg.demo.source_domain)
        train_source(cfg, source_manifest, model_root)
    return target_manifest, os.path.join(model_root, "model")


def resolve_inputs(cfg: MiFuseConfig) -> Inputs:
    """The target's splits and the source checkpoint, with the checkpoint's labels checked."""
    from .label_set import check_same_labels
    from .models.base import read_meta
    from .train.source import labelled_split
    if cfg.target:
        target, checkpoint = cfg.target, cfg.source.checkpoint
        if not checkpoint:
            raise ConfigError("source.checkpoint is required with a user target (the demo trains its own)")
    else:
        target, checkpoint = demo_paths(cfg)
        checkpoint = cfg.source.checkpoint or checkpoint
    for key, path in [("source.checkpoint", checkpoint)] + [("source.extra_checkpoints", p)
                                                            for p in cfg.source.extra_checkpoints]:
        try:
            meta = read_meta(path)
        except FileNotFoundError as exc:
            raise ConfigError(f"{exc}; set {key} to a model directory written by train_source.py "
                              "or a transformers audio-classification directory") from None
        if "labels" in meta:
            check_same_labels(meta["labels"], cfg.labels, what=f"{key} {path}")
    try:
        # a Parquet manifest stays on disk: the driver keeps its counts, the cluster reads its rows
        adapt = scan_manifest(target, cfg.adapt_split) if target.endswith(".parquet") else list_inputs(target)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if not len(adapt):
        raise ConfigError(f"no clips in {target} (split {cfg.adapt_split!r})")
    dev_df = test_df = None
    if isinstance(adapt, ManifestSplit) and adapt.has_labels:
        if cfg.dev_split in adapt.splits_present:
            dev_df = labelled_split(target, cfg.dev_split, cfg.labels)
        if cfg.test_split in adapt.splits_present:
            test_df = labelled_split(target, cfg.test_split, cfg.labels)
    return Inputs(target, checkpoint, adapt, dev_df, test_df)


def check_output_writable(path: str) -> None:
    if "://" in path and not path.startswith("file://"):
        raise ConfigError(f"output {path} is a URI; give a path (on a cluster, one every node mounts). "
                          "URIs work for target, lalm.cache_dir and train.storage_path")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"output {path} is not writable ({exc.strerror}); choose another `output`") from None


def check_run(cfg: MiFuseConfig, inputs: Inputs) -> None:
    """The mistakes that need the inputs or the cluster to see, found before the first request."""
    from .fused_labels import LALM, source_teacher_name
    teachers = [LALM, *(source_teacher_name(i) for i in range(1 + len(cfg.source.extra_checkpoints)))]
    if inputs.dev_df is None and cfg.train.final_model == "smoothed_dev":
        raise ConfigError("train.final_model smoothed_dev needs a labelled dev split (dev_split); "
                          "use train.final_model final, which needs none")
    if cfg.fusion.weighting == "fixed" and len(cfg.fusion.fixed_weights) != len(teachers):
        raise ConfigError(f"fusion.fixed_weights needs {len(teachers)} weights ({', '.join(teachers)}) "
                          f"with fusion.weighting fixed; got {len(cfg.fusion.fixed_weights)}")
    _check_cluster_fits(cfg)


def _check_cluster_fits(cfg: MiFuseConfig) -> None:
    """Train workers the cluster cannot place would wait forever, after the labels were paid for."""
    import ray
    if not ray.is_initialized():
        return
    total = ray.cluster_resources()
    for name, t in (("train", cfg.train), ("source_train", cfg.source_train)):
        need = t.num_workers * t.cpus_per_worker
        if need > total.get("CPU", 0) and not _autoscaling():
            raise ConfigError(f"{name}.num_workers × {name}.cpus_per_worker = {need:g} CPUs, but the cluster has "
                              f"{total.get('CPU', 0):g}; lower them (fractions are fine)")
        if t.use_gpu and t.num_workers > total.get("GPU", 0) and not _autoscaling():
            raise ConfigError(f"{name}.use_gpu needs {t.num_workers} GPUs, but the cluster has "
                              f"{total.get('GPU', 0):g}; set {name}.use_gpu false or add GPU nodes")


def _autoscaling() -> bool:
    """An autoscaling cluster can add the nodes a request needs: KubeRay pods say so in their
    environment; elsewhere (the cluster launcher) set MIFUSE_AUTOSCALING=1 to skip the check."""
    return os.environ.get("MIFUSE_AUTOSCALING", "") == "1" or bool(os.environ.get("KUBERAY_GEN_RAY_START_CMD"))


def prepare(cfg: MiFuseConfig, verbose: bool = True) -> Inputs:
    """The shared setup of every entry point: output writable, Ray up, inputs resolved and checked."""
    from .ray_utils import init_ray
    check_output_writable(cfg.output)
    init_ray(cfg.ray_address, verbose=verbose)
    inputs = resolve_inputs(cfg)
    check_run(cfg, inputs)
    return inputs
