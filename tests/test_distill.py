import numpy as np
import pytest
import torch

from mifuse_ray.train.distill import align_frames, cka_loss, logit_kl, weighted_cka


def rand(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cka_of_itself_is_one_and_invariances():
    X = rand(200, 16)
    assert weighted_cka(X, X).item() == pytest.approx(1.0)
    Q, _ = torch.linalg.qr(rand(16, 16, 1))
    assert weighted_cka(X, X @ Q).item() == pytest.approx(1.0)           # orthogonal transform
    assert weighted_cka(X, 3.7 * X).item() == pytest.approx(1.0)         # isotropic scaling
    Y = rand(200, 40, 2)                                                  # different width
    v = weighted_cka(X, Y).item()
    assert 0 <= v < 0.5
    assert weighted_cka(X, torch.cat([X, Y], 1)).item() > v


def test_uniform_weights_equal_plain_cka_and_integer_weights_equal_duplication():
    X, Y = rand(50, 8, 3), rand(50, 12, 4)
    assert weighted_cka(X, Y, torch.ones(50)).item() == pytest.approx(weighted_cka(X, Y).item())
    counts = torch.tensor(np.random.default_rng(0).integers(1, 4, 50))
    dup_x = torch.repeat_interleave(X, counts, 0)
    dup_y = torch.repeat_interleave(Y, counts, 0)
    assert weighted_cka(X, Y, counts.double()).item() == pytest.approx(weighted_cka(dup_x, dup_y).item(), rel=1e-9)


def test_losses_have_gradients_and_teacher_is_detached():
    s = torch.randn(2, 10, 8, requires_grad=True)
    t = torch.randn(2, 25, 32, requires_grad=True)
    loss = cka_loss(s, t)
    loss.backward()
    assert s.grad is not None and t.grad is None
    assert align_frames(t.detach(), 10).shape == (2, 10, 32)
    logits = torch.randn(4, 4, requires_grad=True)
    assert logit_kl(logits, logits.detach()).item() == pytest.approx(0.0, abs=1e-6)


def test_frame_attention_and_distill_terms():
    from mifuse_ray.train.distill import distill_terms, frame_attention
    torch.manual_seed(0)
    frames = torch.randn(3, 10, 8)
    mask = torch.ones(3, 10)
    mask[1, 6:] = 0
    w = frame_attention(frames, mask)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    assert (w[1, 6:] == 0).all() and (w[1, :6] > 0).all()
    logits = torch.randn(3, 4)
    same = distill_terms(logits, frames, mask, logits, frames, mask, 1.0, 2.0, 1.0)
    assert same["distill_kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert same["cka"].item() == pytest.approx(0.0, abs=1e-6)        # identical representations: CKA = 1
    wider = torch.cat([frames, frames @ torch.randn(8, 24)], -1)      # another width, same information
    other = distill_terms(torch.randn(3, 4), torch.randn(3, 10, 8), mask, logits, wider, mask, 0.5, 2.0, 0.5)
    assert other["distill_kl"].item() > 0 and 0 < other["cka"].item() <= 0.5
    assert "cka" not in distill_terms(logits, None, None, logits, None, None, 1.0, 2.0, 0.0)
