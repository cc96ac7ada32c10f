"""Choosing and calibrating the fusion on the labelled dev split (when there is one).

The dev split is cut in two halves by a hash of the clip id: the first fits the teachers' dev
weights and temperatures and (optionally) picks the fusion among named variants by its
fused-label UAR; the second is the only one the student run sees, so no clip does both.
Without a dev split, or without the LALM's answers on it, the configured fusion applies as is,
and the choice says why.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pandas as pd

from .fusion import VARIANTS, FusionFit
from .fusion_fit import fit_temperatures
from .fused_labels import fit_table, fusion_columns, teacher_names, teachers_of
from .metrics import bootstrap_ci, uar


def variant(fusion_cfg, name: str):
    """The fusion config with a named variant's fields (N, K, τ and the rest kept)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown fusion variant {name!r}; choose from {sorted(VARIANTS)}")
    return dataclasses.replace(fusion_cfg, **VARIANTS[name])


@dataclasses.dataclass
class FusionChoice:
    name: str                      # the variant chosen ("configured": the config as given)
    config: object                 # the FusionConfig to fuse with
    fit: FusionFit                 # its global part, fitted on the adaptation split
    dev_scores: dict               # variant → {"uar", "ci95", "clips"} on the choosing half of dev
    note: str                      # how the choice was made, for the report

    def fit_for(self, table: pd.DataFrame, labels) -> FusionFit:
        """This fusion's global part fitted on another split's own clips (the test split is
        labelled as if it were the adaptation split: same settings, its own class balance)."""
        return fit_table(table, len(labels), self.config, self.fit.temperatures)

    def summary(self) -> dict:
        return {"chosen": self.name, "note": self.note, "dev_scores": self.dev_scores,
                "temperatures": self.fit.temperatures, "fit_notes": self.fit.notes}


def dev_halves(dev: pd.DataFrame, salt: str = "mifuse") -> tuple[np.ndarray, np.ndarray]:
    """(choose_fusion, choose_epoch) masks over the dev rows, by a hash of the clip id: stable
    whatever rows are present, and even (a labelled dev split often has only a few speakers)."""
    hashed = np.array([int(hashlib.sha256(f"{salt}:{k}".encode()).hexdigest()[:8], 16) % 2 for k in dev["clip_id"]])
    first = hashed == 0
    return first, ~first


def balanced_nll(q, y, num_classes: int) -> float:
    """Negative log-likelihood of the true labels, averaged per class then over classes (as UAR
    weighs classes): a smooth stand-in for UAR when a handful of dev clips choose a weight."""
    q = np.clip(np.nan_to_num(np.asarray(q, dtype=np.float64), nan=1.0 / num_classes), 1e-6, 1.0)
    nll = -np.log(q[np.arange(len(y)), y])
    return float(np.mean([nll[y == k].mean() for k in range(num_classes) if (y == k).any()]))


def weight_grid(num_teachers: int, steps: int = 9, floor: float = 0.05) -> np.ndarray:
    """Weight vectors on the simplex, each weight ≥ ``floor``: w = floor + k·(1 − T·floor)/steps with
    Σk = steps. Two teachers give (w, 1 − w), w ∈ {0.05, 0.15, …, 0.95}; three give 55 vectors."""
    def compositions(total: int, parts: int):
        if parts == 1:
            yield (total,)
            return
        for k in range(total + 1):
            for rest in compositions(total - k, parts - 1):
                yield (k, *rest)
    step = (1 - num_teachers * floor) / steps
    return np.round(floor + step * np.array(list(compositions(steps, num_teachers)), dtype=np.float64), 10)


def fit_dev_weights(adapt: pd.DataFrame, half: pd.DataFrame, y, fusion_cfg, temperatures, labels):
    """weighting 'dev': one global weight per teacher, the vector of ``weight_grid`` whose fused
    label has the lowest balanced NLL on the dev clips. Returns the resolved config and its fit on
    the adaptation split (computed while choosing; not fitted again)."""
    C = len(labels)
    best = None
    for w in weight_grid(len(teacher_names(adapt))):
        cfg = dataclasses.replace(fusion_cfg, weighting="fixed", fixed_weights=[float(v) for v in w])
        fit = fit_table(adapt, C, cfg, temperatures)
        score = balanced_nll(np.stack(fusion_columns(half, C, cfg, fit)["q"]), y, C)
        if best is None or score < best[0]:
            best = (score, cfg, fit)
    return best[1], best[2]


