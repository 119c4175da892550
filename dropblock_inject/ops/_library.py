"""DropBlock as a registered torch operator, ``torch.ops.dropblock_inject.drop_block``.

One op for eager, ``torch.fx`` and ``torch.export`` (exported programs and traced graphs hold one call to it);
``torch.compile`` graphs call ``drop_block_mask`` instead and multiply in arithmetic inductor fuses (see
``_mask_op``). The op runs the fast kernel of the input's device:

* CPU: the sparse kernel (per-channel masks) or the small broadcast multiplier (shared masks, whole maps);
* CUDA: the fused Triton kernel, or the dense kernels when Triton is absent;
* any other device: the dense kernels.

``keep_prob`` is a tensor argument (the modules pass their ``keep_prob_tensor``), so a new value is
data, not a new graph: no recompile. The op returns ``(out, state, scale)``; ``state`` and ``scale`` are
what backward needs, and their form depends on the kernel (see :func:`kernel_mode`), always of a size known
from the input's shape (a data-dependent size, such as one corner per seed, would break the graph unless
``capture_dynamic_output_shape_ops`` is set):

* sparse: the seed of a private CPU generator and ``gamma`` (fp64, 2 values), with the number of seeds and
  the blocks' corners stored behind them in the same memory (8 bytes per seed, see ``pack_state``), and the
  scale; backward rescatters the blocks from those corners, or, if the state reaches it copied (without
  them), draws the same seeds again from the generator;
* Triton: the philox seed and threshold (int64, 2 values) and the scale;
* broadcast: the small scaled multiplier itself;
* dense (fallback): a ``bool`` mask and the scale.

Backward is the op ``drop_block_backward``. The eager CPU modules do not go through this op: they call the
sparse kernel directly, which keeps the same corners and dispatches nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _triton
from ._check import _geometry
from ._dense import apply_keep_mask, broadcast_multiplier, dense_forward, multiplier_shape
from ._sparse import (draw_seed, pack_state, redraw_corners, seeded_generator, sparse_backward, sparse_forward,
                      stored_corners)

SPARSE, BROADCAST, DENSE, TRITON = "sparse", "broadcast", "dense", "triton"


def _clipped_geometry(spatial: tuple, block_size: int) -> tuple[tuple, tuple, float]:
    if all(isinstance(s, int) for s in spatial):
        return _geometry(tuple(spatial), block_size)
    return _geometry.__wrapped__(tuple(spatial), block_size)  # symbolic sizes are not hashable


def kernel_mode(x: Tensor, block_size: int, per_channel: bool) -> str:
    """Which kernel runs for ``x`` (also what the fake kernel must describe).

    Args:
        x: the input (or its gradient), ``(N, C, *spatial)``.
        block_size: the requested block size.
        per_channel: a mask per channel.

    Returns:
        ``"triton"`` on CUDA with Triton, else ``"broadcast"`` for a shared mask or a block covering the whole
        map, else ``"sparse"`` on CPU and ``"dense"`` elsewhere.
    """
    if x.device.type == "cuda" and _triton.AVAILABLE:
        return TRITON
    _, valid, _ = _clipped_geometry(tuple(x.shape[2:]), block_size)
    if not per_channel or all(v == 1 for v in valid):
        return BROADCAST
    return SPARSE if x.device.type == "cpu" else DENSE


def dense_seed_rate(keep_prob: Tensor, factor: float, device: torch.device) -> Tensor | float:
    """``gamma`` for the dense and broadcast kernels: a Python float on CPU (no host sync to avoid there, and
    ``bernoulli_(float)`` is much faster), a 0-d tensor on ``device`` elsewhere (no host sync)."""
    if device.type == "cpu":
        return (1.0 - float(keep_prob)) * factor
    return (1.0 - keep_prob.to(device=device, dtype=torch.float32).reshape(())) * factor


def _forward(x: Tensor, keep_prob: Tensor, block_size: int, per_channel: bool, scale: bool,
             mode: str) -> tuple[Tensor, Tensor, Tensor]:
    block, valid, factor = _clipped_geometry(tuple(x.shape[2:]), block_size)
    if mode == TRITON:
        return _triton.triton_forward(x, keep_prob, block_size, per_channel, scale)
    if mode == SPARSE:
        out = torch.empty_like(x)
        gamma = (1.0 - float(keep_prob)) * factor
        seed = draw_seed(gamma)
        corner, applied = sparse_forward(x, gamma, block, valid, scale, out, seeded_generator(seed))
        return out, pack_state(seed, gamma, corner), torch.tensor(applied, dtype=torch.float64)
    gamma = dense_seed_rate(keep_prob, factor, x.device)
    if mode == BROADCAST:
        multiplier = broadcast_multiplier(x, gamma, block, valid, per_channel, scale)  # keep_prob 1: no draw
        out = torch.empty_like(x)
        torch.mul(x, multiplier, out=out)
        return out, multiplier, torch.ones((), dtype=torch.float32, device=x.device)
    return dense_forward(x, gamma, block, valid, scale)


def keep_out_of_cse() -> None:
    """Lists both ops among AOT autograd's random ops, which its CSE never merges (once; from the fake kernels,
    which run before any CSE).

    torch 2.14's CSE keeps every op tagged ``nondeterministic_seeded`` apart, but 2.11's looks at that list only,
    so two calls with the same arguments in one compiled graph (a DropBlock module applied twice to inputs of one
    shape) drew one mask.
    """
    from torch._functorch import compile_utils  # imported by whatever traced the op

    rand_ops = getattr(compile_utils, "rand_ops", None)
    if isinstance(rand_ops, list):
        for packet in (torch.ops.dropblock_inject.drop_block, torch.ops.dropblock_inject.drop_block_mask):
            if packet not in rand_ops:
                rand_ops.append(packet)


# nondeterministic_seeded: AOT autograd's CSE must not merge two calls with the same arguments (two masks)
@torch.library.custom_op("dropblock_inject::drop_block", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def drop_block(x: Tensor, keep_prob: Tensor, block_size: int, per_channel: bool,
               scale: bool) -> tuple[Tensor, Tensor, Tensor]:
    """DropBlock's forward: ``(x * mask * scale, state, scale)``; see the module docstring.

    Args:
        x: the input ``(N, C, H, W)`` or ``(N, C, T, H, W)``.
        keep_prob: a one-element tensor, in [0, 1].
        block_size: the requested block size (clipped to the map).
        per_channel: a mask per channel, or one per sample.
        scale: scale by ``numel(mask) / sum(mask)``.

    Returns:
        The output, laid out as ``torch.empty_like(x)``, and the backward state of the kernel that ran.
    """
    return _forward(x, keep_prob, block_size, per_channel, scale, kernel_mode(x, block_size, per_channel))


@drop_block.register_fake
def _drop_block_fake(x: Tensor, keep_prob: Tensor, block_size: int, per_channel: bool,
                     scale: bool) -> tuple[Tensor, Tensor, Tensor]:
    keep_out_of_cse()
    mode = kernel_mode(x, block_size, per_channel)
    out = torch.empty_like(x)
    if mode == TRITON:
        return out, x.new_empty((2,), dtype=torch.int64), x.new_empty((), dtype=torch.float32)
    if mode == SPARSE:
        return out, torch.empty((2,), dtype=torch.float64), torch.empty((), dtype=torch.float64)
    scale_t = x.new_empty((), dtype=torch.float32)
    if mode == BROADCAST:
        _, valid, _ = _clipped_geometry(tuple(x.shape[2:]), block_size)
        return out, x.new_empty(multiplier_shape(x, valid, per_channel)), scale_t
    return out, x.new_empty(x.shape, dtype=torch.bool), scale_t


@torch.library.custom_op("dropblock_inject::drop_block_backward", mutates_args=())
def drop_block_backward(grad: Tensor, state: Tensor, scale: Tensor, block_size: int, per_channel: bool,
                        normalize: bool, stride: list[int]) -> Tensor:
    """DropBlock's backward: ``grad * mask * scale``, the mask rebuilt from the forward's ``state``.

    Args:
        grad: the output's gradient.
        state: the forward's second output.
        scale: the forward's third output.
        block_size: as in forward.
        per_channel: as in forward.
        normalize: the forward's ``scale`` flag.
        stride: the forward output's strides (the sparse kernel's corners are offsets in that layout).

    Returns:
        The input's gradient: laid out with ``stride`` after the sparse kernel, as ``empty_like(grad)``
        after the others.
    """
    mode = kernel_mode(grad, block_size, per_channel)
    if mode == TRITON:
        return _triton.triton_backward(grad, state, scale, block_size, per_channel)
    if mode == SPARSE:
        block, valid, _ = _clipped_geometry(tuple(grad.shape[2:]), block_size)
        corner = stored_corners(state)
        if corner is None:  # the state was copied on its way here: draw the same seeds again
            seed, gamma = state.tolist()
            corner = redraw_corners(tuple(grad.shape), gamma, valid, tuple(stride), int(seed))
        return sparse_backward(grad, corner, tuple(stride), block, float(scale))
    if mode == BROADCAST:
        out = torch.empty_like(grad)
        return torch.mul(grad, state, out=out)
    return apply_keep_mask(grad, state, scale)


@drop_block_backward.register_fake
def _drop_block_backward_fake(grad: Tensor, state: Tensor, scale: Tensor, block_size: int, per_channel: bool,
                              normalize: bool, stride: list[int]) -> Tensor:
    if kernel_mode(grad, block_size, per_channel) == SPARSE:
        return grad.new_empty_strided(grad.shape, stride)
    return torch.empty_like(grad)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    _, _, block_size, per_channel, scale = inputs
    out, state, scale_t = output
    ctx.save_for_backward(state, scale_t)
    ctx.args = (block_size, per_channel, scale, list(out.stride()))


def _backward(ctx, grad: Tensor, *_unused: Tensor) -> tuple[Tensor, None, None, None, None]:
    state, scale_t = ctx.saved_tensors
    return drop_block_backward(grad, state, scale_t, *ctx.args), None, None, None, None


drop_block.register_autograd(_backward, setup_context=_setup_context)
