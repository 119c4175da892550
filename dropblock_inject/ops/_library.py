"""The registered operators: ``torch.ops.dropblock_inject.drop_block``, its backward, and the mask op.

``drop_block`` returns ``(out, state, scale)`` (``state``: what the chosen kernel's backward needs); it is the
node eager dispatch, ``torch.fx`` and ``torch.export`` see. ``torch.compile`` graphs call ``drop_block_mask``
and multiply in arithmetic inductor fuses with its neighbours (:func:`masked`); the mask op reads no activation
(an opaque op taking one would make inductor write it out and read it again, forward and backward). Each op asks
``_dispatch.choose`` for the kernel and delegates. ``keep_prob`` is a tensor argument (a new value is data, not a
new graph); both random ops are ``nondeterministic_seeded`` and listed among AOT autograd's random ops, so its
CSE never merges two calls into one mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._check import _layout_strides
from ._dispatch import KERNELS, choose


def _keep_out_of_cse() -> None:
    """Lists both random ops in AOT autograd's ``rand_ops`` (torch 2.11's CSE reads only that list)."""
    from torch._functorch import compile_utils

    rand_ops = getattr(compile_utils, "rand_ops", None)
    if isinstance(rand_ops, list):
        for packet in (torch.ops.dropblock_inject.drop_block, torch.ops.dropblock_inject.drop_block_mask):
            if packet not in rand_ops:
                rand_ops.append(packet)


@torch.library.custom_op("dropblock_inject::drop_block", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def drop_block(x: Tensor, keep_prob: Tensor, block_size: int, per_channel: bool,
               scale: bool) -> tuple[Tensor, Tensor, Tensor]:
    """DropBlock's forward, ``(where(keep, x, 0) * scale, state, scale)`` (arguments as :func:`drop_block2d`'s,
    ``keep_prob`` a one-element tensor); the output is laid out as ``torch.empty_like(x)``, the scale is fp32."""
    kernel = choose(x.device, x.dtype, x.shape, block_size, per_channel)
    return kernel.forward(x, keep_prob, block_size, per_channel, scale)


@drop_block.register_fake
def _drop_block_fake(x: Tensor, keep_prob: Tensor, block_size: int, per_channel: bool,
                     scale: bool) -> tuple[Tensor, Tensor, Tensor]:
    _keep_out_of_cse()
    return choose(x.device, x.dtype, x.shape, block_size, per_channel).fake_forward(x, block_size, per_channel)


@torch.library.custom_op("dropblock_inject::drop_block_backward", mutates_args=())
def drop_block_backward(grad: Tensor, state: Tensor, scale: Tensor, block_size: int, per_channel: bool,
                        kernel: str, stride: list[int]) -> Tensor:
    """DropBlock's backward, ``where(keep, grad, 0) * scale``, by ``kernel`` (the one that ran forward) from
    forward's ``state`` and ``scale``; ``stride`` is forward's output's."""
    return KERNELS[kernel].backward(grad, state, scale, block_size, per_channel, stride)


@drop_block_backward.register_fake
def _drop_block_backward_fake(grad: Tensor, state: Tensor, scale: Tensor, block_size: int, per_channel: bool,
                              kernel: str, stride: list[int]) -> Tensor:
    return KERNELS[kernel].fake_backward(grad, stride)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, _, block_size, per_channel, _ = inputs
    out, state, scale_t = output
    ctx.save_for_backward(state, scale_t)
    kernel = choose(x.device, x.dtype, x.shape, block_size, per_channel).name  # what forward chose for these inputs
    ctx.args = (block_size, per_channel, kernel, list(out.stride()))


def _backward(ctx, grad: Tensor, *_unused: Tensor) -> tuple[Tensor, None, None, None, None]:
    state, scale_t = ctx.saved_tensors
    return drop_block_backward(grad, state, scale_t, *ctx.args), None, None, None, None


drop_block.register_autograd(_backward, setup_context=_setup_context)


def _like(shape: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A stand-in for the input, with its shape, dtype and device and no memory (what the kernels read)."""
    return torch.empty((), dtype=dtype, device=device).expand(shape)


@torch.library.custom_op("dropblock_inject::drop_block_mask", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def drop_block_mask(shape: list[int], stride: list[int], dtype: torch.dtype, device: torch.device,
                    keep_prob: Tensor, block_size: int, per_channel: bool, scale: bool) -> tuple[Tensor, Tensor]:
    """``(keep, scale)``, the ``bool`` mask (broadcasting to ``shape``) and the fp32 scale of DropBlock for an
    input of ``shape``, ``stride``, ``dtype`` and ``device``: ``where(keep, x, 0) * scale`` is DropBlock's output.
    The other arguments are :func:`drop_block`'s."""
    like = _like(shape, dtype, device)
    return choose(like.device, dtype, shape, block_size, per_channel).mask(like, stride, keep_prob, block_size,
                                                                   per_channel, scale)


@drop_block_mask.register_fake
def _drop_block_mask_fake(shape: list[int], stride: list[int], dtype: torch.dtype, device: torch.device,
                          keep_prob: Tensor, block_size: int, per_channel: bool,
                          scale: bool) -> tuple[Tensor, Tensor]:
    _keep_out_of_cse()
    like = _like(shape, dtype, device)
    return choose(like.device, dtype, shape, block_size, per_channel).fake_mask(like, stride, block_size, per_channel)


def masked(x: Tensor, keep_prob: Tensor, block_size: int, per_channel: bool, scale: bool) -> Tensor:
    """DropBlock as ``where(keep, x, 0) * scale`` with the mask of :func:`drop_block_mask`, arguments as
    :func:`drop_block`'s (what compiled graphs run; autograd saves the ``bool`` mask for backward)."""
    keep, factor = drop_block_mask(list(x.shape), list(_layout_strides(x)), x.dtype, x.device, keep_prob,
                                   block_size, per_channel, scale)
    return torch.where(keep, x, 0.0) * factor
