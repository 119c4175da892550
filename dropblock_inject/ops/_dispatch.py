"""Which kernel runs a call: :func:`choose`, the only place that decides it, and the way users force one
(:func:`set_kernel`, or the environment variable ``DROPBLOCK_INJECT_KERNEL``, which the package only reads).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from . import _selfcheck
from ._dense import DENSE
from ._kernel import Kernel
from ._sparse import SPARSE
from ._triton import AVAILABLE, TRITON

ENV_VAR = "DROPBLOCK_INJECT_KERNEL"
KERNELS: dict[str, Kernel] = {k.name: k for k in (DENSE, SPARSE, TRITON)}
_forced: list[str | None] = [None]  # set_kernel's choice (a list: no ``global`` rebinding)


def set_kernel(name: str | None) -> None:
    """Forces the kernel of every DropBlock call from now on, or, with ``None``, goes back to the default
    (or to ``DROPBLOCK_INJECT_KERNEL`` when it is set). Set it before compiling or tracing a model: a compiled
    graph keeps the kernel it was compiled with.

    Args:
        name: ``"dense"``, ``"sparse"``, ``"triton"`` or ``None``.

    Raises:
        ValueError: an unknown name.
    """
    _forced[0] = None if name is None else _known(name, "set_kernel")


def _known(name: str, source: str) -> str:
    if name not in KERNELS:
        raise ValueError(f"{source} must name a DropBlock kernel, one of {sorted(KERNELS)}, but got {name[:40]!r}")
    if name == TRITON.name and not AVAILABLE:
        raise RuntimeError(f"{source} asks for the Triton kernel, but Triton is not installed (pip install triton)")
    return name


def forced_kernel() -> str | None:
    """The kernel forced by :func:`set_kernel` or ``DROPBLOCK_INJECT_KERNEL`` (that order), or ``None``."""
    if _forced[0] is not None:
        return _forced[0]
    env = os.environ.get(ENV_VAR)
    return _known(env, ENV_VAR) if env else None


def choose(device: torch.device, dtype: torch.dtype, shape: Sequence[int], block_size: int,
           per_channel: bool) -> Kernel:
    """The kernel for an input on ``device`` of ``dtype`` and ``shape``. By default: on CPU, the sparse kernel for
    per-channel masks whose block is smaller than the map, else the dense kernel (one value per plane when the
    block covers the map); on CUDA with Triton, the fused kernel once it passed its check (else dense); dense
    anywhere else. A forced kernel wins, but the sparse one runs only on CPU with per-channel masks, and a forced
    Triton kernel runs on CPU tensors in Triton's interpreter.

    Args:
        device: the input's device.
        dtype: the input's dtype.
        shape: the input's shape, ``(N, C, H, W)`` or ``(N, C, T, H, W)``.
        block_size: the requested block size.
        per_channel: a mask per channel, or one per sample.

    Returns:
        The kernel; the Triton kernel only once it passed its check for this device, dtype and variant.
    """
    name, ndim = forced_kernel(), len(shape)
    if name is None:
        if device.type == "cpu":
            return SPARSE if per_channel and max(shape[2:], default=0) > block_size else DENSE
        name = TRITON.name if device.type == "cuda" and AVAILABLE else DENSE.name
    if name == SPARSE.name:
        return SPARSE if device.type == "cpu" and per_channel else DENSE
    if name == TRITON.name:
        if device.type not in ("cuda", "cpu"):
            return DENSE
        return TRITON if _selfcheck.passes(TRITON, device, dtype, ndim, per_channel) else DENSE
    return DENSE


def kernel_for(x: torch.Tensor, block_size: int = 7, per_channel: bool = True) -> str:
    """The name of the kernel DropBlock runs for ``x`` (see :func:`choose`).

    Args:
        x: an input ``(N, C, H, W)`` or ``(N, C, T, H, W)``.
        block_size: the requested block size.
        per_channel: a mask per channel, or one per sample.

    Returns:
        ``"sparse"``, ``"dense"`` or ``"triton"``.
    """
    return choose(x.device, x.dtype, x.shape, block_size, per_channel).name
