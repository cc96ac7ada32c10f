"""The source classifier as a teacher: a Ray Data actor stage with batched MC-dropout.

Each actor loads the checkpoint once. Per clip it returns the deterministic prediction, an
embedding, K MC-dropout distributions and one label drawn from each (the vote the fusion
counts). Clips are padded to a length that depends only on the clip itself and grouped by it,
and masks and draws are seeded per (clip id, pass), so the output does not depend on batching.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .data import pad_batch
from .fusion import draw_labels
from .models.base import TRUNK_FEATURES, load_model
from .models.mc import hashed_uniform, mc_predict, mc_seeds

PAD_BUCKET_S = 0.5


def vote_uniforms(seed: int, clip_ids, passes: int) -> np.ndarray:
    """(B, K) uniforms for drawing one label per MC pass, seeded per (clip, pass)."""
    seeds = mc_seeds(seed + 1, clip_ids, passes)
    return hashed_uniform(seeds.reshape(-1), layer=-1, shape=(1,)).reshape(len(clip_ids), passes).numpy()


class SourceTeacherStage:
    def __init__(self, checkpoint: str, passes_per_clip: int = 10, scope: str = "full", seed: int = 0,
                 dropout_override: float | None = None, amp: bool = True, labels=None, keep_audio: bool = True,
                 name: str = "source"):
        self.model = load_model(checkpoint, labels=labels)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.K, self.scope, self.seed = passes_per_clip, scope, seed
        self.p_override, self.amp, self.keep_audio = dropout_override, amp, keep_audio
        self.bucket = int(PAD_BUCKET_S * self.model.sample_rate)
        self.name = name        # the teacher's column prefix; only the source model ("source") adds embeddings

    def predict(self, clip_ids, audio_list) -> dict[str, np.ndarray]:
        """Predictions for valid clips, grouped by padded length (batch-independent results)."""
        n, C = len(clip_ids), self.model.num_classes
        out = {"det": np.zeros((n, C), np.float32), "probs": np.zeros((n, self.K, C), np.float32),
               "votes": np.zeros((n, self.K), np.int64), "emb": None, "pooled": None}
        padded = np.array([int(np.ceil(max(len(a), 1) / self.bucket)) * self.bucket for a in audio_list])
        for length in np.unique(padded):
            idx = np.flatnonzero(padded == length)
            wav, lengths = pad_batch([audio_list[i] for i in idx], int(length))
            ids = [clip_ids[i] for i in idx]
            res = mc_predict(self.model, torch.from_numpy(wav).to(self.device), torch.from_numpy(lengths).to(self.device),
                             mc_seeds(self.seed, ids, self.K).to(self.device), scope=self.scope,
                             p_override=self.p_override, amp=self.amp)
            out["det"][idx] = res.det_probs.cpu().numpy()
            probs = res.probs.cpu().numpy()
            out["probs"][idx] = probs
            out["votes"][idx] = draw_labels(probs, vote_uniforms(self.seed, ids, self.K))
            emb = res.embedding.cpu().numpy()
            if out["emb"] is None:
                out["emb"] = np.zeros((n, emb.shape[1]), np.float32)
            out["emb"][idx] = emb
            if res.pooled is not None:
                pooled = res.pooled.cpu().numpy()
                if out["pooled"] is None:
                    out["pooled"] = np.zeros((n, pooled.shape[1]), np.float32)
                out["pooled"][idx] = pooled
        return out

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.copy()
        ok = batch["error"].isna().to_numpy()
        idx = np.flatnonzero(ok)
        det, probs, votes, emb, pooled = ([None] * len(batch) for _ in range(5))
        if len(idx):
            res = self.predict([batch["clip_id"].iloc[i] for i in idx], [batch["audio"].iloc[i] for i in idx])
            for j, i in enumerate(idx):
                det[i] = res["det"][j].tolist()
                probs[i] = res["probs"][j].tolist()
                votes[i] = res["votes"][j].tolist()
                emb[i] = res["emb"][j].tolist()
                if res["pooled"] is not None:
                    pooled[i] = res["pooled"][j].tolist()
        batch[f"{self.name}_det"], batch[f"{self.name}_probs"], batch[f"{self.name}_votes"] = det, probs, votes
        if self.name == "source":
            batch["embedding"] = emb
            if self.model.stores_trunk:
                batch[TRUNK_FEATURES] = pooled
        if not self.keep_audio:
            batch = batch.drop(columns=["audio"])
        return batch
