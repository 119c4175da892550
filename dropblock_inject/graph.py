"""FX surgery: find insertion points (``plan``), insert DropBlock (``inject``) and remove it (``strip``).

How it works. Only the smallest modules that hold the chosen nodes are traced (typically each residual
block), with every child module a leaf except plain ``nn.Sequential`` containers, which are traced
through. For each such *scope*, DropBlock ``call_module`` nodes are inserted into its graph and the
scope's ``forward`` is replaced, on that instance only, by a callable that runs the rewritten graph in
training mode and the module's original ``forward`` in eval mode. So:

* the model keeps its type, its module objects, its Parameters and its ``state_dict`` (DropBlock has no
  persistent state); the inserted modules live in a ``dropblocks`` ``ModuleDict`` on each scope;
* eval() runs the original code, bit for bit; anything fx would bake into the traced graph from
  ``self.training`` follows train()/eval() because the traced graph only ever runs in training mode,
  and children (StochasticDepth, DropPath, Dropout, ...) stay leaves that read their own flag;
* ``strip`` deletes the instance ``forward`` and the ``dropblocks`` container: the original objects remain.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import operator
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import Tensor, nn

from .ops import DropBlock2d, DropBlock3d, _DropBlockNd
from .recipe import Recipe, RecipeError, RecipeLike, Rule, ScheduleConfig, load_recipe

__all__ = ["InsertionPoint", "SurgeryError", "inject", "plan", "strip", "format_plan", "injected_dropblocks"]

_CONTAINER = "dropblocks"


class SurgeryError(RuntimeError):
    """A model that cannot be rewritten as asked: an untraceable target, or a model already injected."""


@dataclass(frozen=True)
class InsertionPoint:
    """Where one DropBlock goes.

    Attributes:
        module: path of the traced scope (e.g. ``"layer3.0"``).
        after: the fx node after which DropBlock is inserted (for a shortcut, the addition's shortcut
            operand, e.g. ``"x"`` for an identity shortcut or ``"downsample_1"`` for a projection).
        kind: ``"branch"`` or ``"shortcut"``.
        block_size: DropBlock's block size.
        shape: feature shape at that point for the example input, ``None`` when it was not computed.
        keep_prob: final keep_prob of this point (the schedule's target).
        drop_rate_scale: this point's drop rate relative to the recipe's.
        per_channel: independent masks per channel.
        rule: name of the recipe rule that selected it.
    """

    module: str
    after: str
    kind: str
    block_size: int
    shape: tuple[int, ...] | None
    keep_prob: float
    drop_rate_scale: float = 1.0
    per_channel: bool = True
    rule: str = ""


# ----------------------------------------------------------------------------------------------------------
# node kinds

_CONV_TYPES = (nn.Conv2d, nn.Conv3d)
_NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_NORM_NAMES = {"FrozenBatchNorm2d", "LayerNorm2d", "LayerNorm3d", "BatchNormAct2d", "GroupNormAct", "FrozenBatchNormAct2d"}
_ACT_TYPES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Mish,
              nn.PReLU)
_ACT_NAMES = {"Swish", "HardSwish", "Mish", "GELU", "HardMish", "QuickGELU", "GELUTanh"}
_ACT_FUNCTIONS: set[Any] = {torch.relu, torch.relu_, nn.functional.relu, nn.functional.relu6, nn.functional.silu,
                            nn.functional.gelu, nn.functional.hardswish, nn.functional.leaky_relu,
                            nn.functional.elu, nn.functional.mish}
_ACT_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS: set[Any] = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


def _module_kind(m: nn.Module) -> str | None:
    if isinstance(m, _CONV_TYPES):
        return "conv"
    if isinstance(m, _NORM_TYPES) or type(m).__name__ in _NORM_NAMES:
        return "norm"
    if isinstance(m, _ACT_TYPES) or type(m).__name__ in _ACT_NAMES:
        return "act"
    if not isinstance(m, nn.Sequential):
        # a conv-norm(-act) module such as timm's ConvNormAct: one conv, a norm, nothing but acts besides
        kinds = [_module_kind(c) if not isinstance(c, (nn.Identity, nn.Dropout)) else "skip" for c in m.children()]
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
        graph = _Tracer(autowrap_modules=()).trace(m)  # (no math functions to wrap in a unit: faster)
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
            kind = "skip" if isinstance(sub, (nn.Identity, nn.Dropout)) else _module_kind(sub)
        elif (n.op == "call_function" and n.target in _ACT_FUNCTIONS) or (
                n.op == "call_method" and n.target in _ACT_METHODS):
            kind = "act"
        else:
            return False
        if kind is None or kind == "unit":
            return False
        if kind != "skip":
            steps.append(kind)
        prev = n
    return False


def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


_INPLACE_OPERATORS = ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
                      "ilshift", "irshift", "imatmul")


class _Proxy(fx.Proxy):
    """An fx Proxy that records augmented assignments (``out += identity``) as the in-place operators.

    A plain Proxy has no ``__iadd__``, so Python falls back to ``out = out + identity``, and the rewritten
    graph would allocate a new tensor where the original code reused one (fx's code generator emits
    ``operator.iadd`` back as ``+=``).
    """


def _inplace(name: str) -> Callable[[fx.Proxy, Any], fx.Proxy]:
    target = getattr(operator, name)

    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", target, (self, other), {})

    method.__name__ = f"__{name}__"
    return method


for _name in _INPLACE_OPERATORS:
    setattr(_Proxy, f"__{_name}__", _inplace(_name))


class _Tracer(fx.Tracer):
    """Traces one module's own forward; children are leaves, except plain Sequential containers."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not _is_plain_sequential(m) or isinstance(m, _DropBlockNd)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)


# How a scope's forward is called. fx traces every argument as a Proxy, so ``if shortcut is None:`` or
# ``if not isinstance(x, list):`` would bake the wrong branch, and a List[Tensor] input cannot be indexed.
# Arguments that were None, lists/tuples of tensors, or plain constants in the example forward (or, without
# one, parameters whose default is None) are specialised with ``concrete_args``; the injected forward
# checks each call against that pattern and runs the original forward when it differs.


@dataclass(frozen=True)
class _Arg:
    """One argument of a module call in the example forward."""

    kind: str  # "tensor" | "none" | "seq" (list/tuple of tensors) | "const" (bool/int/str) | "other"
    shapes: tuple[tuple[int, ...], ...] = ()  # "tensor": its shape; "seq": one per element
    value: Any = None  # "const": the value; "seq": list or tuple


def _describe(value: Any) -> _Arg:
    if isinstance(value, Tensor):
        return _Arg("tensor", (tuple(value.shape),))
    if value is None:
        return _Arg("none")
    if type(value) in (list, tuple) and value and all(isinstance(t, Tensor) for t in value):
        return _Arg("seq", tuple(tuple(t.shape) for t in value), type(value))
    if type(value) in (bool, int, str):
        return _Arg("const", value=value)
    return _Arg("other")


@dataclass(frozen=True)
class _Call:
    """The first call of a module in the example forward."""

    args: tuple[_Arg, ...]
    kwargs: dict[str, _Arg]


_EMPTY = inspect.Parameter.empty


@dataclass(frozen=True)
class _Param:
    """How the traced graph takes one parameter of the scope's forward.

    ``kind`` "none" / "seq" / "const": specialised at trace time to None, a list (or tuple) of ``expect[1]``
    tensors of type ``expect[0]``, or the constant ``expect``; "free": one placeholder, which must not be
    None unless ``expect`` is true.
    """

    name: str
    index: int | None  # position, None for a keyword-only parameter
    default: Any  # _EMPTY when required
    kind: str
    expect: Any = None

    def describe(self) -> str:
        what = {"none": "None", "free": "any" if self.expect else "not None"}.get(self.kind)
        if self.kind == "seq":
            what = f"{self.expect[0].__name__} of {self.expect[1]} tensors"
        elif self.kind == "const":
            what = repr(self.expect)
        return f"{self.name}={what}"


@dataclass
class _Traced:
    graph: fx.Graph
    params: tuple[_Param, ...] | None  # None: a forward with *args/**kwargs, called as it is
    out_spec: Any  # pytree spec rebuilding a structured output from the graph's flat one, or None
    input_shapes: list[tuple[int, ...] | None]  # one per placeholder, from the example forward


@functools.lru_cache(maxsize=None)
def _forward_signature(cls: type) -> inspect.Signature | None:
    try:
        return inspect.signature(inspect.unwrap(cls.forward))
    except (TypeError, ValueError):
        return None


def _specialise(scope: nn.Module, call: _Call | None) -> tuple[dict[str, Any], tuple[_Param, ...] | None,
                                                              list[tuple[int, ...] | None]]:
    """``concrete_args`` for fx, the parameter layout of the traced graph and its placeholders' shapes."""
    positional = [a.shapes[0] if a.kind == "tensor" else None for a in call.args] if call else []
    sig = _forward_signature(type(scope))
    if sig is None:
        return {}, None, positional
    params = list(sig.parameters.values())[1:]  # without self
    if not params or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return {}, None, positional
    passed: dict[str, Any] = {}
    if call is not None:
        try:
            passed = dict(sig.bind(None, *call.args, **call.kwargs).arguments)
        except TypeError:
            call = None
    concrete: dict[str, Any] = {}
    layout: list[_Param] = []
    shapes: list[tuple[int, ...] | None] = []
    for i, p in enumerate(params):
        index = None if p.kind is p.KEYWORD_ONLY else i
        if call is None:
            arg = _Arg("none") if p.default is None else None
        elif p.name in passed:
            arg = passed[p.name]
        else:
            arg = _describe(p.default)
        if arg is None or arg.kind in ("tensor", "other"):
            layout.append(_Param(p.name, index, p.default, "free", arg is None or arg.kind == "other"))
            shapes.append(arg.shapes[0] if arg is not None and arg.kind == "tensor" else None)
        elif arg.kind == "none":
            concrete[p.name] = None
            layout.append(_Param(p.name, index, p.default, "none"))
            shapes.append(None)
        elif arg.kind == "seq":
            concrete[p.name] = arg.value([fx.PH] * len(arg.shapes))
            layout.append(_Param(p.name, index, p.default, "seq", (arg.value, len(arg.shapes))))
            shapes.extend(arg.shapes)
        else:
            concrete[p.name] = arg.value
            layout.append(_Param(p.name, index, p.default, "const", arg.value))
            shapes.append(None)
    return concrete, tuple(layout), shapes


def _trace(scope: nn.Module, path: str, call: _Call | None = None) -> _Traced:
    """The training-mode graph of ``scope``; SurgeryError naming ``path`` if fx cannot trace it."""
    concrete, params, shapes = _specialise(scope, call)
    was_training = scope.training
    scope.training = True  # only the scope's own flag can be baked: children are leaves
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fx warns about constants it cannot guard; the layout checks them
            graph = _Tracer().trace(scope, concrete_args=concrete or None)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ...
        raise SurgeryError(f"cannot trace module {path or '<root>'!r} ({type(scope).__name__}) with torch.fx: "
                           f"{type(e).__name__}: {e}") from e
    finally:
        scope.training = was_training
    info = getattr(graph._codegen, "pytree_info", None)
    placeholders = sum(n.op == "placeholder" for n in graph.nodes)
    if params is not None and placeholders != len(shapes):
        raise SurgeryError(f"cannot trace module {path or '<root>'!r} ({type(scope).__name__}) with torch.fx: "
                           f"{placeholders} placeholders for the arguments {[p.describe() for p in params]}")
    return _Traced(graph, params, info.out_spec if info is not None else None, shapes)


# ----------------------------------------------------------------------------------------------------------
# graph analysis


@dataclass
class _Candidate:
    node: fx.Node
    kind: str  # "branch" | "shortcut"
    kinds: frozenset[str]  # node kinds (branch) or empty (shortcut)
    add: fx.Node | None = None  # the residual addition, for shortcuts
    shape: tuple[int, ...] | None = None


@dataclass
class _Scope:
    path: str
    module: nn.Module
    graph: fx.Graph
    candidates: list[_Candidate]
    residual: bool
    output_shape: tuple[int, ...] | None
    spatial_dims: int
    params: tuple[_Param, ...] | None = None  # see _Traced
    out_spec: Any = None


def _node_kinds(node: fx.Node, scope: nn.Module) -> frozenset[str]:
    if node.op == "call_module":
        kind = _module_kind(scope.get_submodule(str(node.target)))
        return frozenset({kind}) if kind else frozenset()
    if (node.op == "call_function" and node.target in _ACT_FUNCTIONS) or (
            node.op == "call_method" and node.target in _ACT_METHODS):
        return frozenset({"act"})
    return frozenset()


def _add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS)
    if not is_add or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or "get_attr" in (a.op, b.op) or a is b:
        return None
    return a, b


