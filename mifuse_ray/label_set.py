"""Emotion label sets: configuration, never hard-coded in a stage."""
from __future__ import annotations

DEFAULT_LABELS: tuple[str, ...] = ("neutral", "happy", "angry", "sad")

# Words an LALM may answer with, mapped to the canonical four-class names.
DEFAULT_SYNONYMS: dict[str, str] = {
    "neutral": "neutral", "calm": "neutral", "normal": "neutral", "none": "neutral",
    "happy": "happy", "happiness": "happy", "joy": "happy", "joyful": "happy", "excited": "happy",
    "excitement": "happy", "cheerful": "happy", "glad": "happy",
    "angry": "angry", "anger": "angry", "frustrated": "angry", "frustration": "angry",
    "annoyed": "angry", "mad": "angry", "furious": "angry", "irritated": "angry",
    "sad": "sad", "sadness": "sad", "unhappy": "sad", "depressed": "sad", "sorrow": "sad",
    "sorrowful": "sad", "upset": "sad",
}


class LabelSetMismatch(ValueError):
    """The label set of a checkpoint differs from the one in the configuration."""


def check_same_labels(checkpoint_labels, config_labels, what: str = "source checkpoint") -> None:
    if list(checkpoint_labels) != list(config_labels):
        raise LabelSetMismatch(
            f"the {what} was trained on labels {list(checkpoint_labels)} but the config asks for "
            f"{list(config_labels)}; set `labels` in the config to the checkpoint's list (same order)")
