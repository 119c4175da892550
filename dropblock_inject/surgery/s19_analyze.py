"""Analysis: the residual additions of one traced scope and its DropBlock candidates.

A residual addition is an add whose two operands both derive from the scope's input and one of which
holds a layer; its *shortcut* is the side with fewer convolutions (counting those inside leaf modules),
then fewer layers, then fewer nodes, and must start at the scope's input. Branch candidates are the conv /
norm / act / unit nodes off the shortcut whose value reaches the output as a feature map (not only through
a gate). Nothing here depends on a recipe: :mod:`.s22_select` filters the candidates by rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from .s01_registry import extra_levels
from .s07_kinds import add_operands, conv_count, is_add, is_gate, node_kinds, unit_kinds
from .s12_shapes import ShapeLog
from .s16_roles import Roles
from .s13_residuals import ResidualAdd, source_outside
from .s11_calls import Param
from .s18_trace import Traced


@dataclass
class Candidate:
    node: fx.Node
    kind: str  # "branch" | "shortcut"
    kinds: frozenset[str]  # node kinds (branch) or empty (shortcut)
    add: fx.Node | None = None  # the residual addition, for shortcuts
    shape: tuple[int, ...] | None = None
    banned: str = ""  # why no DropBlock may go here (a prediction, a pooled map), whatever the recipe
    module: str | None = None  # the path of the module the node calls (None: a function, or the shortcut)


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


DEAD = "a map that never reaches the model's outputs"
ATTENTION = "a tensor that feeds attention or comes from it (q, k, v, a positional code, a projection)"
GATE = "an attention gate (a map that scales the trunk through a sigmoid or softmax)"


def analyze(path: str, scope: nn.Module, traced: Traced, shapes: ShapeLog | None, roles: Roles | None = None
            ) -> Scope:
    """The residual additions and DropBlock candidates of one traced scope.

    Args:
        path: the scope's module path; scope: the module; traced: its graph.
        shapes: the example forward's shapes (node shapes, predictions, pooled maps), if it ran.
        roles: the example forward's dataflow facts, if recorded: a module that normalises per channel with
            running or frozen statistics counts as a norm whatever its class, and a module output that never
            reaches the model's outputs or feeds attention is banned.

    Returns:
        The analysed :class:`Scope`.
    """
    graph = traced.graph
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    ancestors: dict[fx.Node, int] = {}
    for n in nodes:
        bits = 0
        for p in n.all_input_nodes:
            bits |= ancestors[p] | (1 << index[p])
        ancestors[n] = bits
    full = {n: f"{path}.{n.target}" if path else str(n.target) for n in nodes if n.op == "call_module"}
    kinds = {n: node_kinds(n, scope) for n in nodes}
    if roles is not None:  # norms by behaviour (a frozen BatchNorm class no registry names)
        kinds.update({n: frozenset({"norm"}) for n, p in full.items() if not kinds[n] and roles.is_norm(p)})
    placeholders = sum(1 << index[n] for n in nodes if n.op == "placeholder")
    convs = {n: conv_count(n, scope) for n in nodes}
    heavy = sum(1 << index[n] for n in nodes if kinds[n] & {"conv", "unit", "norm"} or convs[n])
    conv_bits = [(1 << index[n], convs[n]) for n in nodes if convs[n]]
    node_shapes, banned = shapes.node_shapes(path, graph, traced.input_shapes) if shapes else ({}, {})
    if roles is not None:
        if roles.ran(path) and not roles.is_live(path):  # the whole scope's output is thrown away
            banned.update({n.name: DEAD for n in nodes if n.op != "output"})
        for n, p in full.items():
            if n.name not in banned and roles.ran(p):
                reason = DEAD if not roles.is_live(p) else ATTENTION if roles.in_attention(p) else \
                    GATE if roles.is_gate(p) else ""
                if reason:
                    banned[n.name] = reason

    candidates: list[Candidate] = []
    on_shortcut = 0
    residual = False
    flow_adds = _dataflow_adds(path, nodes, roles)
    for n in nodes:
        operands = add_operands(n)
        if operands is None:
            continue
        a, b = operands
        own = {x: ancestors[x] | (1 << index[x]) for x in (a, b)}
        excl = {a: own[a] & ~own[b], b: own[b] & ~own[a]}
        found = flow_adds.get(n) if flow_adds is not None else None
        own_ban = ""
        if found is not None and set(roles.flow.ops[found.op].outputs) & roles.attention_region:  # type: ignore
            own_ban = ATTENTION  # an attention result plus its positional code
        if found is not None and found.skip is None and found.branch_convs[0] == found.branch_convs[1]:
            residual = True
            continue  # the sum of two conv branches of one depth (a re-parameterisable block): no shortcut
        if found is not None and found.skip is None and source_outside(roles.flow, found):  # type: ignore[union-attr]
            continue  # two maps the scope was handed, summed (HRNet's fusion of its branches): no skip, no shortcut
        if not own[a] & placeholders or not own[b] & placeholders:
            continue  # not a residual: one operand does not derive from the scope's input
        # the shortcut is the side with fewer convolutions (counting those inside leaf modules such as
        # timm's GhostModule or SeparableConv2d), then fewer layers, then fewer nodes
        shortcut, branch = sorted((b, a), key=lambda x: (sum(c for bit, c in conv_bits if excl[x] & bit),
                                                         bin(excl[x] & heavy).count("1"), bin(excl[x]).count("1")))
        if not excl[branch] & heavy:
            continue  # neither side holds a layer: not a residual connection
        # the shortcut must start at the scope's input: its exclusive path is fed only by placeholders; or,
        # as the dataflow shows, be the very source of the branch (``x = x + blk(x)`` chained in a loop)
        starts = [m for m in nodes if excl[shortcut] >> index[m] & 1] or [shortcut]
        feeders = {p for m in starts for p in m.all_input_nodes if not excl[shortcut] >> index[p] & 1}
        if shortcut.op != "placeholder" and not all(p.op == "placeholder" for p in feeders):
            # the dataflow's skip decides instead when it is the branch's source (``x + f(x)``) or one projection
            # of it beside a deeper branch (a pre-activation unit's ``identity_conv(preact)``, preact returned by
            # its body); a norm of it beside one conv is a re-parameterisable pair (RepGhost's fusion BN)
            if found is None or found.skip is None or not (
                    _is_source(roles, found) or found.branch_convs[found.skip] == 1):  # type: ignore[arg-type]
                continue
            shortcut, branch = (a, b) if found.skip == 0 else (b, a)
        residual = True
        on_shortcut |= excl[shortcut]
        shape = node_shapes.get(branch.name) or node_shapes.get(n.name) or _flow_shape(roles, found, node_shapes)
        candidates.append(Candidate(shortcut, "shortcut", frozenset(), add=n, shape=shape,
                                    banned=banned.get(shortcut.name, "") or own_ban))
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
            candidates.append(Candidate(n, "branch", _paired(unit_kinds(n, kinds), full.get(n), roles),
                                        shape=node_shapes.get(n.name),
                                        banned=banned.get(n.name, "") or extra.get(n, ""), module=full.get(n)))
    output = next(n for n in reversed(nodes) if n.op == "output")
    out_arg = output.args[0]
    out_shape = node_shapes.get(out_arg.name) if isinstance(out_arg, fx.Node) else None
    if shapes is not None and out_shape is None:
        out_shape = shapes.module_output(path)
    conv3d = any(isinstance(m, (nn.Conv3d, nn.BatchNorm3d)) for m in scope.modules())
    return Scope(path, scope, graph, candidates, residual, out_shape, 3 if conv3d else 2, traced.params,
                 traced.out_spec)


def _paired(kinds: frozenset[str], path: str | None, roles: Roles | None) -> frozenset[str]:
    """A node's kinds with its conv-norm pairing read from the dataflow when the pair spans two modules (a
    pre-activation ``bn-act-conv`` unit's conv feeds the next unit's norm): a conv module whose output is read
    by norms alone is no ``unit`` (the point goes after the norm), a norm module reading a conv's output is."""
    if roles is None or path is None or not roles.ran(path):
        return kinds
    flow = roles.flow
    call = flow.calls_of(path)[0]
    if "conv" in kinds and "unit" in kinds:
        readers = [c for v in dict.fromkeys(call.outputs) for c in flow.calls_reading(v)
                   if not c.path.startswith(path) and c.start >= call.end]
        direct = [c for c in readers if not any(c is not d and c.start <= d.start and d.end <= c.end
                                                for d in readers)]
        ops = [i for v in call.outputs for i in roles.consumers[v] if i >= call.end and not any(
            c.start <= i < c.end for c in readers)]
        if direct and not ops and all(roles.is_norm(c.path) for c in direct):
            return kinds - {"unit"}
    if kinds == {"norm"} and call.inputs:
        producer = flow.values[call.inputs[0]].producer
        if producer is not None and flow.ops[producer].kind == "conv":
            return kinds | {"unit"}
    return kinds


