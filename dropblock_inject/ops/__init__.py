"""DropBlock, the op: functional forms, ``nn.Module`` wrappers and the registered torch operator.

Implements DropBlock from `"DropBlock: A regularization method for convolutional networks"
<https://arxiv.org/abs/1810.12890>`_ (Ghiasi, Lin & Le, NeurIPS 2018) with the semantics of the
authors' TensorFlow code (``tensorflow/tpu``, ``resnet_model.py``):

* the block is clipped to the feature map, per spatial axis;
* seeds are drawn only where a whole block fits (the *valid* region), independently per sample and
  (by default) per channel, at the rate
  ``gamma = (1 - keep_prob) / prod(block) * prod(size) / prod(size - block + 1)``;
* every seed zeroes the block whose top-left corner it is;
* the output is ``x * mask * numel(mask) / sum(mask)``, the ratio computed in fp32 and safe when the
  whole mask is dropped (the output is then all zeros);
* in eval mode, or when ``keep_prob == 1``, the op is the identity and draws no random numbers.

Layout: ``_check`` (arguments, geometry), ``_sparse`` (the CPU kernel), ``_dense`` (broadcast masks and the
generic fallback), ``_triton`` (the fused accelerator kernel's launchers; its programs in ``_triton_kernels``, compiled
ahead of time for a GPU target by ``_triton_aot``), ``_library`` (the registered operator
``torch.ops.dropblock_inject.drop_block``, which export and fx see as one node), ``_mask_op`` (the mask op
compiled graphs call, with the product left to inductor), ``_hoist`` (the inductor pass that moves the mask
ops up and lays them out as inductor will), ``_functional``
and ``_modules`` (the public API). Eager CPU calls the sparse kernel directly, without operator dispatch.
"""

from ._check import (_check_block_size, _check_input, _check_keep_prob, _contiguous_strides, _fills_its_memory,
                     _geometry, seed_rate)
from ._dense import _ApplyKeepMask, _dense_block_counts, _normalizer
from ._functional import _drop_block, drop_block2d, drop_block3d
from ._library import drop_block, drop_block_backward, kernel_mode
from ._modules import DropBlock2d, DropBlock3d, _DropBlockNd
from ._sparse import _LANES, _SMALL_MAP, _count_dropped, _fill_blocks, _flat, _grid, _sample_seeds, _SparseDropBlock

__all__ = ["DropBlock2d", "DropBlock3d", "drop_block2d", "drop_block3d"]
