"""DropBlock, the op: functional forms, ``nn.Module`` wrappers, and the choice of kernel.

Implements DropBlock from `"DropBlock: A regularization method for convolutional networks"
<https://arxiv.org/abs/1810.12890>`_ (Ghiasi, Lin & Le, NeurIPS 2018) with the semantics of the
authors' TensorFlow code (``tensorflow/tpu``, ``resnet_model.py``):

* the block is clipped to the feature map, per spatial axis;
* seeds are drawn only where a whole block fits (the *valid* region), independently per sample and
  (by default) per channel, at the rate
  ``gamma = (1 - keep_prob) / prod(block) * prod(size) / prod(size - block + 1)``;
* every seed zeroes the block whose top-left corner it is;
* the output is ``where(keep, x, 0) * numel(keep) / sum(keep)``: a dropped cell is 0 whatever the input holds
  (NaN and inf included), the ratio is computed in fp32 and is 0 when the whole mask is dropped;
* in eval mode, or when ``keep_prob == 1``, the op is the identity and draws no random numbers.

Layout: ``_check`` (arguments, geometry, ``gamma``), ``_kernel`` (the kernel interface), one module per kernel
(``_sparse``: CPU; ``_dense``: any device; ``_triton``, with its programs in ``_triton_kernels``: CUDA),
``_dispatch`` (which kernel runs a call, and forcing one) and ``_selfcheck`` (the first-call check of the
Triton kernel), ``_library`` (the registered operators), ``_hoist`` (the inductor pass for compiled graphs),
``_functional`` and ``_modules`` (the public API).
"""

from ._check import seed_rate
from ._dispatch import kernel_for, set_kernel
from ._functional import drop_block2d, drop_block3d
from ._modules import DropBlock2d, DropBlock3d

__all__ = ["DropBlock2d", "DropBlock3d", "drop_block2d", "drop_block3d", "kernel_for", "seed_rate", "set_kernel"]
