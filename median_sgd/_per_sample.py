"""Per-sample (or per-micro-batch) gradients ``G[i] = grad loss(model(x_i), y_i)``, by torch.func.

One implementation for the optimizers (:func:`median_sgd.optim.sample_gradients`, which
:class:`~median_sgd.optim.SampleMedianSGD` reads) and the experiments
(:func:`median_sgd.experiments.bgmd_training.client_gradients`): ``vmap`` of ``grad`` over the
rows. Chapter "SGD along a median across samples".
"""

from __future__ import annotations

import numbers
from typing import Callable, List, Optional, Tuple

import torch

__all__ = ["sample_gradients", "grad_samples_of"]


def sample_gradients(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    micro_batches: Optional[int] = None,
    store: bool = True,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Per-sample (or per-micro-batch) gradients ``G[i] = grad loss_fn(model(x_i), y_i)``, by torch.func.

    ``micro_batches=None`` gives one row per sample (each sample is run as a batch of one);
    ``micro_batches=n`` splits the batch into ``n`` equal consecutive micro-batches (the batch
    size must be divisible by ``n``) and gives the gradient of each micro-batch's loss.
    ``loss_fn(output, target)`` must return the (mean) loss of a micro-batch as a scalar, like
    ``torch.nn.CrossEntropyLoss()``. Computed with ``torch.func.vmap(grad(...))`` over
    ``functional_call`` (one vectorised backward for all rows; dropout draws differ per row).
    Models whose forward updates buffers (BatchNorm in training mode) cannot be vmapped: put them
    in eval mode or use ``torch.func.replace_all_batch_norm_modules_``.

    Returns ``(losses, grads)``: the ``(n,)`` row losses (detached) and, for every parameter
    with ``requires_grad`` in ``model.parameters()`` order, its ``(n, *shape)`` gradients; with
    ``store=True`` each is also stored as ``p.grad_sample`` (Opacus' convention), which
    :class:`SampleMedianSGD` reads.
    """
    from torch.func import functional_call, grad, vmap

    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("inputs and targets must be tensors")
    if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets need the same leading batch size, got {tuple(inputs.shape)} and "
            f"{tuple(targets.shape)}"
        )
    batch = inputs.shape[0]
    rows = batch if micro_batches is None else micro_batches
    if isinstance(rows, bool) or not isinstance(rows, numbers.Integral) or rows < 1:
        raise ValueError(f"micro_batches must be None or an integer >= 1, got {micro_batches!r}")
    if batch % rows != 0:
        raise ValueError(f"the batch size {batch} is not divisible into {rows} micro-batches")
    size = batch // rows
    xs = inputs.reshape(rows, size, *inputs.shape[1:])
    ys = targets.reshape(rows, size, *targets.shape[1:])

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no parameter that requires a gradient")
    trainable = {name: p.detach() for name, p in named}
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def row_loss(params, x, y):
        out = functional_call(model, ({**params, **frozen}, buffers), (x,))
        loss = loss_fn(out, y)
        return loss, loss.detach()

    grads, losses = vmap(grad(row_loss, has_aux=True), in_dims=(None, 0, 0),
                         randomness="different")(trainable, xs, ys)
    out = [grads[name] for name, _ in named]
    if store:
        for (_, p), g in zip(named, out):
            p.grad_sample = g
    return losses, out


def grad_samples_of(params: List[torch.Tensor]) -> Tuple[List[torch.Tensor], int]:
    """``([p.grad_sample ...], n)``, each checked to be ``(n, *p.shape)`` in ``p``'s dtype and
    device (what :class:`~median_sgd.optim.SampleMedianSGD` reads)."""
    samples = [p.grad_sample for p in params]  # type: ignore[attr-defined]
    n = samples[0].shape[0]
    for p, s in zip(params, samples):
        if s.shape != (n, *p.shape) or s.dtype != p.dtype or s.device != p.device:
            raise ValueError(
                f"grad_sample of a parameter of shape {tuple(p.shape)} ({p.dtype}, {p.device}) "
                f"must have shape {(n, *p.shape)}, its dtype and device; got {tuple(s.shape)} "
                f"({s.dtype}, {s.device})"
            )
    return samples, n
