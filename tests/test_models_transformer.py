"""The encoder-transformer language model: shapes, causality, seeded initialisation, loss."""

from __future__ import annotations

import math

import pytest
import torch

from median_sgd.models import TransformerLM
from median_sgd.models.transformer import sinusoidal_positions

V, D = 50, 16


def _model(**kw):
    kw = {"d_model": D, "nhead": 2, "d_hid": 24, "nlayers": 2, "max_len": 32, **kw}
    return TransformerLM(V, **kw)


def _ids(b=3, length=7, seed=0):
    return torch.randint(0, V, (b, length), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_loss_at_initialisation_is_close_to_log_vocab():
    model = _model()
    src = _ids()
    logits = model(src)
    assert logits.shape == (3, 7, V) and logits.dtype == torch.float32
    loss = model.loss(src, _ids(seed=1))
    # Small initial weights: the predicted distribution is close to uniform.
    assert abs(loss.item() - math.log(V)) < 0.1


def test_causal_prefix_oracle():
    # Logits at position t must equal the last logits of the model run on the prefix src[:, :t+1].
    model = _model().double()
    src = _ids(b=2, length=6)
    full = model(src)
    for t in range(src.shape[1]):
        prefix = model(src[:, : t + 1])[:, -1]
        torch.testing.assert_close(full[:, t], prefix, rtol=1e-10, atol=1e-10)
    # and changing a later token leaves earlier positions untouched
    changed = src.clone()
    changed[:, 4] = (changed[:, 4] + 1) % V
    out = model(changed)
    torch.testing.assert_close(out[:, :4], full[:, :4], rtol=0, atol=0)
    assert not torch.allclose(out[:, 4], full[:, 4])


def test_seeded_initialisation_is_deterministic_and_follows_kunstner_et_al():
    a, b, c = _model(seed=3), _model(seed=3), _model(seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.dim() > 1:
            assert not torch.equal(pa, pc), name
    big = TransformerLM(2000, d_model=64, nhead=2, d_hid=64, nlayers=1, seed=0)
    params = dict(big.named_parameters())
    for name in ("embedding.weight", "decoder.weight", "encoder.layers.0.linear1.weight"):
        w = params[name]
        assert abs(w.mean().item()) < 2e-3 and abs(w.std().item() - 0.02) < 1e-3, name
    ln = params["encoder.layers.0.norm1.weight"]
    assert abs(ln.mean().item() - 1.0) < 0.01 and 0.01 < ln.std().item() < 0.03
    w = params["encoder.layers.0.self_attn.in_proj_weight"]
    bound = math.sqrt(6 / (3 * 64 + 64))
    assert w.abs().max().item() <= bound and w.abs().max().item() > 0.9 * bound
    for name, p in params.items():
        if name.endswith("bias") and "norm" not in name:
            assert torch.count_nonzero(p) == 0, name
    # reset_parameters restores the seeded state
    before = [p.clone() for p in a.parameters()]
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
    a.reset_parameters(3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))


def test_sinusoidal_positions_match_the_formula():
    pe = sinusoidal_positions(5, 7)
    assert pe.shape == (5, 7)
    for t in range(5):
        for j in range(7):
            i2 = j - (j % 2)
            angle = t / 10000 ** (i2 / 7)
            expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert abs(pe[t, j].item() - expected) < 1e-6


def test_dtype_and_device(device):
    model = _model().to(device=device, dtype=torch.float64)
    src = _ids().to(device)
    out = model(src)
    assert out.dtype == torch.float64 and out.device.type == device.type
    cpu = _model().double()(_ids())
    torch.testing.assert_close(out.cpu(), cpu, rtol=1e-9, atol=1e-9)


def test_gradient_covers_every_parameter_and_input_is_not_modified():
    model = _model()
    src, tgt = _ids(), _ids(seed=1)
    src0 = src.clone()
    loss = model.loss(src, tgt)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(src, src0)


def test_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        TransformerLM(V, d_model=10, nhead=3)
    with pytest.raises(ValueError, match="vocab_size"):
        TransformerLM(0)
    with pytest.raises(ValueError, match="dropout"):
        TransformerLM(V, dropout=1.0)
    with pytest.raises(TypeError, match="seed"):
        TransformerLM(V, seed=1.5)
    model = _model()
    with pytest.raises(TypeError, match="LongTensor"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="target shape"):
        model.loss(_ids(), _ids(length=6))