def _analyze(path: str, scope: nn.Module, traced: _Traced, shapes: _ShapeLog | None) -> _Scope:
    graph = traced.graph
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    ancestors: dict[fx.Node, int] = {}
    for n in nodes:
        bits = 0
        for p in n.all_input_nodes:
            bits |= ancestors[p] | (1 << index[p])
        ancestors[n] = bits
    kinds = {n: _node_kinds(n, scope) for n in nodes}
    placeholders = sum(1 << index[n] for n in nodes if n.op == "placeholder")
    convs = {n: _conv_count(n, scope) for n in nodes}
    heavy = sum(1 << index[n] for n in nodes if kinds[n] & {"conv", "unit", "norm"} or convs[n])
    conv_bits = [(1 << index[n], convs[n]) for n in nodes if convs[n]]
    node_shapes = shapes.node_shapes(path, graph, traced.input_shapes) if shapes else {}

    candidates: list[_Candidate] = []
    on_shortcut = 0
    residual = False
    for n in nodes:
        operands = _add_operands(n)
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
        candidates.append(_Candidate(shortcut, "shortcut", frozenset(), add=n, shape=shape))
    # nodes whose value reaches the output as a feature map, not only as attention logits or a gate
    # (through a softmax, sigmoid or matrix product: global-context / spatial attention convolutions)
    features: set[fx.Node] = set()
    for n in reversed(nodes):
        if n.op == "output" or any(u in features and not _is_gate(u, scope) for u in n.users):
            features.add(n)
    for n in nodes:
        if kinds[n] and not (on_shortcut >> index[n] & 1) and n in features:
            candidates.append(_Candidate(n, "branch", _unit_kinds(n, kinds), shape=node_shapes.get(n.name)))
    output = next(n for n in reversed(nodes) if n.op == "output")
    out_arg = output.args[0]
    out_shape = node_shapes.get(out_arg.name) if isinstance(out_arg, fx.Node) else None
    if shapes is not None and out_shape is None:
        out_shape = shapes.module_output(path)
    conv3d = any(isinstance(m, (nn.Conv3d, nn.BatchNorm3d)) for m in scope.modules())
    return _Scope(path, scope, graph, candidates, residual, out_shape, 3 if conv3d else 2, traced.params,
                  traced.out_spec)


