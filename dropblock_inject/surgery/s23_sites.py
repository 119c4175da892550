"""Sites: DropBlock calls inserted into a copy of a traced graph.

A *site* is one DropBlock call: after a node (a branch point), or between a node and the residual addition
it feeds (a shortcut point). :func:`insert` also says which of them may work in place: those whose input is a
fresh BatchNorm or convolution output that nothing else reads (the injected forward still checks, per call,
that no hook observes its producer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

_OUTPUT_NOT_SAVED = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d,
                     nn.Conv3d)


def writable(source: fx.Node, scope: nn.Module) -> bool:
    """Whether DropBlock may work in place on ``source`` (when no hook observes its producer, checked per call
    by the injected forward): a fresh BatchNorm or convolution output (exact types: subclasses such as timm's
    BatchNormAct2d end with an activation that keeps its output for backward) that nothing but the DropBlock
    reads."""
    if source.op != "call_module" or len(source.users) != 1:
        return False
    return type(scope.get_submodule(str(source.target))) in _OUTPUT_NOT_SAVED


@dataclass(frozen=True)
class Site:
    """One DropBlock call: after node ``source`` (a branch), or between ``source`` and the addition ``add``;
    ``key`` names the DropBlock in its container."""

    key: str
    source: str
    add: str | None


def missing(graph: fx.Graph, sites: tuple[Site, ...] | list[Site], like: fx.Graph) -> str | None:
    """The first node the ``sites`` name that ``graph`` lacks, or holds with another op or target than
    ``like`` (its main graph) does; None when :func:`insert` can put every site into ``graph``."""
    nodes = {n.name: n for n in graph.nodes}
    reference = {n.name: n for n in like.nodes}
    for site in sites:
        for name in (site.source, site.add):
            if name is not None and (name not in nodes or (nodes[name].op, nodes[name].target) != (
                    reference[name].op, reference[name].target)):
                return name
    return None


def insert(src: fx.Graph, sites: tuple[Site, ...] | list[Site], container: str, scope: nn.Module,
           like: fx.Graph | None = None) -> tuple[fx.Graph, set[str]]:
    """A copy of ``src`` with the DropBlock calls of ``sites``, and the keys of those that may work in place.

    Args:
        src: the traced graph of ``scope``.
        sites: where the calls go (nodes found by name).
        container: the attribute path, from ``scope``, of the ``ModuleDict`` holding the DropBlocks by key.
        scope: the module whose graph ``src`` is.
        like: a graph whose nodes of those names the found nodes must match (op and target), when ``src`` is
            another variant of it.

    Returns:
        The new graph, and the keys of the sites that may work in place.

    Raises:
        KeyError: a node is missing or differs from ``like``'s.
    """
    graph = fx.Graph()
    graph.output(graph.graph_copy(src, {}))
    nodes = {n.name: n for n in graph.nodes}
    reference = {n.name: n for n in (like or src).nodes}
    inplace = set()
    for site in sites:
        for name in (site.source, site.add):
            if name is not None and (name not in nodes or (nodes[name].op, nodes[name].target) != (
                    reference[name].op, reference[name].target)):
                raise KeyError(name)
        source = nodes[site.source]
        if site.add is None:
            with graph.inserting_after(source):
                new = graph.call_module(f"{container}.{site.key}", (source,))
            source.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        else:
            add = nodes[site.add]
            with graph.inserting_before(add):
                new = graph.call_module(f"{container}.{site.key}", (source,))
            add.replace_input_with(source, new)
        if writable(source, scope):
            inplace.add(site.key)
    graph.lint()
    return graph, inplace
