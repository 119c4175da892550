"""Outputs: a module's structured output as a flat list of leaves, and back with its exact type.

fx records a module's output as the argument of its graph's ``output`` node and would turn an ``OrderedDict``
subclass (Hugging Face's ``ModelOutput``) into a plain ``dict``; the tracer (:mod:`.s18_trace`) makes the graph
return the flat leaves instead, and the injected forward (:mod:`.s26_forward`) rebuilds the original type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import torch.fx as fx
import torch.utils._pytree as pytree


@dataclass(frozen=True)
class Structure:
    """How a structured output is rebuilt from the graph's flat list of outputs, with its exact type.

    ``how`` is "pytree" (a type ``torch.utils._pytree`` knows: tuple, list, dict, OrderedDict, NamedTuple,
    Hugging Face ``ModelOutput``; ``context`` is its one-level spec), "dataclass" (``context``: the field
    names) or "mapping" (another dict subclass; ``context``: the keys). ``children`` holds one entry per
    child: a nested Structure, or None for a leaf (a tensor, or a constant such as None).
    """

    how: str
    type: type
    context: Any
    children: tuple[Structure | None, ...]


def flatten_output(value: Any) -> tuple[list[Any], Structure | None]:
    """The leaves of ``value`` and the Structure that rebuilds it (None when ``value`` is a leaf)."""
    if isinstance(value, fx.Proxy):
        return [value], None
    children, spec = pytree.tree_flatten(value, is_leaf=lambda v: v is not value)  # one level
    if not spec.is_leaf():
        how, context = "pytree", spec
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        context = tuple(f.name for f in dataclasses.fields(value) if f.init)
        how, children = "dataclass", [getattr(value, name) for name in context]
    elif isinstance(value, dict):
        how, context, children = "mapping", tuple(value), list(value.values())
    else:
        return [value], None
    leaves: list[Any] = []
    nested: list[Structure | None] = []
    for child in children:
        sub, structure = flatten_output(child)
        leaves.extend(sub)
        nested.append(structure)
    return leaves, Structure(how, type(value), context, tuple(nested))


def unflatten_output(leaves: Any, structure: Any) -> Any:
    """The inverse of :func:`flatten_output`: ``structure`` rebuilt from the graph's flat outputs."""
    if structure is None:
        return leaves
    if isinstance(structure, pytree.TreeSpec):  # fx's own spec (a forward taking a list: see .trace)
        return pytree.tree_unflatten(leaves, structure)
    return _rebuild(iter(leaves), structure)


def _rebuild(it: Iterator[Any], structure: Structure | None) -> Any:
    if structure is None:
        return next(it)
    children = [_rebuild(it, child) for child in structure.children]
    if structure.how == "pytree":
        return pytree.tree_unflatten(children, structure.context)
    if structure.how == "dataclass":
        return structure.type(**dict(zip(structure.context, children)))
    return structure.type(zip(structure.context, children))
