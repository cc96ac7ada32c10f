"""A student run's checkpoint: the student, its EMA teacher, the optimiser and schedule, the step,
the running class means of re-fusion, and every epoch's metrics so far (Ray Train keeps only the
checkpoints it ranks best, and a resumed attempt starts its own metrics table afresh). A student on
the stored trunk output keeps only its head and names the source checkpoint it sits on
(``models.base.save_head_on_base``); the final model copied from it does the same."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..models.base import save_head_on_base

HISTORY_FILE = "history.json"


def save_checkpoint(directory: str, run, epoch: int) -> None:
    for name, model in (("student", run.student), ("ema", run.ema.model if run.ema is not None else None)):
        if model is None:
            continue
        if run.inp.stored_trunk:     # its trunk never ran, so it is the source's: store the head alone
            save_head_on_base(model, os.path.join(directory, name), run.inp.source_checkpoint)
        else:
            model.save(os.path.join(directory, name))
    torch.save({"optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(), "step": run.step,
                "epoch": epoch, "balances": {k: b.mean.tolist() for k, b in run.balances.items()}},
               os.path.join(directory, "train_state.pt"))
    # Every epoch's metrics so far travel with the checkpoint: Ray Train's own metrics table only
    # holds the checkpoints it kept, ordered by score, and a resumed attempt starts it afresh.
    with open(os.path.join(directory, HISTORY_FILE), "w") as fh:
        json.dump(run.history, fh, default=float)


def load_checkpoint(directory: str, student, ema, opt, sched, balances) -> tuple[int, int, list[dict]]:
    from ..models.base import load_model
    student.load_state_dict(load_model(os.path.join(directory, "student")).state_dict())
    if ema is not None:
        ema.model.load_state_dict(load_model(os.path.join(directory, "ema")).state_dict())
    state = torch.load(os.path.join(directory, "train_state.pt"), weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    for name, mean in state.get("balances", {}).items():
        balances[name].mean = np.asarray(mean)
    return int(state["step"]), int(state["epoch"]), read_history(directory)


def read_history(directory: str) -> list[dict]:
    path = os.path.join(directory, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return json.load(fh)
