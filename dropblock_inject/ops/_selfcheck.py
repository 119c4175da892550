"""The first-call check of a kernel on a device: on a small probe, outside any trace and on its own copy of the
random state, forward, backward and the mask alone launch and obey the op's rules (:func:`_probe` says which).
A failure warns once; the result is remembered per device, dtype, rank and mask variant for the process's life.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ._check import fp32_ratio
from ._kernel import Kernel, apply_keep

_results: dict[tuple, bool] = {}
_BLOCK = 3


def passes(kernel: Kernel, device: torch.device, dtype: torch.dtype, ndim: int, per_channel: bool) -> bool:
    """Whether ``kernel`` passed its check for this device, dtype, rank and mask variant (run once, on first
    use; a failure warns, naming the error).

    Args:
        kernel: the kernel.
        device: the device.
        dtype: the input dtype.
        ndim: the input's rank, 4 or 5.
        per_channel: a mask per channel, or one per sample.

    Returns:
        ``True`` if it may run.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (kernel.name, device, dtype, ndim, per_channel)
    result = _results.get(key)
    if result is None:
        error = _run_probe(kernel, device, dtype, ndim, per_channel)
        result = _results[key] = error is None
        if error is not None:
            variant = "per-channel" if per_channel else "shared"
            warnings.warn(f"DropBlock's {kernel.name} kernel failed its first-call check on {device} ({dtype}, "
                          f"{ndim}-D, {variant} masks): {error[:300]}. The dense kernel runs instead from now on "
                          f"(set DROPBLOCK_INJECT_KERNEL=dense to skip the check).", RuntimeWarning, stacklevel=3)
    return result


def _run_probe(kernel: Kernel, device: torch.device, dtype: torch.dtype, ndim: int,
               per_channel: bool) -> str | None:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    devices = [device] if device.type == "cuda" else []
    try:
        with unset_fake_temporarily(), torch.random.fork_rng(devices=devices), torch.no_grad():
            return _probe(kernel, device, dtype, ndim, per_channel)
    except Exception as exc:  # any failure of the kernel is a failed check, reported in the warning
        return f"{type(exc).__name__}: {exc}"


def _probe(kernel: Kernel, device: torch.device, dtype: torch.dtype, ndim: int, per_channel: bool) -> str | None:
    """Runs the kernel on a ``(2, 3, 9, 10)`` (or ``(2, 3, 4, 9, 10)``) probe, keep_prob 0.6, 3-wide blocks; the
    first rule broken, or ``None``: the dropped cells are a union of whole blocks (the same in every channel for a
    shared mask), the scale is the fp32 ``numel / kept``, and the output and gradient are exactly
    ``where(keep, x, 0) * scale`` and ``where(keep, grad, 0) * scale``."""
    shape = (2, 3, 9, 10) if ndim == 4 else (2, 3, 4, 9, 10)
    numel = torch.Size(shape).numel()
    x = torch.linspace(1.0, 2.0, numel, device=device).reshape(shape).to(dtype)  # no zero: out != 0 is the mask
    keep_prob = torch.tensor(0.6, device=device)
    out, state, scale = kernel.forward(x, keep_prob, _BLOCK, per_channel, True)
    keep = out != 0
    problem = _mask_problem(keep, scale, per_channel)
    if problem is None and not torch.equal(out, apply_keep(x, keep, scale)):
        problem = "the output is not where(keep, x, 0) * scale"
    if problem is None:
        grad = x.flip(-1)
        grad_in = kernel.backward(grad, state, scale, _BLOCK, per_channel, list(out.stride()))
        if not torch.equal(grad_in, apply_keep(grad, keep, scale)):
            problem = "the gradient is not where(keep, grad, 0) * scale"
    if problem is None:
        mask, mask_scale = kernel.mask(x, list(x.stride()), keep_prob, _BLOCK, per_channel, True)
        problem = _mask_problem(mask.expand(shape), mask_scale, per_channel, "the mask op: ")
    return problem


def _mask_problem(keep: Tensor, scale: Tensor, per_channel: bool, where: str = "") -> str | None:
    """What is wrong with a keep mask and its scale, or ``None``."""
    if keep.dtype != torch.bool or scale.dtype != torch.float32 or scale.dim() != 0:
        return f"{where}a {keep.dtype} mask and a {scale.dtype} scale of {scale.dim()} dims"
    if float(scale) != fp32_ratio(keep.numel(), int(keep.sum())):
        return f"{where}the scale {float(scale)} is not numel / kept"
    if not per_channel and not bool((keep == keep[:, :1]).all()):
        return f"{where}a shared mask differs between channels"
    dropped = (~keep).flatten(0, 1).unsqueeze(1).float()
    pool = F.max_pool2d if keep.dim() == 4 else F.max_pool3d
    eroded = 1.0 - pool(1.0 - dropped, _BLOCK, stride=1)  # 1 where a whole block is dropped
    regrown = pool(F.pad(eroded, (_BLOCK - 1,) * 2 * (keep.dim() - 2)), _BLOCK, stride=1)
    if not torch.equal(regrown, dropped):
        return f"{where}the dropped cells are not a union of whole blocks"
    return None
