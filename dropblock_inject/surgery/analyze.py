"""Analysis: the residual additions of one traced scope and its DropBlock candidates.

A residual addition is an add whose two operands both derive from the scope's input and one of which
holds a layer; its *shortcut* is the side with fewer convolutions (counting those inside leaf modules),
then fewer layers, then fewer nodes, and must start at the scope's input. Branch candidates are the conv /
norm / act / unit nodes off the shortcut whose value reaches the output as a feature map (not only through
a gate). Nothing here depends on a recipe: :mod:`.select` filters the candidates by rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from .registry import extra_levels
from .kinds import add_operands, conv_count, is_gate, node_kinds, unit_kinds
from .shapes import ShapeLog
from .calls import Param
from .trace import Traced


@dataclass
class Candidate:
    node: fx.Node
    kind: str  # "branch" | "shortcut"
    kinds: frozenset[str]  # node kinds (branch) or empty (shortcut)
    add: fx.Node | None = None  # the residual addition, for shortcuts
    shape: tuple[int, ...] | None = None
    banned: str = ""  # why no DropBlock may go here (a prediction, a pooled map), whatever the recipe


@dataclass
class Scope:
    path: str
    module: nn.Module
    graph: fx.Graph
    candidates: list[Candidate]
    residual: bool
    output_shape: tuple[int, ...] | None
    spatial_dims: int
    params: tuple[Param, ...] | None = None  # see Traced
    out_spec: Any = None


def analyze(path: str, scope: nn.Module, traced: Traced, shapes: ShapeLog | None) -> Scope:
    graph = traced.graph
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    ancestors: dict[fx.Node, int] = {}
    for n in nodes:
        bits = 0
        for p in n.all_input_nodes:
            bits |= ancestors[p] | (1 << index[p])
        ancestors[n] = bits
    kinds = {n: node_kinds(n, scope) for n in nodes}
    placeholders = sum(1 << index[n] for n in nodes if n.op == "placeholder")
    convs = {n: conv_count(n, scope) for n in nodes}
    heavy = sum(1 << index[n] for n in nodes if kinds[n] & {"conv", "unit", "norm"} or convs[n])
    conv_bits = [(1 << index[n], convs[n]) for n in nodes if convs[n]]
    node_shapes, banned = shapes.node_shapes(path, graph, traced.input_shapes) if shapes else ({}, {})

    candidates: list[Candidate] = []
    on_shortcut = 0
    residual = False
    for n in nodes:
        operands = add_operands(n)
        if operands is None:
            continue
        a, b = operands
        own = {x: ancestors[x] | (1 << index[x]) for x in (a, b)}
        excl = {a: own[a] & ~own[b], b: own[b] & ~own[a]}
        if not own[a] & placeholders or not own[b] & placeholders:
            continue  # not a residual: one operand does not derive from the scope's input
        # the shortcut is the side with fewer convolutions (counting those inside leaf modules such as
        # timm's GhostModule or SeparableConv2d), then fewer layers, then fewer nodes
        shortcut, branch = sorted((b, a), key=lambda x: (sum(c for bit, c in conv_bits if excl[x] & bit),
                                                         bin(excl[x] & heavy).count("1"), bin(excl[x]).count("1")))
        if not excl[branch] & heavy:
            continue  # neither side holds a layer: not a residual connection
        # the shortcut must start at the scope's input: its exclusive path is fed only by placeholders
        starts = [m for m in nodes if excl[shortcut] >> index[m] & 1] or [shortcut]
        feeders = {p for m in starts for p in m.all_input_nodes if not excl[shortcut] >> index[p] & 1}
        if shortcut.op != "placeholder" and not all(p.op == "placeholder" for p in feeders):
            continue
        residual = True
        on_shortcut |= excl[shortcut]
        shape = node_shapes.get(branch.name) or node_shapes.get(n.name)
        candidates.append(Candidate(shortcut, "shortcut", frozenset(), add=n, shape=shape,
                                    banned=banned.get(shortcut.name, "")))
    # nodes whose value reaches the output as a feature map, not only as attention logits or a gate
    # (through a softmax, sigmoid or matrix product: global-context / spatial attention convolutions)
    features: set[fx.Node] = set()
    for n in reversed(nodes):
        if n.op == "output" or any(u in features and not is_gate(u, scope) for u in n.users):
            features.add(n)
    extra = {**_known_extra_levels(scope, nodes), **_extra_levels(path, nodes, index, ancestors, node_shapes, shapes)}
    for n in nodes:
        if "composite" in kinds[n] and not residual:
            continue  # a SelectiveKernel-like step counts only on a residual branch, not a whole block elsewhere
        if kinds[n] and not (on_shortcut >> index[n] & 1) and n in features:
            candidates.append(Candidate(n, "branch", unit_kinds(n, kinds), shape=node_shapes.get(n.name),
                                        banned=banned.get(n.name, "") or extra.get(n, "")))
    output = next(n for n in reversed(nodes) if n.op == "output")
    out_arg = output.args[0]
    out_shape = node_shapes.get(out_arg.name) if isinstance(out_arg, fx.Node) else None
    if shapes is not None and out_shape is None:
        out_shape = shapes.module_output(path)
    conv3d = any(isinstance(m, (nn.Conv3d, nn.BatchNorm3d)) for m in scope.modules())
    return Scope(path, scope, graph, candidates, residual, out_shape, 3 if conv3d else 2, traced.params,
                 traced.out_spec)


def _extra_levels(path: str, nodes: list[fx.Node], index: dict[fx.Node, int], ancestors: dict[fx.Node, int],
                  node_shapes: dict[str, Any], shapes: ShapeLog | None) -> dict[fx.Node, str]:
    """Nodes on the *extra levels* of a backbone that returns several levels, some beyond stride 32 (SSD's
    ``extra`` blocks): computed from a returned level of stride 32 or more (no body stage is deeper). The
    body's stages stay candidates, also where they continue from a returned stride-16 level (SSDlite splits a
    MobileNetV3 block there); SSD300-VGG's first extra level, computed from the stride-16 ``fc7``, cannot be
    told from such a stage by structure (:func:`_known_extra_levels` names it).

    Args:
        path: the scope's path.
        nodes: its graph's nodes, in order; ``index`` their positions, ``ancestors`` their ancestor bitmasks.
        node_shapes: the example shapes by node name.
        shapes: the example forward's log (None: no strides, nothing found).

    Returns:
        node -> the reason it may never get a DropBlock.
    """
    if shapes is None:
        return {}
    output = next(n for n in reversed(nodes) if n.op == "output")
    levels = [n for n in output.all_input_nodes
              if (shape := node_shapes.get(n.name)) is not None and len(shape) == 4]
    strides = {n: shapes.nominal_stride(node_shapes[n.name], path) or 0 for n in levels}
    if len(levels) < 2 or max(strides.values(), default=0) <= 32:
        return {}
    level_bits = sum(1 << index[n] for n in levels if strides[n] >= 32)  # no body stage is deeper
    return {n: "an extra pyramid level (computed from a level the backbone already returns)" for n in nodes
            if ancestors[n] & level_bits}


def _known_extra_levels(scope: nn.Module, nodes: list[fx.Node]) -> dict[fx.Node, str]:
    """The nodes of ``scope`` on the extra levels the registry names for its class (none for others)."""
    known = extra_levels(scope)
    if known is None:
        return {}
    container, body = known
    found = {}
    for n in nodes:
        parts = str(n.target).split(".") if n.op == "call_module" else []
        if len(parts) > 1 and parts[0] == container and parts[1].isdigit() and int(parts[1]) >= body:
            found[n] = f"an extra pyramid level ({type(scope).__name__}.{container}[{parts[1]}], not the backbone body)"
    return found

