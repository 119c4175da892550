"""Node kinds: what a module or an fx node is, as placement sees it.

``conv`` (``nn.Conv2d``/``nn.Conv3d``), ``norm`` (BatchNorm, GroupNorm, InstanceNorm and the timm/torchvision
variants named below), ``act`` (activation modules and functions; other libraries' norms and activations are named in
:mod:`.s01_registry`), ``unit`` (a module whose traced forward is
the chain ``act(norm(conv(x)))``, such as timm's ``ConvNormAct``), residual additions (``+``, ``+=``,
``torch.add``, ``Tensor.add``/``add_``), functional convolutions (``F.conv2d``/``F.conv3d``) and *gates* (softmax, sigmoid, matrix products: what reaches the
output only through one is attention, not a feature map). torch's classes are matched by type, other
libraries' by the registry, so no optional dependency is imported.
"""

from __future__ import annotations

import operator
import weakref
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..ops._modules import _DropBlockNd
from .s01_registry import CONV_BASE, NORM_BASES, is_registered_class
from .s06_tracer import Tracer

CONV_TYPES = (nn.Conv2d, nn.Conv3d)
CONV_FUNCTIONS: set[Any] = {torch.conv2d, torch.conv3d, nn.functional.conv2d, nn.functional.conv3d}
_NORM_TYPES: tuple[type, ...] = (*NORM_BASES, nn.GroupNorm)
_ACT_TYPES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Mish,
              nn.PReLU)
ACT_FUNCTIONS: set[Any] = {torch.relu, torch.relu_, nn.functional.relu, nn.functional.relu6, nn.functional.silu,
                           nn.functional.gelu, nn.functional.hardswish, nn.functional.leaky_relu,
                           nn.functional.elu, nn.functional.mish}
ACT_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS: set[Any] = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


