"""game_voices: the line -> emotion table, splits disjoint by voice-pack family, a clear line when missing."""
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from mifuse_ray import game_voices
from mifuse_ray.demo.domains import ensure_domain
from mifuse_ray.label_set import DEFAULT_LABELS


def test_every_mapped_line_is_a_demo_class_and_no_line_is_both_mapped_and_left_out():
    assert set(game_voices.EMOTION_OF_LINE.values()) == set(DEFAULT_LABELS)
    assert not set(game_voices.EMOTION_OF_LINE) & set(game_voices.LEFT_OUT)
    assert game_voices.line_of("x/Firepunch3.ogg") == "Firepunch" and game_voices.line_of("Uh-oh.ogg") == "Uh-oh"


def _fake_voices(root, packs, lines):
    voices = root / "game_voices" / "hedgewars" / game_voices.VOICES
    for pack in packs:
        (voices / pack).mkdir(parents=True)
        for line in lines:
            sf.write(voices / pack / f"{line}.ogg", 0.1 * np.sin(np.arange(8000) / 5.0), 16000)
    return voices


def test_the_manifest_keeps_mapped_lines_and_splits_by_pack_family(tmp_path):
    _fake_voices(tmp_path, ["Default", "Default_es", "Russian", "Russian_pl", "Pirate", "Unknownpack"],
                 ["Laugh", "Nooo", "Ow1", "Takecover", "Illgetyou"])
    manifest = ensure_domain("game_voices", str(tmp_path))
    table = pd.read_parquet(manifest)
    assert set(table.line) == {"Laugh", "Nooo", "Takecover", "Illgetyou"}            # Ow is pain, left out
    assert table.groupby("speaker_id").split.nunique().max() == 1
    assert dict(table.groupby("speaker_id").split.first()) == {
        "Default": "test", "Default_es": "test", "Russian": "dev", "Russian_pl": "dev", "Pirate": "adapt"}
    adapt = table[table.split == "adapt"]
    assert adapt.label.isna().all() and adapt.oracle_label.notna().all()
    assert (table[table.split != "adapt"].label == table[table.split != "adapt"].oracle_label).all()


def test_missing_game_voices_ends_in_one_line_naming_the_install_command(tmp_path):
    with pytest.raises(SystemExit) as err:
        ensure_domain("game_voices", str(tmp_path))
    assert "python -m mifuse_ray.game_voices --out" in str(err.value) and "\n" not in str(err.value)


def test_the_docs_table_is_the_codes_mapping():
    import os
    import re
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "encoders.md")).read()
    rows = dict(re.findall(r"^\| (happy|angry|sad|neutral|\(left out\)) \| (.+) \|$", text, flags=re.M))
    documented = {line: label for label, lines in rows.items() if label != "(left out)" for line in lines.split(", ")}
    assert documented == game_voices.EMOTION_OF_LINE
    assert tuple(rows["(left out)"].split(", ")) == game_voices.LEFT_OUT
