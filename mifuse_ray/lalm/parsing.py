"""Turning free-text LALM answers (and their token logprobs) into labels and distributions."""
from __future__ import annotations

import json
import re

import numpy as np

_WORD = re.compile(r"[a-z]+")


def _canonical(word: str, labels, synonyms: dict[str, str]) -> str | None:
    w = word.lower()
    if w in labels:
        return w
    mapped = synonyms.get(w)
    return mapped if mapped in labels else None


def parse_answer(text: str | None, labels, synonyms: dict[str, str]) -> tuple[int | None, str | None]:
    """(label index, None) for a clear answer, else (None, reason). Handles case, punctuation,
    extra words, synonyms and JSON answers such as {"emotion": "Angry"}."""
    labels = [label.lower() for label in labels]
    if text is None or not str(text).strip():
        return None, "empty_answer"
    text = str(text).strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
            if isinstance(obj, dict):
                for key in ("emotion", "label", "answer", "class", "prediction"):
                    if isinstance(obj.get(key), str):
                        text = obj[key]
                        break
        except json.JSONDecodeError:
            pass
    found = []
    for word in _WORD.findall(text.lower()):
        label = _canonical(word, labels, synonyms)
        if label is not None and label not in found:
            found.append(label)
    if len(found) == 1:
        return labels.index(found[0]), None
    if not found:
        return None, "no_label_in_answer"
    return None, "ambiguous_answer:" + "|".join(found)


def logprob_distribution(logprobs: dict | None, labels, synonyms: dict[str, str]) -> np.ndarray | None:
    """A distribution over the labels from the first answer token whose top logprobs name labels.

    Alternatives that map to the same label are summed; labels absent from the top list get 0.
    Returns None when the response carries no usable logprobs.
    """
    if not logprobs or not isinstance(logprobs, dict):
        return None
    labels = [label.lower() for label in labels]
    for position in logprobs.get("content") or []:
        mass = np.zeros(len(labels))
        hit = False
        for alt in position.get("top_logprobs") or []:
            words = _WORD.findall(str(alt.get("token", "")).lower())
            label = _canonical(words[0], labels, synonyms) if len(words) == 1 else None
            if label is not None and alt.get("logprob") is not None:
                mass[labels.index(label)] += float(np.exp(alt["logprob"]))
                hit = True
        if hit and mass.sum() > 0:
            return mass / mass.sum()
    return None
