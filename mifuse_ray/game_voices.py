"""``game_voices``: a real-speech target from the acted voice lines in Debian's ``hedgewars-data``.

Fifteen voice packs (several languages) each speak the same ~60 game lines, and a line's file name
says what is acted ("Laugh", "Youllregretthat", "Nooo", "Takecover"). ``EMOTION_OF_LINE`` maps a line
to one of the four demo classes, or leaves it out (pain and effort sounds are not emotions); it is the
table in docs/game_voices.md, and the labels are weak: comic, exaggerated acting of one-word lines.

Speakers are voice packs, and the splits are disjoint by pack *family* (``Default`` and its
translations ``Default_es`` … are one character, ``Russian``/``Russian_pl`` another), so no actor who
might voice two packs of a family is on both sides of a split.

    python -m mifuse_ray.game_voices --out data/game_voices     # downloads the .deb, writes the manifest
    python jobs/adapt.py --target data/game_voices/manifest.parquet
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import tempfile

import pandas as pd

DEB = "hedgewars-data"
VOICES = os.path.join("usr", "share", "games", "hedgewars", "Data", "Sounds", "voices")
_LINES = {
    "happy": "Laugh Victory Flawless Excellent Brilliant Amazing Firstblood Enemydown Hello Watchthis Thisoneismine",
    "angry": "Youllregretthat Illgetyou Gonnagetyou Justyouwait Revenge Traitor Stupid Coward Nutter Comeonthen "
             "Cutitout Watchit Sameteam Leavemealone",
    "sad": "Nooo Ohdear Uh-oh Oops Missed Byebye Solong Drat Bugger Boring",
    "neutral": "Hmm Yessir Incoming Takecover Reinforcements Hurry Fire Grenade Flyaway Runaway Whatthe Melon Kamikaze",
}
EMOTION_OF_LINE: dict[str, str] = {line: label for label, lines in _LINES.items() for line in lines.split()}
LEFT_OUT = ("Ow", "Ooff", "Ouch", "Jump", "Firepunch", "PoisonMoan", "PoisonCough")   # pain and effort
# split -> pack families (a family is the pack name before its first "_")
SPLIT_OF_FAMILY = {"test": ("Default",), "dev": ("Russian", "Singer"),
                   "adapt": ("British", "Classic", "HillBilly", "Mobster", "Pirate", "Robot", "Surfer")}
MISSING = (f"game_voices needs Debian's {DEB}: run `python -m mifuse_ray.game_voices --out <folder>` "
           f"(it runs `apt-get download {DEB}` and unpacks it with `dpkg-deb -x`), or pass --deb <the .deb>")


def line_of(path: str) -> str:
    """``Firepunch3.ogg`` -> ``Firepunch``: a line's name without its take number."""
    return re.sub(r"\d+$", "", os.path.splitext(os.path.basename(path))[0])


def unpack(out: str, deb: str = "") -> str:
    """The voices folder of ``hedgewars-data`` under ``out``, downloading the package when no .deb is given."""
    voices = os.path.join(out, "hedgewars", VOICES)
    if os.path.isdir(voices):
        return voices
    with tempfile.TemporaryDirectory() as tmp:
        if not deb:
            if shutil.which("apt-get") is None:
                raise SystemExit(MISSING)
            done = subprocess.run(["apt-get", "download", DEB], cwd=tmp, capture_output=True, text=True)
            found = glob.glob(os.path.join(tmp, f"{DEB}_*.deb"))
            if done.returncode != 0 or not found:
                raise SystemExit(f"apt-get download {DEB} failed ({done.stderr.strip()[-200:]}); {MISSING}")
            deb = found[0]
        os.makedirs(os.path.join(out, "hedgewars"), exist_ok=True)
        done = subprocess.run(["dpkg-deb", "-x", deb, os.path.join(out, "hedgewars")], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"dpkg-deb -x {deb} failed ({done.stderr.strip()[-200:]}); {MISSING}")
    return voices


def manifest_rows(voices: str) -> list[dict]:
    split_of = {family: split for split, families in SPLIT_OF_FAMILY.items() for family in families}
    rows = []
    for path in sorted(glob.glob(os.path.join(voices, "*", "*.ogg"))):
        pack, line = os.path.basename(os.path.dirname(path)), line_of(path)
        label, split = EMOTION_OF_LINE.get(line), split_of.get(pack.split("_")[0])
        if label is None or split is None:
            continue
        rows.append(dict(clip_id=f"{pack}_{os.path.splitext(os.path.basename(path))[0]}", path=path,
                         domain="game_voices", speaker_id=pack, split=split, line=line,
                         label=None if split == "adapt" else label, oracle_label=label))
    return rows


def build(out: str, deb: str = "") -> str:
    """``<out>/manifest.parquet`` of the mapped lines (made once; the audio stays where it was unpacked)."""
    manifest = os.path.join(out, "manifest.parquet")
    if os.path.exists(manifest):
        return manifest
    rows = manifest_rows(unpack(out, deb))
    if not rows:
        raise SystemExit(f"no voice lines under {out}: {MISSING}")
    os.makedirs(out, exist_ok=True)
    pd.DataFrame(rows).to_parquet(manifest, index=False)
    return manifest


def ensure(root: str) -> str:
    """The manifest under ``root/game_voices`` where it was built, else the one-line instruction."""
    manifest = os.path.join(root, "game_voices", "manifest.parquet")
    if os.path.exists(manifest):
        return manifest
    if os.path.isdir(os.path.join(root, "game_voices", "hedgewars", VOICES)):
        return build(os.path.join(root, "game_voices"))
    raise SystemExit(f"{manifest} is missing. {MISSING.replace('<folder>', os.path.join(root, 'game_voices'))}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Build the game_voices manifest from Debian's hedgewars-data.")
    p.add_argument("--out", default="data/game_voices")
    p.add_argument("--deb", default="", help="a downloaded hedgewars-data .deb (default: apt-get download it)")
    args = p.parse_args(argv)
    manifest = build(args.out, args.deb)
    table = pd.read_parquet(manifest)
    print(f"{manifest}: {len(table)} clips, {table.speaker_id.nunique()} voice packs")
    print(pd.crosstab(table.split, table.oracle_label).to_string())


if __name__ == "__main__":
    main()
