"""DropBlock, the op (Ghiasi, Lin & Le, NeurIPS 2018, https://arxiv.org/abs/1810.12890, with the semantics of
the authors' TensorFlow code): functional forms, ``nn.Module`` wrappers, and the choice of kernel. What it
computes, NaN and inf included, and which kernel runs where: ``docs/op.md``.

Layout: ``_check`` (arguments, geometry, ``gamma``), ``_kernel`` (the kernel interface and its rule), one module
per kernel (``_sparse``: CPU; ``_dense``: any device; ``_triton``, with its programs in ``_triton_kernels``:
CUDA), ``_dispatch`` (which kernel runs a call, and forcing one), ``_selfcheck`` (the Triton kernel's first-call
check), ``_library`` (the registered operators), ``_hoist`` (the inductor pass for compiled graphs),
``_functional`` and ``_modules`` (the public API).
"""

from ._check import seed_rate
from ._dispatch import kernel_for, set_kernel
from ._functional import drop_block2d, drop_block3d
from ._modules import DropBlock2d, DropBlock3d

__all__ = ["DropBlock2d", "DropBlock3d", "drop_block2d", "drop_block3d", "kernel_for", "seed_rate", "set_kernel"]
