"""A small encoder-transformer language model in plain torch (chapter "A transformer with fixed weights").

``logits = W_dec · Encoder(sqrt(d) · E[x] + P) + b_dec``: a word embedding ``E`` scaled by
``sqrt(d_model)``, sinusoidal positional encodings ``P`` (Vaswani et al., 2017), a stack of
``nn.TransformerEncoderLayer`` (post-norm, ReLU) under a causal mask, so position ``t`` only
sees tokens ``<= t``, and a linear decoder to the vocabulary. This is the PyTorch-tutorial model
that Kunstner et al. (2023) train on PTB and WikiText-2 (``TransformerEncoderModel(ntoken, 200,
2, 200, 2)``), with their initialisation (``weights_init``): every ``Linear`` and ``Embedding``
weight drawn from ``N(0, 0.02^2)``, LayerNorm weights from ``N(1, 0.02^2)``, biases zero, the
attention input projections Xavier-uniform. All of it is drawn from one ``torch.Generator``
seeded by ``seed``, so a seed fixes the weights on every device.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_real

__all__ = ["TransformerLM", "sinusoidal_positions"]

_INIT_STD = 0.02


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """``P[t, 2i] = sin(t / 10000^(2i/d))``, ``P[t, 2i+1] = cos(t / 10000^(2i/d))``, shape ``(length, d)``."""
    position = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq)[:, : d_model // 2]
    return pe.float()


class TransformerLM(nn.Module):
    """Causal encoder-transformer LM: ``(B, L)`` word ids -> ``(B, L, vocab_size)`` logits.

    Defaults are the sizes of Kunstner et al.'s PTB model (``d_model = d_hid = 200``, 2 heads,
    2 layers). ``dropout`` defaults to 0: with weights fixed, the experiments want a deterministic
    gradient for each mini-batch.
    """

    positions: torch.Tensor  # a buffer: (max_len, d_model) sinusoidal position encodings

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 200,
        nhead: int = 2,
        d_hid: int = 200,
        nlayers: int = 2,
        dropout: float = 0.0,
        max_len: int = 512,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        vocab_size, d_model, nhead, d_hid, nlayers, max_len = (
            int(check_real(value, name, 1, integer=True)) for value, name in (
                (vocab_size, "vocab_size"), (d_model, "d_model"), (nhead, "nhead"),
                (d_hid, "d_hid"), (nlayers, "nlayers"), (max_len, "max_len")))
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        dropout = check_real(dropout, "dropout", 0, 1, hi_open=True)
        seed = int(check_real(seed, "seed", integer=True))
        self.vocab_size, self.d_model, self.max_len = vocab_size, d_model, max_len
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(d_model, nhead, d_hid, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.decoder = nn.Linear(d_model, vocab_size)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Kunstner et al.'s initialisation, drawn on the CPU from ``torch.Generator().manual_seed(seed)``."""
        gen = torch.Generator().manual_seed(seed)

        def normal(p: torch.Tensor, mean: float) -> None:
            p.copy_(mean + _INIT_STD * torch.randn(p.shape, generator=gen, dtype=torch.float64))

        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                normal(module.weight, 0.0)
                bias = getattr(module, "bias", None)
                if bias is not None:
                    bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                normal(module.weight, 1.0)
                module.bias.zero_()
            elif isinstance(module, nn.MultiheadAttention):
                w = module.in_proj_weight  # (3 d, d): fan_in = d, fan_out = 3 d
                bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
                w.copy_((2 * torch.rand(w.shape, generator=gen, dtype=torch.float64) - 1) * bound)
                module.in_proj_bias.zero_()
                # out_proj is an nn.Linear: handled above.

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        """Logits of the next word at every position: ``src`` ``(B, L)`` -> ``(B, L, vocab_size)``."""
        if not isinstance(src, torch.Tensor) or src.dtype != torch.long or src.dim() != 2:
            raise TypeError("src must be a 2-D LongTensor of word ids, shape (batch, length)")
        length = src.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        x = self.embedding(src) * math.sqrt(self.d_model) + self.positions[:length]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=src.device,
                                                              dtype=x.dtype)
        h = self.encoder(self.dropout(x), mask=mask, is_causal=True)
        return self.decoder(h)

    def loss(self, src: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean next-word cross-entropy over all ``B * L`` positions."""
        if target.shape != src.shape:
            raise ValueError(f"target shape {tuple(target.shape)} must equal src shape {tuple(src.shape)}")
        logits = self(src)
        return nn.functional.cross_entropy(logits.reshape(-1, self.vocab_size), target.reshape(-1))
