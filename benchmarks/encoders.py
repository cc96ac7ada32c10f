"""Encoders side by side: the demo's CNN and the Whisper encoders as the source model's trunk.

    python -m benchmarks.encoders [--encoders whisper_base whisper_tiny_en cnn] [--seeds 0 1 2]
        [--transfers acted_studio:call_centre ... acted_studio:game_voices ...] [--scale demo|paper]
        [--runs outputs/benchmarks/encoders] [--out benchmarks/results/encoders]
    python -m benchmarks.encoders --speed          # encoder throughput, head MC dropout K=10
    python -m benchmarks.encoders --window         # the clip-length window against Whisper's 30 s

Each cell is the six-transfer benchmark's cell (``transfers.run_cell``, resumable) at one recipe for
every encoder, so that the encoder is the only difference: no waveform augmentation (the head-only
student learns on the trunk output stored while labelling) and MC dropout over every dropout layer the
source model has (the CNN's ``full`` scope; a Whisper model's only dropout is its head's, so its
scope is ``head`` and the encoder runs once per clip). ``game_voices`` (real speech,
``python -m mifuse_ray.game_voices``) is a target like any other. Writes ``encoders.csv``
(``encoder,transfer,scale,seed,system,uar,wa``) from every finished cell, merged across invocations,
and ``encoders.md``. ``--speed`` writes ``speed.md``: clips/s of each encoder's trunk on this machine and
K = 10 head passes against one. ``--window`` writes ``window.md``: what the clip-length window (instead
of Whisper's 30 s) costs in accuracy, a linear probe on game_voices' dev split scored on its test split.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import numpy as np
import pandas as pd

from benchmarks.common import commit, machine, mean_std, merge_record, results_dir, runs_dir
from benchmarks.paper_scale import shipped_systems
from benchmarks.transfers import TRANSFER_DOMAINS, run_cell

ENCODERS = ("cnn", "whisper_tiny_en", "whisper_base")
COLUMNS = ["encoder", "transfer", "scale", "seed", "system", "uar", "wa"]
RECIPE = (("train.augment", False),)


def encoder_settings(encoder: str) -> tuple:
    """The cell's settings: the shared recipe, and for a Whisper encoder the encoder and head scope
    (the CNN's cells are then the six-transfer benchmark's ``train.augment=False`` cells)."""
    whisper = (("source_train.encoder", encoder), ("source.mc_scope", "head")) if encoder != "cnn" else ()
    return whisper + RECIPE


def cell_rows(results: dict, encoder: str, transfer: str, scale: str, seed: int) -> list[dict]:
    test = results.get("test", {})
    return [{"encoder": encoder, "transfer": transfer, "scale": scale, "seed": seed, "system": name,
             "uar": test[key]["uar"], "wa": test[key]["wa"]} for name, key in shipped_systems(test, ()).items()]


def rows_from_transfer_cells(path: str, variant: str = "train.augment=False") -> list[dict]:
    """The CNN's rows from a six-transfer record's cells at this recipe (``benchmarks.transfers --ablations
    stored_trunk`` runs exactly these cells), instead of running them again."""
    cells = pd.read_csv(path)
    cells = cells[cells.variant == variant]
    names = {"mifuse_ema": "adapted", "fused_label": "fused_label", "lalm_zero_shot": "lalm_zero_shot",
             "source_only": "source_only"}
    cells = cells[cells.system.isin(names)]
    return [{"encoder": "cnn", "transfer": r.transfer, "scale": "demo", "seed": int(r.seed), "system": names[r.system],
             "uar": r.uar, "wa": r.wa} for r in cells.itertuples()]


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per (encoder, scale, system): each transfer's mean over seeds, and the six demo transfers' average."""
    wide = table.pivot_table(index=["encoder", "scale", "system"], columns="transfer", values="uar", aggfunc="mean")
    six = [c for c in wide.columns if "game_voices" not in c]
    seeds = table[~table.transfer.str.contains("game_voices")].groupby(["encoder", "scale", "system", "seed"]).uar.mean()
    wide["six-transfer average (mean ± std over seeds)"] = [
        mean_std(seeds.loc[idx].tolist()) if idx in seeds.index.droplevel(-1) else "" for idx in wide.index]
    return wide.round(3).reset_index()[["encoder", "scale", "system", *six, *[c for c in wide.columns if c not in six]]]


