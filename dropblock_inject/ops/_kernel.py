"""The kernel interface, and the one rule every kernel follows: ``out = where(keep, x, 0) * scale``.

A dropped cell is 0 whatever ``x`` holds there (NaN and inf included), a kept cell is ``x * scale`` (a kept NaN
or inf stays one); ``scale`` is the fp32 ``numel(keep) / sum(keep)`` (0 when nothing is kept, 1 without
normalisation). Backward is the same product with the gradient. The kernels: ``_sparse.SPARSE`` (CPU),
``_dense.DENSE`` (any device), ``_triton.TRITON`` (CUDA, or Triton's interpreter on CPU tensors).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Kernel:
    """One implementation of DropBlock: forward, backward, the mask alone, and their fake (shape) versions.

    ``state`` is what a kernel's backward needs besides the scale; its form is the kernel's own, always of a
    size known from the input's shape (so traced graphs need no data-dependent sizes).
    """

    name = "kernel"

    def forward(self, x: Tensor, keep_prob: Tensor, block_size: int, per_channel: bool,
                normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
        """``(out, state, scale)``: the output laid out as ``torch.empty_like(x)``, the backward state and the
        fp32 0-d scale."""
        raise NotImplementedError

    def backward(self, grad: Tensor, state: Tensor, scale: Tensor, block_size: int, per_channel: bool,
                 stride: list[int]) -> Tensor:
        """``where(keep, grad, 0) * scale``, the mask rebuilt from ``state``; ``stride`` is the forward
        output's. Laid out as :meth:`fake_backward` says."""
        raise NotImplementedError

    def mask(self, like: Tensor, stride: list[int], keep_prob: Tensor, block_size: int, per_channel: bool,
             normalize: bool) -> tuple[Tensor, Tensor]:
        """``(keep, scale)`` that :meth:`forward` would apply to an input like ``like`` (its shape, dtype and
        device; its memory is not read): a ``bool`` mask broadcasting to ``like`` and the fp32 0-d scale."""
        raise NotImplementedError

    def fake_forward(self, x: Tensor, block_size: int, per_channel: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Tensors shaped as :meth:`forward`'s outputs (for tracing)."""
        raise NotImplementedError

    def fake_backward(self, grad: Tensor, stride: list[int]) -> Tensor:
        """A tensor laid out as :meth:`backward`'s result."""
        return torch.empty_like(grad)

    def fake_mask(self, like: Tensor, stride: list[int], block_size: int,
                  per_channel: bool) -> tuple[Tensor, Tensor]:
        """Tensors shaped as :meth:`mask`'s outputs."""
        raise NotImplementedError

    def eager(self, x: Tensor, keep_prob: float, keep_prob_tensor: Tensor | None, block_size: int,
              per_channel: bool, normalize: bool, inplace: bool) -> Tensor:
        """DropBlock outside any trace, ``keep_prob`` given as a float and, where the caller holds one, as an
        fp32 0-d tensor; by default the registered operator (a kernel may skip the dispatch)."""
        kp = torch.tensor(keep_prob, dtype=torch.float32) if keep_prob_tensor is None else keep_prob_tensor
        return torch.ops.dropblock_inject.drop_block.default(x, kp.to(x.device), block_size, per_channel,
                                                             normalize)[0]

    def __repr__(self) -> str:
        return f"<DropBlock kernel {self.name!r}>"


def apply_keep(x: Tensor, keep: Tensor, scale: Tensor, out: Tensor | None = None) -> Tensor:
    """``where(keep, x, 0) * scale``, into ``out`` when given (``x`` itself, in place, or a tensor laid out as the
    caller needs), else as a new tensor; ``keep`` (``bool``) broadcasts to ``x``, ``scale`` is fp32 (the product is
    computed at least in fp32, rounded once to x's dtype). Differentiable when ``out`` is ``None`` or ``x``: autograd
    keeps the mask (or its scaled multiplier) and the scale, not ``x``, and a hook gives the gradient the same rule.

    On CPU, where ``torch.where`` is several times slower than a product, it multiplies (one pass with a small
    fp32 multiplier, two with a full mask), then, only if the result holds a NaN or inf (a sum tells, at about a
    third of the product's cost), zeroes the dropped cells that a NaN or inf input left NaN.
    """
    if x.device.type != "cpu":
        if out is None or out is x:
            y = torch.where(keep, x, 0.0) if out is None else x.masked_fill_(keep.logical_not(), 0.0)
        else:
            y = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device), out=out)
        return y.mul_(scale)
    small = keep.numel() < x.numel() and x.dtype in (torch.float32, torch.float64)
    factor = keep * scale if small else keep
    y = x * factor if out is None else x.mul_(factor) if out is x else torch.mul(x, factor, out=out)
    if not small:
        y.mul_(scale)
    if not math.isfinite(y.sum().item()):
        y.masked_fill_(keep.logical_not(), 0.0)
    if y.requires_grad:
        y.register_hook(lambda grad: _zero_dropped(grad, keep))
    return y


def _zero_dropped(grad: Tensor | None, keep: Tensor) -> Tensor | None:
    """``grad`` with its dropped NaN/inf cells zeroed, or ``None`` (autograd then uses ``grad``) when it is finite."""
    if grad is None or math.isfinite(grad.sum().item()):
        return None
    return grad.masked_fill(keep.logical_not(), 0.0)