_GATE_FUNCTIONS: set[Any] = {torch.softmax, nn.functional.softmax, torch.sigmoid, nn.functional.sigmoid,
                              nn.functional.hardsigmoid, torch.matmul, operator.matmul, torch.bmm, torch.einsum}
_GATE_METHODS = {"softmax", "sigmoid", "sigmoid_", "matmul", "bmm"}
_GATE_MODULES = (nn.Softmax, nn.Softmax2d, nn.Sigmoid, nn.Hardsigmoid)
_GATE_NAMES = {"Sigmoid", "HardSigmoid", "HardSigmoidMe", "RadixSoftmax"}  # timm


def _is_gate(node: fx.Node, scope: nn.Module) -> bool:
    """A softmax, sigmoid or matrix product: what reaches the output only through one is attention, not a
    feature map."""
    if node.op == "call_function":
        return node.target in _GATE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _GATE_METHODS
    if node.op == "call_module":
        m = scope.get_submodule(str(node.target))
        return isinstance(m, _GATE_MODULES) or type(m).__name__ in _GATE_NAMES
    return False


def _conv_count(node: fx.Node, scope: nn.Module) -> int:
    """Convolutions a ``call_module`` node runs (a conv, a conv-norm unit, or any module holding convs)."""
    if node.op != "call_module":
        return 0
    return sum(isinstance(m, _CONV_TYPES) for m in scope.get_submodule(str(node.target)).modules())