def _truth(table: pd.DataFrame, labels) -> np.ndarray:
    return np.array([list(labels).index(v) for v in table["label"]])


@dataclasses.dataclass
class DevHalf:
    """The dev clips that choose the fusion, their labels, and the teachers' temperatures there."""

    table: pd.DataFrame
    y: np.ndarray
    temperatures: list | None


def dev_half(dev: pd.DataFrame | None, fusion_cfg, labels) -> DevHalf | None:
    """The first dev half with LALM answers (None when there is none to use), temperatures fitted."""
    C = len(labels)
    if dev is None or "label" not in dev:
        return None
    usable = dev[dev["error"].isna() & dev["label"].notna()].reset_index(drop=True)
    if len(usable):
        usable = usable[np.asarray(teachers_of(usable, C)[0].n) > 0]
    half = usable[dev_halves(usable)[0]].reset_index(drop=True) if len(usable) else usable
    if len(half) < 2 * C:
        return None
    y = _truth(half, labels)
    temperatures = None
    if fusion_cfg.calibrate:
        temperatures = fit_temperatures(teachers_of(half, C, fusion_cfg.lalm_answers_used, fusion_cfg.source_passes_used), y)
    return DevHalf(half, y, temperatures)


def fit_with_dev(adapt: pd.DataFrame, half: DevHalf | None, fusion_cfg, labels):
    """A fusion config made concrete for this data: dev-fitted weights and temperatures where it
    asks for them and a dev half exists, and its global part fitted on the adaptation split."""
    C = len(labels)
    temperatures = half.temperatures if half is not None and fusion_cfg.calibrate else None
    if fusion_cfg.weighting == "dev":
        if half is not None:
            return fit_dev_weights(adapt, half.table, half.y, fusion_cfg, temperatures, labels)
        fusion_cfg = dataclasses.replace(fusion_cfg, weighting="equal")
    return fusion_cfg, fit_table(adapt, C, fusion_cfg, temperatures)


def score_on(half: DevHalf, fusion_cfg, fit, labels) -> dict:
    C = len(labels)
    pred = fusion_columns(half.table, C, fusion_cfg, fit)["fused_pred"].to_numpy()
    pred = np.where(pred >= 0, pred, (half.y + 1) % C)
    lo, hi = bootstrap_ci(half.y, pred, C, "uar", n_boot=300)
    return {"uar": uar(half.y, pred, C), "ci95": [lo, hi], "clips": int(len(half.y))}


def choose_fusion(adapt: pd.DataFrame, dev: pd.DataFrame | None, fusion_cfg, labels) -> FusionChoice:
    """Temperatures and the variant with the best fused-label UAR on the first dev half."""
    wants_dev = fusion_cfg.calibrate or fusion_cfg.choose_on_dev or fusion_cfg.weighting == "dev"
    half = dev_half(dev, fusion_cfg, labels) if wants_dev else None
    if half is None:
        note = ("configured fusion, no dev split used" if not wants_dev else
                "no labelled dev split with LALM answers: the unsupervised default applies (no calibration, "
                "no choice)")
        cfg, fit = fit_with_dev(adapt, None, dataclasses.replace(fusion_cfg, calibrate=False), labels)
        return FusionChoice("configured", cfg, fit, {}, note)
    names = list(fusion_cfg.candidates) if fusion_cfg.choose_on_dev else ["configured"]
    scores, resolved = {}, {}
    for name in dict.fromkeys(names + ["paper", "lalm", "source"]):
        cfg, fit = fit_with_dev(adapt, half, fusion_cfg if name == "configured" else variant(fusion_cfg, name), labels)
        scores[name], resolved[name] = score_on(half, cfg, fit, labels), (cfg, fit)
    best = max(names, key=lambda n: scores[n]["uar"])
    chosen_cfg = resolved[best][0]
    weights = ", ".join(f"{n} {w:.2f}" for n, w in zip(teacher_names(adapt), chosen_cfg.fixed_weights))
    fitted = [f"teacher weights ({weights})"
              if fusion_cfg.weighting == "dev" or VARIANTS.get(best, {}).get("weighting") == "dev" else "",
              "teacher temperatures" if half.temperatures else ""]
    fitted = " and ".join(f for f in fitted if f)
    note = (f"chosen among {', '.join(names)} " if len(names) > 1 else "the configured fusion; ") + \
        (f"{fitted} fitted " if fitted else "scored ") + f"on {len(half.y)} dev clips (half the dev split)"
    return FusionChoice(best, resolved[best][0], resolved[best][1], scores, note)
