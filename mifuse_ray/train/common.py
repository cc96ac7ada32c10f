"""Pieces shared by the source and student training loops (both run inside Ray Train workers)."""
from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data import pad_batch
from ..metrics import confusion_matrix
from ..models.base import TRUNK_FEATURES


def device_for_worker() -> torch.device:
    import ray.train.torch
    return ray.train.torch.get_device()


def crop_batch(audio_list, crop_len: int, rng: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops (training) or centre crops (rng=None) of at most crop_len samples."""
    clipped = []
    for a in audio_list:
        if len(a) > crop_len:
            start = (len(a) - crop_len) // 2 if rng is None else int(rng.integers(0, len(a) - crop_len + 1))
            a = a[start:start + crop_len]
        clipped.append(a)
    wav, lengths = pad_batch(clipped, crop_len)
    return torch.from_numpy(wav), torch.from_numpy(lengths)


def augment(wav: torch.Tensor, lengths: torch.Tensor, gen: torch.Generator, noise_snr_db=(10.0, 30.0),
            gain_db: float = 6.0, max_shift: int = 0, speed_range=(1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Waveform augmentation: speed/pitch (resampling), time shift, gain, additive noise."""
    B, L = wav.shape
    if speed_range[0] != 1.0 or speed_range[1] != 1.0:
        speed = float(torch.empty(1).uniform_(*speed_range, generator=gen))
        new_len = max(16, int(round(L / speed)))
        wav = F.interpolate(wav[:, None], size=new_len, mode="linear", align_corners=False)[:, 0]
        lengths = torch.clamp((lengths.float() / speed).round().long(), 1, new_len)
        wav = wav[:, :L] if new_len >= L else F.pad(wav, (0, L - new_len))
        lengths = lengths.clamp(max=L)
    if max_shift > 0:
        shifts = torch.randint(-max_shift, max_shift + 1, (B,), generator=gen)
        wav = torch.stack([torch.roll(w, int(s)) for w, s in zip(wav, shifts)])
    mask = (torch.arange(L)[None, :] < lengths[:, None]).float()
    gains = 10 ** (torch.empty(B, 1).uniform_(-gain_db, gain_db, generator=gen) / 20)
    wav = wav * gains
    power = (wav ** 2 * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1)
    snr = torch.empty(B, 1).uniform_(*noise_snr_db, generator=gen)
    noise = torch.randn(wav.shape, generator=gen) * torch.sqrt(power / 10 ** (snr / 10))
    return (wav + noise * mask).clamp(-1, 1), lengths


def mixup(wav: torch.Tensor, lengths: torch.Tensor, q: torch.Tensor, weight: torch.Tensor, alpha: float,
          rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix each clip with another of the batch by one λ ~ Beta(α, α): waveforms, soft labels and
    clip weights alike (a mixed clip is as long as the longer of its two).

    Why: a small target learnt from labels that are wrong 40 % of the time is memorised, errors
    included; mixup keeps the student from fitting any single label exactly (Zhang et al., 2018,
    found it resists corrupted labels). A clip without a label (weight 0) only lends its audio.
    ``rng`` is the step's seeded generator, so a resumed run mixes the same pairs."""
    if alpha <= 0 or len(wav) < 2:
        return wav, lengths, q, weight
    lam = float(rng.beta(alpha, alpha))
    partner = torch.from_numpy(rng.permutation(len(wav))).to(wav.device)
    q = torch.nan_to_num(q, nan=0.0)
    mixed_q = lam * q + (1 - lam) * q[partner]
    mixed_q = mixed_q / mixed_q.sum(-1, keepdim=True).clamp_min(1e-12)
    return (lam * wav + (1 - lam) * wav[partner], torch.maximum(lengths, lengths[partner]), mixed_q,
            lam * weight + (1 - lam) * weight[partner])


def lr_schedule(optimizer, total_steps: int, warmup_frac: float, decay: str = "cosine"):
    """A linear warm-up, then a cosine decay to zero or a constant rate. With "constant" the student
    never anneals, so the EMA teacher is what averages its last ~1/(1 − α) steps (SWA-like), instead
    of equalling a student whose learning rate has already reached zero."""
    if decay not in ("cosine", "constant"):
        raise ValueError(f"lr decay {decay!r}: use 'cosine' or 'constant'")
    warmup = max(1, int(total_steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if decay == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def all_reduce_sum(array: np.ndarray) -> np.ndarray:
    """Sum a numpy array over DDP ranks (identity with one worker)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return array
    t = torch.as_tensor(array, dtype=torch.float64, device=_dist_device())
    dist.all_reduce(t)
    return t.cpu().numpy()


def _dist_device() -> torch.device:
    import torch.distributed as dist
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def batch_inputs(batch: dict, crop_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's model input and lengths: its stored trunk output (B, D) where the rows carry one
    (lengths unused, zero), else its audio zero-padded to the longest clip or to ``crop_len``."""
    if TRUNK_FEATURES in batch:
        x = np.stack([np.asarray(v, dtype=np.float32) for v in batch[TRUNK_FEATURES]])
        return torch.from_numpy(x), torch.zeros(len(x), dtype=torch.int64)
    wav, lengths = pad_batch(list(batch["audio"]), crop_len)
    return torch.from_numpy(wav), torch.from_numpy(lengths)


@torch.no_grad()
def predict_batches(model, batches, device, crop_len: int | None = None):
    """(labels, predictions, probabilities) for batches of {'audio' or TRUNK_FEATURES, 'label_index'} rows."""
    model.eval()
    ys, preds, probs = [], [], []
    for batch in batches:
        x, lengths = batch_inputs(batch, crop_len)
        logits = model(x.to(device), lengths.to(device))
        p = torch.softmax(logits.float(), -1).cpu().numpy()
        probs.append(p)
        preds.append(p.argmax(1))
        ys.append(np.asarray(batch["label_index"]))
    if not ys:
        return np.zeros(0, int), np.zeros(0, int), np.zeros((0, 0))
    return np.concatenate(ys), np.concatenate(preds), np.concatenate(probs)


def evaluate_shard(model, shard, device, num_classes: int, batch_size: int = 64) -> np.ndarray:
    """Confusion matrix over this worker's shard of a labelled split, summed over all ranks."""
    batches = shard.iter_batches(batch_size=batch_size, batch_format="numpy") if shard is not None else []
    y, p, _ = predict_batches(model, batches, device)
    cm = confusion_matrix(y, p, num_classes) if len(y) else np.zeros((num_classes, num_classes))
    return all_reduce_sum(cm.astype(np.float64)).astype(np.int64)


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints, so that nearby tuples give unrelated random streams."""
    import hashlib
    digest = hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=gen))


def strong_augment(wav: torch.Tensor, lengths: torch.Tensor, gen: torch.Generator, sample_rate: int,
                   noise_snr_db=(5.0, 25.0), gain_db: float = 3.0, max_shift: int = 0,
                   time_masks: int = 2, max_mask_frac: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's view in consistency training: what the channel could change without changing
    the emotion. Band-limiting (a telephone or codec) or a band-stop (a frequency mask), a room (an
    exponentially decaying noise impulse response), shift, a little gain, noise, and time masks.
    Speed and large gains are left out on purpose: pitch, rate and loudness carry the emotion, so
    a view that moves them may be another emotion. Band and room are drawn per batch, masks per clip."""
    B, L = wav.shape
    level = wav.abs().amax(1, keepdim=True)
    spectrum = torch.fft.rfft(wav, dim=1)
    freqs = torch.fft.rfftfreq(L, 1.0 / sample_rate)
    if _uniform(gen, 0, 1) < 0.5:
        keep = freqs <= _uniform(gen, 3000.0, 7000.0)                  # band-limited channel
    else:
        low = _uniform(gen, 300.0, 5000.0)
        keep = (freqs < low) | (freqs > low + _uniform(gen, 200.0, 1000.0))   # a frequency mask
    spectrum = spectrum * keep.to(spectrum.dtype)
    if _uniform(gen, 0, 1) < 0.5:                                      # a room
        rt60 = _uniform(gen, 0.1, 0.5)
        n = int(rt60 * sample_rate)
        t = torch.arange(n) / sample_rate
        ir = torch.randn(n, generator=gen) * torch.exp(-6.9 * t / rt60) * 0.3
        ir[0] = 1.0
        spectrum = spectrum * torch.fft.rfft(ir, n=L)[None, :]
    wav = torch.fft.irfft(spectrum, n=L, dim=1)
    wav = wav * level / wav.abs().amax(1, keepdim=True).clamp_min(1e-6)   # the clip's own peak level
    wav, lengths = augment(wav, lengths, gen, noise_snr_db, gain_db, max_shift)
    for _ in range(time_masks):
        width = (torch.rand(B, generator=gen) * max_mask_frac * lengths.float()).long()
        start = (torch.rand(B, generator=gen) * (lengths - width).clamp_min(1).float()).long()
        pos = torch.arange(L)[None, :]
        wav = wav * ~((pos >= start[:, None]) & (pos < (start + width)[:, None]))
    return wav, lengths


@torch.no_grad()
def shrink_perturb(model: torch.nn.Module, shrink: float, perturb: float, seed: int) -> torch.nn.Module:
    """θ ← shrink·θ + perturb·θ_fresh for every parameter (Ash & Adams, 2020), θ_fresh drawn by each
    module's own ``reset_parameters``. A student fine-tuned from the source weights at a small learning
    rate keeps the source's cues even where the target lacks them (a loudness-normalised target has no
    energy cue); a shrunk start keeps their direction and lets the target's labels move it. Buffers
    (BatchNorm statistics) are kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if not own or not hasattr(module, "reset_parameters"):
                continue
            fresh = copy.deepcopy(module)
            fresh.reset_parameters()
            for p, f in zip(own, fresh.parameters(recurse=False)):
                p.mul_(shrink).add_(f, alpha=perturb)
    return model


def batch_norm_layers(model: torch.nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def running_statistics_kept(model: torch.nn.Module):
    """BatchNorm layers in training mode normalise by the batch but leave their running statistics
    alone inside this block. The consistency term's strong view (band-limited, reverberant, masked)
    is not what the model sees at test time; with ``train.batchnorm: update`` its batches would
    otherwise pull the statistics the EMA teacher and the final model normalise clean clips with."""
    norms = [m for m in batch_norm_layers(model) if m.training]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


def process_group_size() -> int:
    """Ranks in the torch.distributed process group (1 without one): a DDP run proves it ran as one group."""
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def weights_rank_spread(model) -> float:
    """max − min over DDP ranks of a parameter checksum: 0 when every rank holds the same weights."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return 0.0          # one rank: nothing to compare (and a Whisper trunk's sum costs ~0.2 s an epoch)
    checksum = sum(float(p.detach().double().sum()) + 1e-3 * float(p.detach().double().abs().sum())
                   for p in model.parameters())
    hi = torch.tensor([checksum], dtype=torch.float64)
    lo = hi.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float(hi - lo)
