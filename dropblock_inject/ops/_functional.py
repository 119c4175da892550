"""The functional forms, ``drop_block2d`` and ``drop_block3d``, and :func:`drop_block_nd`, which the modules call.

Eager calls run the chosen kernel directly (on CPU without operator dispatch); ``torch.fx`` and
``torch.export`` record one call to the registered op; ``torch.compile`` records the mask op and the product
(see ``_library``), and installs the inductor pass of ``_hoist`` once, at compile time.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ._check import _check_block_size, _check_flag, _check_input, _check_keep_prob
from ._dispatch import choose
from ._library import masked

INDUCTOR_PASS_VAR = "DROPBLOCK_INJECT_INDUCTOR_PASS"


def _exporting() -> bool:
    """Whether ``torch.export`` is tracing. Dynamo in torch 2.11 folds ``torch.compiler.is_exporting()`` to
    ``True`` in every trace (a ``torch.compile`` too); the flag it returns is read as it is (2.14 does that)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)  # what is_exporting() returns outside dynamo
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def _install_pass() -> None:
    """Adds the mask-op pass to inductor's post-grad passes, at compile time (not traced), unless
    ``DROPBLOCK_INJECT_INDUCTOR_PASS=0``."""
    if os.environ.get(INDUCTOR_PASS_VAR, "1") != "0":
        from . import _hoist  # torch._inductor: imported only once something compiles

        _hoist.install()


def _call_op(x: Tensor, keep_prob: Tensor, block_size: int, per_channel: bool, scale: bool) -> Tensor:
    """``torch.ops.dropblock_inject.drop_block``, or its node when ``x`` is an fx ``Proxy``."""
    op = torch.ops.dropblock_inject.drop_block.default
    if isinstance(x, torch.fx.Proxy):  # symbolic_trace: one call_function node (a tensor: a get_attr)
        return x.tracer.create_proxy("call_function", op, (x, keep_prob, block_size, per_channel, scale), {})[0]
    return op(x, keep_prob, block_size, per_channel, scale)[0]


def drop_block_nd(x: Tensor, keep_prob: float, keep_prob_tensor: Tensor | None, block_size: int,
                  per_channel: bool, scale: bool, inplace: bool) -> Tensor:
    """DropBlock in training mode, with checked arguments, on every path (eager, fx, export, compile).

    Args:
        x: the input (a tensor, or an fx ``Proxy``).
        keep_prob: the keep probability, read in eager mode.
        keep_prob_tensor: the same as an fp32 0-d tensor, read by traced graphs (a new value does not
            recompile); ``None``: a constant of the graph.
        block_size: the requested block size.
        per_channel: a mask per channel, or one per sample.
        scale: scale by ``numel(mask) / sum(mask)``.
        inplace: write into ``x`` where the kernel can (eager, CPU sparse kernel).

    Returns:
        ``where(keep, x, 0) * scale``.
    """
    traced = isinstance(x, torch.fx.Proxy)
    if traced or torch.compiler.is_compiling():
        if keep_prob_tensor is None:
            if keep_prob == 1.0:
                return x
            keep_prob_tensor = torch.tensor(keep_prob, dtype=torch.float32)
        if traced or _exporting():
            return _call_op(x, keep_prob_tensor, block_size, per_channel, scale)
        torch._dynamo.comptime.comptime(lambda _ctx: _install_pass())  # runs once per trace, at compile time
        return masked(x, keep_prob_tensor, block_size, per_channel, scale)
    if keep_prob == 1.0 or x.numel() == 0:
        return x
    kernel = choose(x.device, x.dtype, x.shape, block_size, per_channel)
    return kernel.eager(x, keep_prob, keep_prob_tensor, block_size, per_channel, scale, inplace)


def _functional(x: Tensor, keep_prob: float | Tensor, block_size: int, per_channel: bool, scale: bool,
                training: bool, inplace: bool, spatial_dims: int, name: str) -> Tensor:
    block_size = _check_block_size(block_size)
    per_channel, scale = _check_flag("per_channel", per_channel), _check_flag("scale", scale)
    training, inplace = _check_flag("training", training), _check_flag("inplace", inplace)
    if not isinstance(x, torch.fx.Proxy):
        _check_input(x, spatial_dims, name)
    if isinstance(keep_prob, Tensor) and (isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling()):
        kp, kp_tensor = 0.0, keep_prob  # read in the graph, as the modules' tensor
    else:
        kp, kp_tensor = _check_keep_prob(keep_prob), None
    if not training:
        return x
    return drop_block_nd(x, kp, kp_tensor, block_size, per_channel, scale, inplace)


def drop_block2d(x: Tensor, keep_prob: float | Tensor, block_size: int = 7, *, per_channel: bool = True,
                 scale: bool = True, training: bool = True, inplace: bool = False) -> Tensor:
    """DropBlock on a batch of 2-D feature maps: ``where(keep, x, 0) * scale``.

    A dropped cell is 0 whatever ``x`` holds there (NaN and inf included); a kept NaN or inf stays one.

    Args:
        x (Tensor[N, C, H, W]): the input feature maps, any floating point dtype and memory format.
        keep_prob (float or Tensor): the expected fraction of kept activations, finite, in [0, 1]. Under
            ``torch.compile``, a one-element tensor is read on the device (a new value does not recompile).
        block_size (int): side of the square block to drop, in [1, 2**31), clipped to the map per axis.
            Default: 7.
        per_channel (bool): draw an independent mask for every channel, as the reference does; ``False``
            shares one mask across the channels of a sample. Default: ``True``.
        scale (bool): multiply the kept activations by the fp32 ``numel(mask) / sum(mask)``. Default: ``True``.
        training (bool): apply the op; ``False`` returns ``x`` unchanged. Default: ``True``.
        inplace (bool): write the result into ``x`` (eager on CPU only), saving an
            allocation; only for an ``x`` that nothing else reads and whose producer does not keep it for
            backward (e.g. a BatchNorm or convolution output). Default: ``False``.

    Returns:
        Tensor[N, C, H, W]: the input with blocks zeroed, in the input's dtype and memory format.

    Raises:
        TypeError: an argument of the wrong type (a non-bool flag, a non-int block_size...).
        ValueError: keep_prob outside [0, 1], block_size outside [1, 2**31), an input of the wrong rank.
    """
    return _functional(x, keep_prob, block_size, per_channel, scale, training, inplace, 2, "drop_block2d")


def drop_block3d(x: Tensor, keep_prob: float | Tensor, block_size: int = 7, *, per_channel: bool = True,
                 scale: bool = True, training: bool = True, inplace: bool = False) -> Tensor:
    """DropBlock on a batch of 3-D feature maps (video or volumes), with cubic blocks; see :func:`drop_block2d`.

    Args:
        x (Tensor[N, C, T, H, W]): the input feature maps, any floating point dtype and memory format.
        keep_prob, block_size, per_channel, scale, training, inplace: as in :func:`drop_block2d`.

    Returns:
        Tensor[N, C, T, H, W]: the input with blocks zeroed, in the input's dtype and memory format.
    """
    return _functional(x, keep_prob, block_size, per_channel, scale, training, inplace, 3, "drop_block3d")