def _flow_shape(roles: Roles | None, add: ResidualAdd | None, node_shapes: dict[str, Any]) -> tuple[int, ...] | None:
    """The shape of the sum a residual addition made, as the example forward recorded it (a sum of functional
    ops has no module output to read it from), with the batch size of the scope's other shapes."""
    if roles is None or add is None:
        return None
    shape = roles.flow.values[roles.flow.ops[add.op].outputs[0]].shape
    batch = max((s[0] for s in node_shapes.values() if isinstance(s, tuple) and s), default=None)
    return (batch, *shape[1:]) if batch is not None and shape else shape


def _is_source(roles: Roles, add: ResidualAdd) -> bool:
    """Whether the addition's skip operand is what its other operand was computed from (``x + f(x)``)."""
    skip, other = add.operands[add.skip], add.operands[1 - add.skip]  # type: ignore[index, operator]
    return skip != other and skip in roles.flow.ancestors((other,))


_SCALAR_METHODS = {"size", "dim", "numel", "__len__"}


def _dataflow_adds(path: str, nodes: list[fx.Node], roles: Roles | None) -> dict[fx.Node, ResidualAdd] | None:
    """The scope's residual additions found by the recorded dataflow (chained ones included: each addition
    of a branch to a skip path, wherever the skip comes from), by graph node; None when the graph's tensor
    additions do not line up one to one with the recorded ones (then the graph alone decides)."""
    if roles is None or not roles.ran(path):
        return None
    scalar: set[fx.Node] = set()  # shape arithmetic: x.size(), x.shape[2] + 1
    for n in nodes:
        if (n.op == "call_method" and n.target in _SCALAR_METHODS) or (
                n.op == "call_function" and getattr(n.target, "__name__", "") == "getattr"
                and n.args[1:2] == ("shape",)) or (
                n.op == "call_function" and n.all_input_nodes and all(p in scalar for p in n.all_input_nodes)):
            scalar.add(n)
    tensor_adds = [n for n in nodes if is_add(n) and n not in scalar]
    first = min(roles.flow.calls_of(path), key=lambda c: c.start)
    recorded = [op for op in roles.flow.ops[first.start:first.end] if op.kind == "add" and op.scope == path]
    if len(recorded) != len(tensor_adds):
        return None
    return {tensor_adds[a.position]: a for a in roles.adds_in(path)}


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

