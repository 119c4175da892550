"""Sequentials: the top module's points inside its plain ``nn.Sequential`` children, run by those
children's own forwards, so that the top module need not be rewritten.

fx traces the *class* forward of the module it is given (``Tracer.trace`` calls ``type(root).forward``), so a
top module running its DropBlocks from its own rewritten graph cannot be traced whole in training mode: the trace
would miss them, and :mod:`.s27_roottrace` refuses it. Most such points are not in the
top module's own code, though: they are in a plain Sequential child the scope's tracer traced through (VGG's,
DenseNet's, MobileNet's and EfficientNet's ``features``, ShuffleNet's ``conv5``). When every point of the top
module is of that kind and its forward calls each of those Sequentials as a whole (in every
gradient-checkpointing variant), each Sequential gets the injected forward instead: its own graph with its
DropBlock calls, the same ops in the same order as the top module's graph would run them. The DropBlocks stay in
the top module's container (a Sequential iterates over its children, so it must not gain one), which the
Sequential's graph reaches through its injected forward (``self.forward.holder``). The top module's code is then
untouched: its forward, an fx trace of the whole model and ``torch.compile`` call the Sequentials' installed
forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from .s19_analyze import Scope
from .s17_checkpointing import combinations, variant_flags, wraps_checkpointing
from .s23_sites import Site
from ..errors import SurgeryError
from .s18_trace import trace_scope, trace_variant
from .s06_tracer import is_plain_sequential

HOLDER = "forward.holder"  # how a Sequential's graph reaches the module holding its DropBlocks


@dataclass(frozen=True)
class Delegated:
    """The sites of one plain Sequential child of the top module, as nodes of that Sequential's own graph."""

    name: str  # the child's name in the top module
    module: nn.Module
    graph: fx.Graph  # its own traced graph, without DropBlocks
    sites: tuple[Site, ...]


def _called_whole(scope: Scope, names: frozenset[str]) -> bool:
    """Whether the top module's forward calls each Sequential in ``names`` as one module, and never reaches
    inside it (``self.features[3](x)``, a loop over its children, ``checkpoint_seq(self.blocks, x)``), with
    every value of its checkpointing flags."""
    flag_names = variant_flags(scope.module)
    for values in [(False,) * len(flag_names), *combinations(flag_names)]:
        try:
            graph = trace_variant(scope.module, scope.path, scope.params, flag_names, values, leaves=names)
        except SurgeryError:
            return False
        called = set()
        for node in graph.nodes:
            target = str(node.target) if node.op in ("call_module", "get_attr") else ""
            head = target.partition(".")[0]
            if head not in names:
                continue
            if node.op != "call_module" or target != head:
                return False
            called.add(head)
        if called != names:
            return False
    return True


def delegate(scope: Scope, sites: list[Site]) -> list[Delegated] | None:
    """The top module's ``sites`` grouped by the plain Sequential children that hold them, or None when the
    top module must keep them in its own graph: it is not the top module, a Hugging Face checkpointing layer, its
    graph is specialised to one call pattern (``shortcut=None``, a constant argument), a site is a shortcut or
    not inside a plain Sequential child, a node cannot be matched one to one in that child's own graph, or the
    forward does not call the child as a whole.

    Args:
        scope: the analysed scope (only the top module, path ``""``, is ever delegated).
        sites: its DropBlock calls, nodes named as in ``scope.graph``.

    Returns:
        One :class:`Delegated` per Sequential, in the order of their first site.
    """
    if scope.path != "" or wraps_checkpointing(scope.module) or not sites:
        return None
    if scope.params is None or any(p.kind != "free" for p in scope.params):
        return None  # traced for one call pattern: another may reach inside the Sequential (and then it warns)
    nodes = {n.name: n for n in scope.graph.nodes}
    targets = [str(n.target) for n in scope.graph.nodes if n.op == "call_module"]
    groups: dict[str, list[tuple[Site, str]]] = {}
    for site in sites:
        node = nodes[site.source]
        head, _, rest = str(node.target).partition(".")
        child = scope.module._modules.get(head) if node.op == "call_module" and rest else None
        if site.add is not None or child is None or not is_plain_sequential(child) or "forward" in child.__dict__ \
                or targets.count(str(node.target)) != 1:
            return None
        groups.setdefault(head, []).append((site, rest))
    if not _called_whole(scope, frozenset(groups)):
        return None
    found = []
    for head, own in groups.items():
        child = scope.module._modules[head]
        try:
            graph = trace_scope(child, head).graph
        except SurgeryError:
            return None
        by_target: dict[str, list[fx.Node]] = {}
        for n in graph.find_nodes(op="call_module"):
            by_target.setdefault(str(n.target), []).append(n)
        mapped = []
        for site, rest in own:
            matches = by_target.get(rest, [])
            if len(matches) != 1:
                return None
            mapped.append(Site(site.key, matches[0].name, None))
        found.append(Delegated(head, child, graph, tuple(mapped)))
    return found