def write_tables(rows: list[dict], out: str, argv_text: str) -> pd.DataFrame:
    from mifuse_ray.report import markdown_table
    table = merge_record(os.path.join(out, "encoders.csv"), rows, COLUMNS,
                         ["encoder", "transfer", "scale", "seed", "system"])
    text = (f"# Encoders side by side (test UAR)\n\nLast written by `python -m benchmarks.encoders {argv_text}` on "
            f"{machine()}, commit {commit()}, from every finished cell in `encoders.csv`.\n\n"
            + markdown_table(summary(table)) + "\n")
    with open(os.path.join(out, "encoders.md"), "w") as fh:
        fh.write(text)
    return table


def _clips(n: int, seconds: float = 2.2):
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * seconds)) / 16000
    return [(0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
            for _ in range(n)]


def speed_rows(encoders, n: int = 64, batch: int = 16) -> list[dict]:
    """Trunk clips/s and head MC dropout (K = 10) against one pass, per encoder, on this machine's CPUs."""
    import torch
    from mifuse_ray.models.cnn import LogMelCNN
    from mifuse_ray.models.mc import mc_predict
    from mifuse_ray.models.whisper import convert
    from mifuse_ray.data import pad_batch
    torch.set_num_threads(os.cpu_count() or 1)
    labels = ["neutral", "happy", "angry", "sad"]
    batches = [tuple(map(torch.from_numpy, pad_batch(_clips(n)[i:i + batch], None))) for i in range(0, n, batch)]
    rows = []
    for encoder in encoders:
        model = LogMelCNN(labels=labels) if encoder == "cnn" else convert(encoder, labels)
        model.eval()
        timings = {0: [], 10: []}
        mc_predict(model, *batches[0], torch.zeros(batch, 0, dtype=torch.int64), scope="head")   # warm-up
        for k in (0, 10) * 3:                               # interleaved, the median of three of each
            start = time.perf_counter()
            for wav, lengths in batches:
                mc_predict(model, wav, lengths, torch.arange(len(wav) * k).reshape(len(wav), k), scope="head")
            timings[k].append(time.perf_counter() - start)
        timings = {k: float(np.median(v)) for k, v in timings.items()}
        rows.append({"encoder": encoder, "parameters (M)": sum(p.numel() for p in model.parameters()) / 1e6,
                     "clips/s, one pass (2.2-s clips)": n / timings[0], "K=10 head passes / one pass": timings[10] / timings[0]})
    return rows


def window_rows(encoders, manifest: str) -> list[dict]:
    """game_voices' dev split -> test split, a logistic regression on the pooled encoder output, with the
    encoder run over each clip's own length (what ships) and over Whisper's 30-s window."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from mifuse_ray.audio import load_audio
    from mifuse_ray.config import AudioConfig
    from mifuse_ray.metrics import uar
    from mifuse_ray.models.whisper import convert, log_mel
    table = pd.read_parquet(manifest)
    table = table[table.split.isin(["dev", "test"])].reset_index(drop=True)
    audio = [load_audio(p, AudioConfig()) for p in table.path]
    dev, test = (table.split == "dev").to_numpy(), (table.split == "test").to_numpy()
    y = table.oracle_label.map({label: i for i, label in enumerate(sorted(set(table.oracle_label)))}).to_numpy()
    rows = []
    for encoder in [e for e in encoders if e != "cnn"]:
        model = convert(encoder, ["neutral", "happy", "angry", "sad"])
        for window in ("clip", "30 s"):
            start, pooled = time.perf_counter(), []
            with torch.no_grad():
                for wav in audio:
                    x, lengths = torch.from_numpy(wav)[None], torch.tensor([len(wav)])
                    if window == "clip":
                        pooled.append(model.trunk(x, lengths)["pooled"][0].numpy())
                        continue
                    features, frames = log_mel(x, lengths)
                    features = torch.nn.functional.pad(features, (0, 3000 - features.shape[-1]), value=float(features.min()))
                    hidden = model.model.encoder(features[..., :3000]).last_hidden_state[0]
                    pooled.append(hidden[: (int(frames[0]) + 1) // 2].mean(0).numpy())
            seconds = time.perf_counter() - start
            x = np.stack(pooled)
            probe = LogisticRegression(max_iter=2000, C=1.0).fit(x[dev], y[dev])
            rows.append({"encoder": encoder, "window": window, "seconds for the clips": seconds, "clips": len(audio),
                         "probe test UAR (dev -> test)": uar(y[test], probe.predict(x[test]), int(y.max()) + 1)})
    return rows


def write_measurement(args, voices: str) -> None:
    """``--speed`` (speed.md) or ``--window`` (window.md), printed and written under ``--out``."""
    from mifuse_ray.report import markdown_table
    if args.speed:
        name, title = "speed.md", "Encoder speed (`python -m benchmarks.encoders --speed`)"
        table = pd.DataFrame(speed_rows(args.encoders))
    else:
        from mifuse_ray.game_voices import build
        name, title = "window.md", "The clip-length window against Whisper's 30 s (`python -m benchmarks.encoders --window`)"
        table = pd.DataFrame(window_rows(args.encoders, build(voices)))
    text = f"# {title}\n\n{machine()}, CPU, commit {commit()}.\n\n" + markdown_table(table.round(3)) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name), "w") as fh:
        fh.write(text)
    print(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=ENCODERS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--transfers", nargs="*", default=None,
                   help="source:target pairs (default: the six demo transfers, then each source onto game_voices)")
    p.add_argument("--scale", choices=["demo", "paper"], default="demo")
    p.add_argument("--speed", action="store_true", help="measure throughput and the MC overhead instead")
    p.add_argument("--window", action="store_true", help="measure the window's effect on a probe instead")
    p.add_argument("--cnn-from", default="", help="a transfers_cells.csv whose train.augment=False cells are the CNN's")
    p.add_argument("--runs", default=runs_dir("encoders"))
    p.add_argument("--out", default=results_dir("encoders"))
    args = p.parse_args(argv)
    runs = os.path.abspath(args.runs)
    voices = os.path.join(runs, "_demo", "game_voices")
    if args.speed or args.window:
        write_measurement(args, voices)
        return
    from mifuse_ray.ray_utils import init_ray
    init_ray()
    transfers = [tuple(t.split(":")) for t in args.transfers] if args.transfers else \
        [*itertools.permutations(TRANSFER_DOMAINS, 2), *((s, "game_voices") for s in TRANSFER_DOMAINS)]
    if any(t == "game_voices" for _, t in transfers):
        from mifuse_ray.game_voices import build
        build(voices)
    rows = rows_from_transfer_cells(args.cnn_from) if args.cnn_from else []
    for seed, encoder, (source, target) in itertools.product(args.seeds, args.encoders, transfers):
        cell_target = f"{target}_paper" if args.scale == "paper" and target != "game_voices" else target
        results = run_cell(source, cell_target, seed, runs, 1.0, encoder_settings(encoder))
        rows += cell_rows(results, encoder, f"{source}→{target}", args.scale, seed)
        write_tables(rows, args.out, " ".join(argv if argv is not None else sys.argv[1:]))
        print(f"{encoder} {source}→{target} seed {seed}: done", flush=True)


if __name__ == "__main__":
    main()