def is_container(m: nn.Module) -> bool:
    return isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def owner(path: str, model: nn.Module) -> str:
    """The module whose own forward calls the module at ``path``: its nearest ancestor that is not a
    container (Sequential, ModuleList, ModuleDict), the model itself ("") if there is none. Containers are
    never rewritten: their forward may iterate over their children, which must not gain a new one."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        anc = ".".join(parts[:i])
        if not is_container(model.get_submodule(anc)):
            return anc
    return ""


def is_layer(m: nn.Module) -> bool:
    """A module that computes a new map from its input (a conv, norm or linear layer, a conv-norm unit, or
    anything holding parameters of its own): what a prediction is the last of."""
    return bool(m._parameters) or isinstance(m, (nn.Linear, CONV_BASE)) or module_kind(m) in (
        "conv", "norm", "unit")


def module_kind(m: nn.Module) -> str | None:
    if isinstance(m, torch.jit.ScriptModule):
        return None  # a leaf: never traced, never hooked
    if isinstance(m, CONV_TYPES):
        return "conv"
    if isinstance(m, _NORM_TYPES) or is_registered_class(m, "norm"):
        return "norm"
    if isinstance(m, _ACT_TYPES) or is_registered_class(m, "act"):
        return "act"
    if (isinstance(m, (nn.ModuleDict, nn.ModuleList)) and type(m).forward is not nn.Module.forward and len(m) > 1
            and all(isinstance(c, CONV_TYPES) for c in m.children())):
        return "conv"  # parallel convolutions over channel groups, called as one layer (timm's MixedConv2d)
    if not isinstance(m, nn.Sequential):
        # a conv-norm(-act) module such as timm's ConvNormAct: one conv, a norm, nothing but acts besides
        kinds = [module_kind(c) if not isinstance(c, (nn.Identity, nn.Dropout)) else "skip" for c in m.children()]
        if kinds.count("conv") == 1 and "norm" in kinds and set(kinds) <= {"conv", "norm", "act", "skip"}:
            if _is_chain_unit(m):
                return "unit"
    return None


# modules checked by _is_chain_unit: module -> (what the answer depends on, the answer)
_CHAIN_UNITS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], bool]] = weakref.WeakKeyDictionary()


def _is_chain_unit(m: nn.Module) -> bool:
    """Whether ``m``'s forward is the straight chain ``act(norm(conv(x)))`` (timm's ConvNormAct, torchvision's
    Inception ``BasicConv2d``, which applies its ReLU functionally): one input, each step reading only the
    previous one, a conv first, then a norm, then only activations, Identity or Dropout. A module with the
    same children that adds a residual, or normalises before convolving, is not a unit, whatever its name."""
    key = (type(m).forward, m.__dict__.get("forward"), m.training, tuple(map(id, m.children())))
    cached = _CHAIN_UNITS.get(m)
    if cached is not None and cached[0] == key:
        return cached[1]
    _CHAIN_UNITS[m] = (key, answer := _chain_unit_graph(m))
    return answer


def _chain_unit_graph(m: nn.Module) -> bool:
    if "forward" in m.__dict__:
        return False  # an instance-level forward (e.g. one injected earlier) is not what fx would trace
    try:
        graph = Tracer().trace(m)
    except Exception:  # noqa: BLE001 - untraceable: not a unit
        return False
    prev: fx.Node | None = None
    steps = []
    for n in graph.nodes:
        if n.op == "placeholder":
            if prev is not None:
                return False  # more than one input
            prev = n
            continue
        if n.op == "output":
            return n.args[0] is prev and steps[:2] == ["conv", "norm"] and set(steps[2:]) <= {"act"}
        if n.all_input_nodes != [prev] or len(prev.users) != 1:  # type: ignore[union-attr]
            return False
        if n.op == "call_module":
            sub = m.get_submodule(str(n.target))
            kind = "skip" if isinstance(sub, (nn.Identity, nn.Dropout)) else module_kind(sub)
        elif (n.op == "call_function" and n.target in ACT_FUNCTIONS) or (
                n.op == "call_method" and n.target in ACT_METHODS):
            kind = "act"
        else:
            return False
        if kind is None or kind == "unit":
            return False
        if kind != "skip":
            steps.append(kind)
        prev = n
    return False


def is_composite(m: nn.Module) -> bool:
    """A module that is neither a layer nor a unit but holds a spatial convolution and a norm, as one step
    of a residual branch (timm's ``SelectiveKernel``, ResNeSt's ``SplitAttn``): it ends with a normalised
    map, so ``after: [norm]`` places a point after it."""
    if isinstance(m, torch.jit.ScriptModule) or module_kind(m) is not None:
        return False
    subs = list(m.modules())
    return any(isinstance(c, CONV_TYPES) and max(c.kernel_size) > 1 for c in subs) and any(
        module_kind(c) == "norm" for c in subs)


def node_kinds(node: fx.Node, scope: nn.Module) -> frozenset[str]:
    """The kinds of one node: a conv-norm unit also counts as a norm (conv then norm, as ``after`` sees it)."""
    if node.op == "call_module":
        m = scope.get_submodule(str(node.target))
        kind = module_kind(m)
        if kind == "unit":
            return frozenset({"unit", "norm"})
        if kind is None and is_composite(m):
            return frozenset({"composite", "norm"})
        return frozenset({kind}) if kind else frozenset()
    if node.op == "call_function" and node.target in CONV_FUNCTIONS:
        return frozenset({"conv"})
    if (node.op == "call_function" and node.target in ACT_FUNCTIONS) or (
            node.op == "call_method" and node.target in ACT_METHODS):
        return frozenset({"act"})
    return frozenset()


def is_add(node: fx.Node) -> bool:
    """Whether ``node`` is an addition (``+``, ``+=``, ``torch.add``, ``Tensor.add`` / ``add_``)."""
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS)


def add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    if not is_add(node) or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or "get_attr" in (a.op, b.op) or a is b:
        return None
    return a, b



_GATE_FUNCTIONS: set[Any] = {torch.softmax, nn.functional.softmax, torch.sigmoid, nn.functional.sigmoid,
                             nn.functional.hardsigmoid, torch.matmul, operator.matmul, torch.bmm, torch.einsum}
_GATE_METHODS = {"softmax", "sigmoid", "sigmoid_", "matmul", "bmm"}
_GATE_MODULES = (nn.Softmax, nn.Softmax2d, nn.Sigmoid, nn.Hardsigmoid)


def is_gate(node: fx.Node, scope: nn.Module) -> bool:
    """A softmax, sigmoid or matrix product: what reaches the output only through one is attention, not a
    feature map."""
    if node.op == "call_function":
        return node.target in _GATE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _GATE_METHODS
    if node.op == "call_module":
        m = scope.get_submodule(str(node.target))
        return isinstance(m, _GATE_MODULES) or is_registered_class(m, "gate")
    return False


def conv_count(node: fx.Node, scope: nn.Module) -> int:
    """Convolutions a node runs (a conv, a conv-norm unit, any module holding convs, a functional conv)."""
    if node.op == "call_function":
        return int(node.target in CONV_FUNCTIONS)
    if node.op != "call_module":
        return 0
    return sum(isinstance(m, CONV_TYPES) for m in scope.get_submodule(str(node.target)).modules())


def unit_kinds(node: fx.Node, kinds: dict[fx.Node, frozenset[str]]) -> frozenset[str]:
    """Add the ``unit`` kind: a norm right after a conv, a conv not followed by a norm, a conv-norm module."""
    k = set(kinds[node])
    if k == {"norm"} and any("conv" in kinds[p] for p in node.all_input_nodes):
        k.add("unit")
    if "conv" in k and not any(kinds[u] == {"norm"} for u in node.users):
        k.add("unit")
    return frozenset(k)


def inside_layer(path: str, kinds: dict[str, str | None]) -> bool:
    """Whether the module at ``path`` lies inside a conv / norm / act / unit module (the conv of a
    ConvNormAct, the activation of a BatchNormAct2d): its owner treats that module as one layer and places
    DropBlock after it, so the module's own graph must not get a DropBlock too."""
    parts = path.split(".")
    return any(kinds.get(".".join(parts[:i])) is not None for i in range(1, len(parts)))


def usable_scopes(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The modules that may be scopes: the model itself, and no container, layer or DropBlock below it; nothing
    inside a ScriptModule (a ScriptModule is a leaf, never traced nor hooked)."""
    scripted = [p for p, m in modules.items() if isinstance(m, torch.jit.ScriptModule)]
    return {p: m for p, m in modules.items()
            if not any(p == q or p.startswith(q + ".") for q in scripted) and (p == "" or (
                not is_container(m) and not isinstance(m, _DropBlockNd) and module_kind(m) is None))}
