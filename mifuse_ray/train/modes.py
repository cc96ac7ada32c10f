"""Every way a student can be trained, in one table: what each mode learns from and what it keeps.

A baseline differs from the shipped recipe only in the fields of its row; the training loop
reads the row and never compares mode names. docs/configuration.md 'Training modes' prints this table.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    labels: str | None       # "chosen": the fusion chosen on dev; a fusion variant's name; None: no labels
    loss: str                # "soft_label": KL(q || p) + diversity; "information_max": SHOT's IM loss
    ema: bool                # keep an EMA teacher (it is the final model when kept)
    consistency: bool        # EMA teacher on the clean view → student on a strong view, confidence-masked
    online_fusion: bool      # re-fuse q online with the EMA teacher in the source's place
    frozen: tuple = ()       # parts kept fixed: "classifier" (SHOT keeps the source hypothesis)
    # the label term on mixed pairs of clips and labels (train.mixup_alpha): every student that learns labels
    # with the shipped recipe's loss, not the paper's two recipes, which are kept as the paper describes them
    mixup: bool = True
    about: str = ""


MODES: dict[str, Mode] = {
    "mifuse": Mode("chosen", "soft_label", ema=True, consistency=True, online_fusion=True,
                   about="the shipped recipe: balanced, dev-chosen fused labels learnt with mixup, an EMA teacher "
                         "(consistency to it when train.consistency_weight > 0), online re-fusion once the EMA "
                         "beats the labels on dev"),
    "mifuse_paper": Mode("paper", "soft_label", ema=True, consistency=False, online_fusion=True, mixup=False,
                         about="MI-Fuse as the paper describes it: uncertainty-weighted labels, EMA re-fusion"),
    "lalm_labels": Mode("lalm", "soft_label", ema=False, consistency=False, online_fusion=False,
                        about="student on the LALM's own answers (the paper's strongest baseline)"),
    "source_labels": Mode("source", "soft_label", ema=False, consistency=False, online_fusion=False,
                          about="student on the source model's own pseudo-labels"),
    "equal_weights": Mode("equal_mean", "soft_label", ema=True, consistency=False, online_fusion=True, mixup=False,
                          about="the paper's recipe with w = 0.5 instead of uncertainty weights (ablation)"),
    "no_ema": Mode("chosen", "soft_label", ema=False, consistency=False, online_fusion=False,
                   about="the shipped labels, fixed, without any EMA teacher (ablation)"),
    "shot_im": Mode(None, "information_max", ema=False, consistency=False, online_fusion=False, frozen=("classifier",),
                    mixup=False,
                    about="SHOT-IM: entropy minimisation + diversity, classifier frozen, no labels"),
}


def head_only(mode: Mode, trainable: str) -> bool:
    """``train.trainable head`` acts on the modes that learn labels; SHOT-IM adapts its trunk by definition."""
    return trainable == "head" and mode.labels is not None
