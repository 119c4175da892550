"""The functional forms, ``drop_block2d`` and ``drop_block3d``, and the eager CPU fast path."""

from __future__ import annotations

import torch
from torch import Tensor

from ._check import _check_block_size, _check_input, _check_keep_prob, _fills_its_memory, _geometry
from . import _library  # noqa: F401  (registers torch.ops.dropblock_inject)
from ._mask_op import masked
from ._dense import _ApplyKeepMask, broadcast_multiplier, dense_keep_mask
from ._sparse import _SparseDropBlock


def _drop_block(x: Tensor, keep_prob: float, block_size: int, per_channel: bool, scale: bool, dense: bool,
                inplace: bool = False) -> Tensor:
    """Eager DropBlock with a Python float ``keep_prob``, with no operator dispatch.

    ``dense=False`` is the CPU fast path (the sparse kernel, in place when asked); ``dense=True`` runs the
    dense kernels (the generic device fallback), which always allocate.
    """
    inplace = inplace and not dense
    block, valid, factor = _geometry(tuple(x.shape[2:]), block_size)
    gamma = (1.0 - keep_prob) * factor
    whole_map = valid == (1,) * len(valid)
    if per_channel and not whole_map:
        if not dense:
            return _SparseDropBlock.apply(x, float(gamma), block, valid, scale, inplace and _fills_its_memory(x))
        keep, factor_t = dense_keep_mask(x, gamma, block, valid, scale)
        return _ApplyKeepMask.apply(x, keep, factor_t)
    multiplier = broadcast_multiplier(x, gamma, block, valid, per_channel, scale)
    return x.mul_(multiplier) if inplace else x * multiplier


def _exporting() -> bool:
    """Whether ``torch.export`` is tracing. Dynamo in torch 2.11 folds ``torch.compiler.is_exporting()`` to
    ``True`` in every trace (a ``torch.compile`` too); the flag it returns is read as it is (2.14 does that)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)  # what is_exporting() returns outside dynamo
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def _call_op(x: Tensor, keep_prob: Tensor, block_size: int, per_channel: bool, scale: bool) -> Tensor:
    """``torch.ops.dropblock_inject.drop_block``, or its node when ``x`` is an fx ``Proxy``.

    Under ``torch.compile`` (not ``torch.export``): the mask op and a product the compiler fuses with its
    neighbours (see ``_mask_op``).
    """
    op = torch.ops.dropblock_inject.drop_block.default
    if isinstance(x, torch.fx.Proxy):  # symbolic_trace: one call_function node (a tensor: a get_attr)
        return x.tracer.create_proxy("call_function", op, (x, keep_prob, block_size, per_channel, scale), {})[0]
    if torch.compiler.is_compiling() and not _exporting():
        return masked(x, keep_prob, block_size, per_channel, scale)
    return op(x, keep_prob, block_size, per_channel, scale)[0]


def _functional(x: Tensor, keep_prob: float | Tensor, block_size: int, per_channel: bool, scale: bool,
                training: bool, inplace: bool, spatial_dims: int, name: str) -> Tensor:
    block_size = _check_block_size(block_size)
    if isinstance(x, torch.fx.Proxy) or (torch.compiler.is_compiling() and isinstance(keep_prob, Tensor)):
        # traced: the registered op, keep_prob as a tensor (a float becomes a constant of the graph)
        if not training:
            return x
        if not isinstance(keep_prob, Tensor):
            keep_prob = torch.tensor(_check_keep_prob(keep_prob), dtype=torch.float32)
        return _call_op(x, keep_prob, block_size, per_channel, scale)
    _check_input(x, spatial_dims, name)
    keep_prob = _check_keep_prob(keep_prob)
    if not training or keep_prob == 1.0 or x.numel() == 0:
        return x
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return _drop_block(x, keep_prob, block_size, per_channel, scale, dense=False, inplace=inplace)
    return _call_op(x, torch.tensor(keep_prob, dtype=torch.float32, device=x.device), block_size, per_channel,
                    scale)


def drop_block2d(x: Tensor, keep_prob: float | Tensor, block_size: int = 7, *, per_channel: bool = True,
                 scale: bool = True, training: bool = True, inplace: bool = False) -> Tensor:
    """DropBlock on a batch of 2-D feature maps.

    Args:
        x (Tensor[N, C, H, W]): the input feature maps, any floating point dtype and memory format.
        keep_prob (float or Tensor): the expected fraction of kept activations, in [0, 1]. Under
            ``torch.compile``, a one-element tensor is read on the device (a new value does not recompile).
        block_size (int): side of the square block to drop, clipped to the map per axis. Default: 7.
        per_channel (bool): draw an independent mask for every channel, as the reference does; ``False``
            shares one mask across the channels of a sample. Default: ``True``.
        scale (bool): multiply the kept activations by ``numel(mask) / sum(mask)``. Default: ``True``.
        training (bool): apply the op; ``False`` returns ``x`` unchanged. Default: ``True``.
        inplace (bool): write the result into ``x`` (eager on CPU only), saving an
            allocation; only for an ``x`` that nothing else reads and whose producer does not keep it for
            backward (e.g. a BatchNorm or convolution output). Default: ``False``.

    Returns:
        Tensor[N, C, H, W]: the input with blocks zeroed, in the input's dtype and memory format.
    """
    return _functional(x, keep_prob, block_size, per_channel, scale, training, inplace, 2, "drop_block2d")


def drop_block3d(x: Tensor, keep_prob: float | Tensor, block_size: int = 7, *, per_channel: bool = True,
                 scale: bool = True, training: bool = True, inplace: bool = False) -> Tensor:
    """DropBlock on a batch of 3-D feature maps (video or volumes).

    Args:
        x (Tensor[N, C, T, H, W]): the input feature maps, any floating point dtype and memory format.
        keep_prob (float): the expected fraction of kept activations, in [0, 1].
        block_size (int): side of the cubic block to drop, clipped to the map per axis. Default: 7.
        per_channel (bool): an independent mask for every channel; ``False`` shares one per sample.
        scale (bool): multiply the kept activations by ``numel(mask) / sum(mask)``. Default: ``True``.
        training (bool): apply the op; ``False`` returns ``x`` unchanged. Default: ``True``.
        inplace (bool): write the result into ``x`` (on CPU, outside ``torch.compile``); see
            :func:`drop_block2d`. Default: ``False``.

    Returns:
        Tensor[N, C, T, H, W]: the input with blocks zeroed, in the input's dtype and memory format.
    """
    return _functional(x, keep_prob, block_size, per_channel, scale, training, inplace, 3, "drop_block3d")


