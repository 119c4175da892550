"""An inductor graph pass: every ``drop_block_mask`` call moved up to just after the nodes it reads.

A mask op reads only ``keep_prob`` (a graph input) and sizes, but dynamo records it where the DropBlock
runs, after the BatchNorm that feeds it. There the extern call sits between the BatchNorm's statistics and
its normalisation, and inductor makes two kernels of what is one without DropBlock (statistics,
normalisation, mask product and ReLU in one loop nest): one more pass over the activation per DropBlock.
Moved up next to its inputs (the graph's inputs, in practice), it splits nothing. The mask ops keep their
order, so they draw from torch's generator in the order the eager model does.

The pass is added to ``torch._inductor.config.post_grad_custom_pre_pass`` (after any pass already set
there, chained into one pass) by ``_functional`` when dynamo first traces a DropBlock, at compile time
(``DROPBLOCK_INJECT_INDUCTOR_PASS=0`` opts out). It leaves graphs without the op as they are, and it has a
``uuid``, so inductor's FX graph cache keeps working.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch._inductor import config
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.graph import GraphLowering

from ._dispatch import choose


def _mask_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    target = torch.ops.dropblock_inject.drop_block_mask.default
    return [n for n in graph.nodes if n.op == "call_function" and n.target is target]


def hoist_mask_ops(graph: torch.fx.Graph) -> int:
    """Moves every ``drop_block_mask`` node up to just after the last node it reads, keeping their order.

    Args:
        graph: a graph, changed in place.

    Returns:
        The number of nodes moved.
    """
    masks = _mask_nodes(graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    cursor = placeholders[-1] if placeholders else None  # after the inputs, and after the previous mask op
    moved = 0
    for node in masks:
        order = {n: i for i, n in enumerate(graph.nodes)}
        reads = [*node.all_input_nodes, *([cursor] if cursor is not None else [])]
        if reads:
            anchor = max(reads, key=order.__getitem__)
            if anchor.next is not node:
                anchor.append(node)
                moved += 1
        elif node.prev.op != "root":  # reads no node at all: first
            next(iter(graph.nodes)).prepend(node)
            moved += 1
        cursor = node
    return moved


def channels_last_masks(graph: torch.fx.Graph) -> int:
    """Lays every contiguous 4-D sparse CPU mask of a graph inductor will run channels-last out channels-last.

    The mask op takes its layout from the input as traced (contiguous), but inductor then runs the
    convolutions and what follows them channels-last, and the fused product would read a contiguous mask by
    gathers. The node's strides argument and its recorded outputs are changed together.

    Args:
        graph: a post-grad graph, changed in place.

    Returns:
        The number of masks changed.
    """
    masks, gm = _mask_nodes(graph), graph.owning_module
    # inductor's own decision (on CPU: a convolution in the graph and oneDNN on), made after the post-grad passes
    if not masks or gm is None or not GraphLowering.decide_layout_opt(gm, is_inference=False):
        return 0
    changed = 0
    for node in masks:
        shape, stride, dtype, device, _, block_size, per_channel, _ = node.args
        val = node.meta.get("val")
        if (len(shape) != 4 or val is None or not all(isinstance(v, int) for v in (*shape, *stride))
                or choose(torch.device(device), dtype, shape, block_size, per_channel).name != "sparse"):
            continue  # the mask is laid out by its kernel (Triton, dense, broadcast), not by ``stride``
        keep = val[0]
        if tuple(keep.stride()) != tuple(keep.contiguous().stride()):
            continue  # a mask already laid out otherwise
        _, c, h, w = shape
        channels_last = [c * h * w, 1, w * c, c]
        node.args = (shape, channels_last, *node.args[2:])
        with keep.fake_mode:
            new_keep = torch.empty_strided(shape, channels_last, dtype=torch.bool, device=keep.device)
        node.meta["val"] = (new_keep, *val[1:])
        for user in node.users:
            if user.target is operator.getitem and user.args[1] == 0:
                user.meta["val"] = new_keep
        changed += 1
    return changed


class HoistMaskOps(CustomGraphPass):
    """:func:`channels_last_masks` and :func:`hoist_mask_ops` as an inductor custom graph pass."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        channels_last_masks(graph)
        hoist_mask_ops(graph)

    def uuid(self) -> str:  # in inductor's cache keys: change it whenever the pass changes what it does
        return "dropblock_inject.ops.hoist_mask_ops.v4"


class ChainedPasses(CustomGraphPass):
    """Graph passes run in order as one pass: inductor in torch 2.11 calls ``post_grad_custom_pre_pass``
    itself, so it takes one callable, not a list.

    Args:
        passes: the passes, in the order they run.
    """

    def __init__(self, *passes: Callable[[torch.fx.Graph], None]) -> None:
        self.passes = passes

    def __call__(self, graph: torch.fx.Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)

    def uuid(self) -> str | None:  # None (no FX graph cache) if one of the passes has no uuid
        ids = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.passes]
        return None if any(i is None for i in ids) else "|".join(map(str, ids))


def _holds_hoist(graph_pass: object) -> bool:
    if isinstance(graph_pass, HoistMaskOps):
        return True
    inner = graph_pass.passes if isinstance(graph_pass, ChainedPasses) else graph_pass
    return isinstance(inner, (list, tuple)) and any(_holds_hoist(p) for p in inner)


def install() -> None:
    """Adds :class:`HoistMaskOps` to inductor's post-grad passes, once, after any pass already there."""
    current = config.post_grad_custom_pre_pass
    if _holds_hoist(current):
        return
    if current is None:
        config.post_grad_custom_pre_pass = HoistMaskOps()
        return
    passes = tuple(current) if isinstance(current, (list, tuple)) else (current,)
    config.post_grad_custom_pre_pass = ChainedPasses(*passes, HoistMaskOps())