def _unit_kinds(node: fx.Node, kinds: dict[fx.Node, frozenset[str]]) -> frozenset[str]:
    """Add the ``unit`` kind: a norm right after a conv, a conv not followed by a norm, a conv-norm module."""
    k = set(kinds[node])
    if "norm" in k and any("conv" in kinds[p] for p in node.all_input_nodes):
        k.add("unit")
    if "conv" in k and not any("norm" in kinds[u] for u in node.users):
        k.add("unit")
    return frozenset(k)


# ----------------------------------------------------------------------------------------------------------
# shapes from one forward pass


class _ShapeLog:
    """Output shapes of every module call and the arguments of each module's first call, from one eval
    forward."""

    def __init__(self, model: nn.Module, example_input: Any) -> None:
        self.calls: dict[str, list[tuple[int, ...] | None]] = defaultdict(list)
        self.inputs: dict[str, _Call] = {}
        handles = []
        for name, m in model.named_modules():
            handles.append(m.register_forward_hook(functools.partial(self._hook, name)))
            handles.append(m.register_forward_pre_hook(functools.partial(self._pre_hook, name), with_kwargs=True))
        modes = {m: m.training for m in model.modules()}
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        tensors = [a for a in args if isinstance(a, Tensor)]
        self.input_spatial = tuple(tensors[0].shape[2:]) if tensors else ()
        try:
            model.eval()
            with torch.no_grad():
                model(*args)
        except Exception as e:
            raise SurgeryError(f"the example input of shape {[tuple(t.shape) for t in tensors]} failed to run "
                               f"through the model: {type(e).__name__}: {e}") from e
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes.items():
                m.training = mode

    @staticmethod
    def _shape(value: Any) -> tuple[int, ...] | None:
        return tuple(value.shape) if isinstance(value, Tensor) else None

    def _hook(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        self.calls[name].append(self._shape(output))

    def _pre_hook(self, name: str, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if name not in self.inputs:
            self.inputs[name] = _Call(tuple(map(_describe, args)), {k: _describe(v) for k, v in kwargs.items()})

    def call(self, path: str) -> _Call | None:
        return self.inputs.get(path)

    def module_output(self, path: str) -> tuple[int, ...] | None:
        calls = self.calls.get(path)
        return calls[0] if calls else None

    def stride(self, shape: tuple[int, ...] | None) -> int | None:
        if not shape or len(shape) != len(self.input_spatial) + 2 or not self.input_spatial:
            return None
        if shape[-1] <= 0:
            return None
        # nearest power of two: unpadded convs and floor-mode pools give e.g. 224 / 13 or 299 / 17
        return 2 ** round(math.log2(self.input_spatial[-1] / shape[-1]))

    def node_shapes(self, path: str, graph: fx.Graph,
                    inputs: list[tuple[int, ...] | None]) -> dict[str, tuple[int, ...] | None]:
        """Shapes of the graph's nodes: placeholders from ``inputs``, module calls from the log, elementwise
        ops from their first input."""
        shapes: dict[str, tuple[int, ...] | None] = {}
        seen: dict[str, int] = defaultdict(int)
        placeholder = 0
        for n in graph.nodes:
            shape = None
            if n.op == "placeholder":
                shape = inputs[placeholder] if placeholder < len(inputs) else None
                placeholder += 1
            elif n.op == "call_module":
                full = f"{path}.{n.target}" if path else str(n.target)
                calls = self.calls.get(full, [])
                shape = calls[seen[full]] if seen[full] < len(calls) else None
                seen[full] += 1
            elif n.op in ("call_function", "call_method") and (
                    n.target in _ACT_FUNCTIONS or n.target in _ACT_METHODS or _add_operands(n) is not None):
                first = n.args[0] if n.args else None
                shape = shapes.get(first.name) if isinstance(first, fx.Node) else None
            shapes[n.name] = shape
        return shapes


# ----------------------------------------------------------------------------------------------------------
# planning


def _is_container(m: nn.Module) -> bool:
    return isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def _owner(path: str, model: nn.Module) -> str:
    """The module whose own forward calls the module at ``path``: its nearest ancestor that is not a
    container (Sequential, ModuleList, ModuleDict), the model itself ("") if there is none. Containers are
    never rewritten: their forward may iterate over their children, which must not gain a new one."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        anc = ".".join(parts[:i])
        if not _is_container(model.get_submodule(anc)):
            return anc
    return ""


def _inside_layer(path: str, kinds: dict[str, str | None]) -> bool:
    """Whether the module at ``path`` lies inside a conv / norm / act / unit module (the conv of a
    ConvNormAct, the activation of a BatchNormAct2d): its owner treats that module as one layer and places
    DropBlock after it, so the module's own graph must not get a DropBlock too."""
    parts = path.split(".")
    return any(kinds.get(".".join(parts[:i])) is not None for i in range(1, len(parts)))


def _rule_scopes(model: nn.Module, rule: Rule, modules: dict[str, nn.Module], shapes: _ShapeLog | None) -> list[str]:
    if rule.modules is not None:
        chosen = [p for p in modules if p and rule.matches_path(p) and _module_kind(modules[p]) is None
                  and not isinstance(modules[p], _DropBlockNd) and not _is_container(modules[p])]
        # a glob such as "layer3.**" also matches modules inside a block: keep the outermost match
        outer = set(chosen)
        chosen = [p for p in chosen if not any(p.startswith(q + ".") for q in outer)]
    else:
        owners = {}
        kinds = {p: _module_kind(m) for p, m in modules.items() if p}
        for p, kind in kinds.items():
            if kind is not None and not _inside_layer(p, kinds):
                owners.setdefault(_owner(p, model), []).append(p)
        chosen = []
        for owner, leaves in owners.items():
            if rule.stride is not None and shapes is not None:
                strides = {shapes.stride(shapes.module_output(p)) for p in leaves}
                strides.add(shapes.stride(shapes.module_output(owner)))
                if not strides & set(rule.stride):
                    continue
            chosen.append(owner)
    if rule.types is not None:
        chosen = [p for p in chosen if type(modules[p]).__name__ in rule.types
                  or f"{type(modules[p]).__module__}.{type(modules[p]).__qualname__}" in rule.types]
    return chosen


def _select(scope: _Scope, rule: Rule, shapes: _ShapeLog | None) -> list[_Candidate]:
    wanted = set(rule.after)
    out_stride = shapes.stride(scope.output_shape) if shapes else None
    selected = []
    for c in scope.candidates:
        if c.kind == "shortcut":
            if not rule.shortcut:
                continue
        elif not ("any" in wanted or c.kinds & wanted):
            continue
        if c.shape is not None and (len(c.shape) != scope.spatial_dims + 2 or math.prod(c.shape[2:]) <= 1):
            continue  # not a feature map (e.g. a 1x1 squeeze map, or a channels-last tensor)
        if rule.stride is not None:
            stride = shapes.stride(c.shape) if shapes else None
            in_stage = scope.residual and out_stride in rule.stride
            if c.kind == "shortcut":
                if not (in_stage or stride in rule.stride):
                    continue
            elif not (stride in rule.stride or in_stage):
                continue
        selected.append(c)
    return selected


@dataclass
class _Plan:
    scopes: dict[str, _Scope]
    points: dict[str, list[tuple[_Candidate, InsertionPoint]]]


def _needs_shapes(recipe: Recipe) -> bool:
    return any(r.stride is not None for r in recipe.rules)


def _wants_call(scope: nn.Module) -> bool:
    """Whether tracing ``scope`` depends on how it is called: a forward taking more than one argument,
    optional ones, or an input annotated as something other than a Tensor (e.g. ``List[Tensor]``)."""
    sig = _forward_signature(type(scope))
    if sig is None:
        return True
    params = list(sig.parameters.values())[1:]
    if len(params) != 1:
        return True
    p = params[0]
    return p.kind is not p.POSITIONAL_OR_KEYWORD or p.default is not _EMPTY or p.annotation not in (
        _EMPTY, Tensor, "Tensor", "torch.Tensor")


def _call_log(model: nn.Module, example_input: Any) -> _ShapeLog | None:
    """The calls of one example forward (default ``1x3x224x224``), or None if the model does not take it:
    scopes are then traced with their parameters' defaults."""
    try:
        return _ShapeLog(model, torch.randn(1, 3, 224, 224) if example_input is None else example_input)
    except SurgeryError:
        if example_input is not None:
            raise
        return None


def _build_plan(model: nn.Module, recipe: Recipe, example_input: Any, with_shapes: bool) -> _Plan:
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"expected a torch.nn.Module, got {type(model).__name__}")
    shapes = None
    if with_shapes or _needs_shapes(recipe):
        if example_input is None:
            example_input = torch.randn(1, 3, 224, 224)
        shapes = _ShapeLog(model, example_input)
    modules = dict(model.named_modules())
    scopes: dict[str, _Scope] = {}
    untraceable: dict[str, SurgeryError] = {}
    calls: list[_ShapeLog | None] = [shapes] if shapes is not None else []
    chosen: dict[str, dict[tuple[str, str], tuple[_Candidate, InsertionPoint]]] = defaultdict(dict)
    total = 0
    for rule in recipe.rules:
        count = 0
        named = rule.modules is not None or rule.types is not None
        skipped: list[str] = []
        for path in _rule_scopes(model, rule, modules, shapes):
            if path in untraceable:
                if named:
                    raise untraceable[path]
                skipped.append(str(untraceable[path]))
                continue
            if path not in scopes:
                if not calls and _wants_call(modules[path]):
                    calls.append(_call_log(model, example_input))  # the call pattern, once
                call = calls[0].call(path) if calls and calls[0] is not None else None
                try:
                    traced = _trace(modules[path], path, call)
                except SurgeryError as e:
                    if named:  # the user named this module: an error
                        raise
                    untraceable[path] = e
                    skipped.append(str(e))
                    warnings.warn(f"{e}; rule {rule.name!r} selects by output stride, so this module is left "
                                  f"without DropBlock", stacklevel=3)
                    continue
                scopes[path] = _analyze(path, modules[path], traced, shapes)
            for c in _select(scopes[path], rule, shapes):
                point = InsertionPoint(
                    module=path, after=c.node.name, kind=c.kind,
                    block_size=rule.block_size or recipe.dropblock.block_size, shape=c.shape,
                    keep_prob=recipe.keep_prob(rule), drop_rate_scale=recipe.drop_rate_scale(rule),
                    per_channel=recipe.dropblock.per_channel if rule.per_channel is None else rule.per_channel,
                    rule=rule.name)
                key = (c.kind, c.node.name if c.kind == "branch" else c.add.name)  # type: ignore[union-attr]
                chosen[path][key] = (c, point)  # a later rule overrides an earlier one
                count += 1
        total += count
        if count == 0 and not rule.optional:
            raise RecipeError(f"rule {rule.name!r} of recipe {recipe.name!r} matches no insertion point in "
                              f"{type(model).__name__} (modules={list(rule.modules) if rule.modules else None}, "
                              f"types={list(rule.types) if rule.types else None}, "
                              f"stride={list(rule.stride) if rule.stride else None}, after={list(rule.after)}, "
                              f"shortcut={rule.shortcut})" + "".join(f"; skipped: {e}" for e in skipped))
    if total == 0:
        raise RecipeError(f"recipe {recipe.name!r} matches no insertion point in {type(model).__name__}"
                          + "".join(f"; skipped: {e}" for e in untraceable.values()))
    order = {name: i for i, name in enumerate(modules)}
    points = {p: sorted(chosen[p].values(), key=lambda cp: _node_order(scopes[p].graph, cp[0]))
              for p in sorted(chosen, key=order.__getitem__)}
    return _Plan(scopes, points)


def _node_order(graph: fx.Graph, c: _Candidate) -> int:
    target = c.add if c.kind == "shortcut" else c.node
    return next(i for i, n in enumerate(graph.nodes) if n is target)


def plan(model: nn.Module, recipe: RecipeLike, *, example_input: Any = None) -> list[InsertionPoint]:
    """List where ``recipe`` would insert DropBlock in ``model``, changing nothing.

    Args:
        model: the network.
        recipe: a recipe name, path, dict or :class:`~dropblock_inject.recipe.Recipe`.
        example_input: input used to compute feature shapes and strides (default ``1x3x224x224``).

    Returns:
        The insertion points, in module order then graph order. ``format_plan`` prints them as a table.

    Raises:
        RecipeError: a bad recipe, or a rule that selects nothing.
        SurgeryError: a selected module that torch.fx cannot trace.
    """
    recipe = load_recipe(recipe)
    _check_not_injected(model)
    built = _build_plan(model, recipe, example_input, with_shapes=True)
    return [p for pts in built.points.values() for _, p in pts]


def format_plan(points: Sequence[InsertionPoint]) -> str:
    """A plain-text table of insertion points with totals."""
    header = ("module", "after", "kind", "block", "keep_prob", "shape", "rule")
    rows = [(p.module, p.after, p.kind, str(p.block_size), f"{p.keep_prob:.4g}",
             "x".join(map(str, p.shape)) if p.shape else "-", p.rule) for p in points]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    branch = sum(p.kind == "branch" for p in points)
    lines.append(f"{len(points)} DropBlocks: {branch} branch, {len(points) - branch} shortcut, "
                 f"in {len({p.module for p in points})} modules")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# the injected forward


def _compile_graph(graph: fx.Graph, name: str) -> Callable[..., Any]:
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<dropblock_inject: {name}>", "exec"), namespace)  # noqa: S102 - fx codegen
    return namespace["forward"]


class _InjectedForward:
    """Stored as ``module.forward``: the rewritten graph in training mode, the original forward in eval.

    A graph traced with specialised arguments (see ``_specialise``) runs only for calls that match them:
    another call pattern (e.g. ``shortcut=None`` where the trace saw a tensor) warns and runs the original
    forward, without DropBlock. Pickles (torch.save of a whole model), deep-copies and compiles; its code is
    regenerated from the graph.
    """

    def __init__(self, module: nn.Module, graph: fx.Graph, original: Callable[..., Any] | None,
                 name: str, params: tuple[_Param, ...] | None = None, out_spec: Any = None) -> None:
        self.module = module
        self.graph = graph
        self.original = original  # an instance-level forward that was there before, if any
        self.name = name
        self.params = params
        self.out_spec = out_spec
        self._fn = _compile_graph(graph, name)
        self._names = frozenset(p.name for p in params or ())
        self._positional = sum(p.index is not None for p in params or ())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.module.training:
            if torch.jit.is_tracing():
                raise SurgeryError(f"torch.jit.trace cannot record the random DropBlock ops of {self.name!r} in "
                                   f"training mode; trace the model in eval() mode, or call "
                                   f"dropblock_inject.strip(model) first")
            if self.params is None:
                return self._fn(self.module, *args, **kwargs)
            flat = self._flatten(args, kwargs)
            if flat is not None:
                out = self._fn(self.module, *flat)
                return out if self.out_spec is None else pytree.tree_unflatten(out, self.out_spec)
            warnings.warn(f"dropblock_inject: {self.name!r} was rewritten for calls with "
                          f"({', '.join(p.describe() for p in self.params)}) but is called otherwise; this call "
                          f"runs its original forward, without DropBlock", stacklevel=2)
        if self.original is not None:
            return self.original(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def _flatten(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any] | None:
        """The graph's placeholder values for this call, or None if it does not match the traced pattern."""
        if len(args) > self._positional or (kwargs and not self._names.issuperset(kwargs)):
            return None
        flat: list[Any] = []
        for p in self.params:  # type: ignore[union-attr]
            if p.index is not None and p.index < len(args):
                if p.name in kwargs:
                    return None
                value = args[p.index]
            elif p.name in kwargs:
                value = kwargs[p.name]
            elif p.default is not _EMPTY:
                value = p.default
            else:
                return None
            if p.kind == "free":
                if value is None and not p.expect:
                    return None
                flat.append(value)
            elif p.kind == "none":
                if value is not None:
                    return None
                flat.append(None)
            elif p.kind == "seq":
                if type(value) is not p.expect[0] or len(value) != p.expect[1]:
                    return None
                flat.extend(value)
            else:
                if type(value) is not type(p.expect) or value != p.expect:
                    return None
                flat.append(value)
        return flat

    def __reduce__(self) -> tuple[Any, ...]:
        return (_InjectedForward, (self.module, self.graph, self.original, self.name, self.params, self.out_spec))

    def __deepcopy__(self, memo: dict[int, Any]) -> _InjectedForward:
        return _InjectedForward(copy.deepcopy(self.module, memo), copy.deepcopy(self.graph, memo),
                                copy.deepcopy(self.original, memo), self.name, self.params, self.out_spec)


class _RefuseScripting:
    """Stored as ``module.__prepare_scriptable__``, which ``torch.jit.script`` calls before compiling."""

    def __init__(self, name: str, original: Callable[[], nn.Module] | None) -> None:
        self.name = name
        self.original = original  # an instance-level hook that was there before, if any

    def __call__(self) -> nn.Module:
        raise SurgeryError(f"torch.jit.script cannot compile the forward that dropblock_inject installed on "
                           f"{self.name!r}; call dropblock_inject.strip(model) before scripting (or use "
                           f"torch.jit.trace / torch.export / torch.onnx.export in eval mode, which see the "
                           f"original forward)")


def _injected_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if isinstance(m.__dict__.get("forward"), _InjectedForward):
            yield name, m


def _check_not_injected(model: nn.Module) -> None:
    for name, _ in _injected_modules(model):
        raise SurgeryError(f"the model is already injected (module {name or '<root>'!r} was rewritten); "
                           f"call dropblock_inject.strip(model) first")


def injected_dropblocks(model: nn.Module) -> list[_DropBlockNd]:
    """The DropBlock modules that ``inject`` inserted into ``model``, in module order."""
    return [m for _, m in model.named_modules() if isinstance(m, _DropBlockNd) and hasattr(m, "point")]


# modules whose backward does not read their output: DropBlock may overwrite it
_OUTPUT_NOT_SAVED = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d,
                     nn.Conv3d)


def _writable(source: fx.Node, scope: nn.Module) -> bool:
    """Whether DropBlock may work in place on ``source``: a fresh BatchNorm or convolution output (exact
    types: subclasses such as timm's BatchNormAct2d end with an activation that keeps its output for
    backward) that nothing but the DropBlock reads."""
    if source.op != "call_module" or len(source.users) != 1:
        return False
    return type(scope.get_submodule(str(source.target))) in _OUTPUT_NOT_SAVED


def _rewrite(scope: _Scope, points: list[tuple[_Candidate, InsertionPoint]], schedule: ScheduleConfig,
             container_name: str) -> tuple[fx.Graph, nn.ModuleDict]:
    graph = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(scope.graph, remap)
    graph.output(output)
    container = nn.ModuleDict()
    cls = DropBlock3d if scope.spatial_dims == 3 else DropBlock2d
    for c, point in points:
        key = f"{point.kind}_{point.after}" if point.kind == "shortcut" else point.after
        db = cls(point.block_size, point.keep_prob, per_channel=point.per_channel)
        db.point = point  # type: ignore[assignment]
        db.schedule = schedule  # type: ignore[assignment]
        container[key] = db
        source = remap[c.node]
        if c.kind == "branch":
            with graph.inserting_after(source):
                new = graph.call_module(f"{container_name}.{key}", (source,))
            source.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        else:
            add = remap[c.add]  # type: ignore[index]
            with graph.inserting_before(add):
                new = graph.call_module(f"{container_name}.{key}", (source,))
            add.replace_input_with(source, new)
        db.inplace = _writable(source, scope.module)
    graph.lint()
    return graph, container


def inject(model: nn.Module, recipe: RecipeLike, *, example_input: Any = None) -> nn.Module:
    """Insert DropBlock into ``model`` in place, where ``recipe`` says.

    Args:
        model: the network, usually with pretrained weights loaded.
        recipe: a recipe name (see :func:`~dropblock_inject.available_recipes`), path, dict or Recipe.
        example_input: input used when a rule selects by output stride (default ``1x3x224x224``); with
            path-based recipes no forward pass is run unless it is given.

    Returns:
        ``model`` itself: same type, same Parameter objects, same ``state_dict``. Each DropBlock starts at
        its final keep_prob; a :class:`~dropblock_inject.KeepProbScheduler` ramps it during training.

    Raises:
        RecipeError: a bad recipe, or a rule that selects nothing.
        SurgeryError: the model is already injected, or a selected module cannot be traced. On any error
            the model is left exactly as it was.
    """
    recipe = load_recipe(recipe)
    _check_not_injected(model)
    built = _build_plan(model, recipe, example_input, with_shapes=example_input is not None)
    rewrites = []
    for path, points in built.points.items():
        scope = built.scopes[path]
        name = _CONTAINER
        while hasattr(scope.module, name):
            name = f"_{name}"
        graph, container = _rewrite(scope, points, recipe.schedule, name)
        rewrites.append((scope.module, path, graph, container, name))
    done: list[tuple[nn.Module, str]] = []
    try:
        for module, path, graph, container, name in rewrites:
            original = module.__dict__.get("forward")
            fwd = _InjectedForward(module, graph, original, f"{type(module).__name__} {path}",
                                   built.scopes[path].params, built.scopes[path].out_spec)
            module.add_module(name, container)
            module.forward = fwd  # type: ignore[method-assign]
            module.__dict__["__prepare_scriptable__"] = _RefuseScripting(
                fwd.name, module.__dict__.get("__prepare_scriptable__"))
            done.append((module, name))
    except Exception:
        for module, name in done:
            _undo(module)
        raise
    return model


def _undo(module: nn.Module) -> None:
    guard = module.__dict__.pop("__prepare_scriptable__", None)
    if isinstance(guard, _RefuseScripting) and guard.original is not None:
        module.__dict__["__prepare_scriptable__"] = guard.original
    fwd = module.__dict__.pop("forward")
    if fwd.original is not None:
        module.forward = fwd.original  # type: ignore[method-assign]
    for name, child in list(module.named_children()):
        if isinstance(child, nn.ModuleDict) and child and all(hasattr(c, "point") for c in child.values()):
            delattr(module, name)


def strip(model: nn.Module) -> nn.Module:
    """Remove every DropBlock that :func:`inject` inserted; a model never injected is returned unchanged.

    Args:
        model: an injected (or plain) model.

    Returns:
        ``model`` itself, made of its original module objects with their current (trained) weights, ready
        for TorchScript, ONNX or torch.export.
    """
    for _, module in list(_injected_modules(model)):
        _undo(module)
    return model
