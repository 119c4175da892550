"""Norms by behaviour: a module that normalises per channel with statistics held in buffers is a norm,
whatever its class (torchvision's ``FrozenBatchNorm2d``, Hugging Face DETR's ``DetrFrozenBatchNorm2d``,
RT-DETR's frozen BatchNorm, ``nn.BatchNorm2d`` in eval mode)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _stat_buffers(module: nn.Module) -> list[Tensor]:
    return [b for b in module.buffers(recurse=False) if b.is_floating_point() and b.dim() == 1 and b.numel() > 0]


def is_stat_norm(module: nn.Module, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """Whether ``module`` computes, in eval mode, a per-channel affine map ``y = x * a[c] + b[c]`` of its
    input with channel statistics held in buffers (one-dimensional float buffers of C entries).

    It is probed on small inputs (N=2, C channels, 3x3, or 2x2x2 when the module takes volumes) drawn from a
    private generator: ``a`` and ``b`` are read from the outputs for zeros and ones, then checked on the
    random probe. The module's ``forward`` is called directly (no hooks fire), its training flags and
    buffers are restored afterwards, and no global random state is drawn.

    Args:
        module: the module to probe.
        rtol, atol: tolerances of the affine check.

    Returns:
        True when it holds such buffers and computes such a map; False otherwise, also when it cannot run on
        the probe (a module on the meta device, one that needs other arguments).
    """
    buffers = _stat_buffers(module)
    if not buffers or any(b.device.type == "meta" for b in buffers):
        return False
    channels = buffers[0].numel()
    if any(b.numel() != channels for b in buffers):
        return False
    flags = [(m, m.training) for m in module.modules()]
    saved = [b.clone() for b in module.buffers()]
    gen = torch.Generator(device=buffers[0].device).manual_seed(0)
    like = {"dtype": buffers[0].dtype, "device": buffers[0].device}
    try:
        module.eval()
        for spatial in ((3, 3), (2, 2, 2)):
            shape = (2, channels, *spatial)
            try:
                with torch.no_grad():
                    zero, one = module.forward(torch.zeros(shape, **like)), module.forward(torch.ones(shape, **like))
                    x = torch.randn(shape, generator=gen, **like) * 3
                    y = module.forward(x)
            except Exception:  # noqa: BLE001 - it does not take maps of this rank
                continue
            if not all(isinstance(t, Tensor) and t.shape == shape for t in (zero, one, y)):
                return False
            a, b = one - zero, zero
            scale = max(1.0, float(a.abs().max()), float(b.abs().max()))
            if any(float((t.flatten(2) - t.flatten(2)[:1, :, :1]).abs().max()) > atol * scale for t in (a, b)):
                return False  # a[c] and b[c] differ across samples or positions: not per-channel statistics
            return bool(torch.allclose(y, x * a + b, rtol=rtol, atol=atol * scale))
        return False
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for b, old in zip(module.buffers(), saved):
                b.copy_(old)
