"""Everything the surgery knows about other libraries, and about torch's internals, in one place.

No rule derives these from what a model computes: each entry names a class or function of another library (by
name, so no optional dependency is imported) with the reason the surgery must know it. Users add their own
with :func:`register`, as timm's ``register_notrace_module`` does::

    @dropblock_inject.register("norm", reason="normalises per channel with frozen statistics")
    class MyFrozenNorm(nn.Module): ...

Kinds:

* ``norm`` -- a module that normalises per channel (a branch point goes after it);
* ``act`` -- an activation module (DropBlock commutes with it);
* ``gate`` -- a module whose output gates a feature map (softmax, sigmoid): what reaches the output only
  through one is attention, not a feature map;
* ``leaf_function`` -- a function fx must record as one call (it computes padding from a map's size in
  Python, which fails on an fx Proxy);
* ``checkpoint_function`` -- a gradient-checkpointing function, kept as one call in a traced graph;
* ``wrapper`` -- a module holding the network as ``.module`` (an EMA copy): recipes apply to the network.

This module is the only one of the surgery that names another library's class or touches a private torch
attribute; a test enforces it.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.utils.checkpoint
from torch import nn

KINDS = ("norm", "act", "gate", "leaf_function", "checkpoint_function", "wrapper")


@dataclass(frozen=True)
class Entry:
    """One piece of third-party knowledge: a class or function named ``name`` (a class's bare name, or
    ``"module:attribute"`` for a function found in a loaded module), of ``kind``, and why it is there."""

    kind: str
    name: str
    reason: str


_BUILTIN = (
    Entry("norm", "FrozenBatchNorm2d", "torchvision's and timm's BatchNorm with frozen statistics "
                                       "(detection backbones): no BatchNorm subclass, same per-channel affine"),
    Entry("norm", "FrozenBatchNormAct2d", "timm's frozen BatchNorm followed by an activation"),
    Entry("norm", "BatchNormAct2d", "timm's BatchNorm followed by an activation, one module"),
    Entry("norm", "GroupNormAct", "timm's GroupNorm followed by an activation, one module"),
    Entry("norm", "LayerNorm2d", "timm's/torchvision's channel LayerNorm over NCHW maps (ConvNeXt)"),
    Entry("norm", "LayerNorm3d", "the 3-D variant of LayerNorm2d (video models)"),
    Entry("act", "Swish", "timm's and efficientnet_pytorch's SiLU"),
    Entry("act", "HardSwish", "timm's hard swish"),
    Entry("act", "Mish", "timm's Mish"),
    Entry("act", "GELU", "timm's GELU module"),
    Entry("act", "HardMish", "timm's hard Mish"),
    Entry("act", "QuickGELU", "OpenCLIP's sigmoid-approximated GELU"),
    Entry("act", "GELUTanh", "timm's tanh-approximated GELU"),
    Entry("gate", "Sigmoid", "timm's sigmoid module (squeeze-excitation gates)"),
    Entry("gate", "HardSigmoid", "timm's hard sigmoid module (MobileNetV3 gates)"),
    Entry("gate", "HardSigmoidMe", "timm's memory-efficient hard sigmoid"),
    Entry("gate", "RadixSoftmax", "timm's split-attention softmax (ResNeSt)"),
    Entry("leaf_function", "transformers.models.mobilenet_v1.modeling_mobilenet_v1:apply_tf_padding",
          "computes TF 'SAME' padding with int() of the map's size: fails on a Proxy"),
    Entry("leaf_function", "transformers.models.mobilenet_v2.modeling_mobilenet_v2:apply_tf_padding",
          "computes TF 'SAME' padding with int() of the map's size: fails on a Proxy"),
    Entry("leaf_function", "timm.layers.padding:pad_same", "computes 'SAME' padding with max() of the map's size"),
    Entry("checkpoint_function", "torch.utils.checkpoint:checkpoint", "torch's activation checkpointing"),
    Entry("checkpoint_function", "torch.utils.checkpoint:checkpoint_sequential", "torch's checkpointing of a sequence"),
    Entry("checkpoint_function", "timm.models._manipulate:checkpoint_seq", "timm's checkpointing of a block sequence"),
    Entry("checkpoint_function", "timm.models._manipulate:checkpoint", "timm's wrapper of torch's checkpoint"),
    Entry("wrapper", "ModelEma", "timm's EMA copy holds the network as .module"),
    Entry("wrapper", "ModelEmaV2", "timm's EMA copy holds the network as .module"),
    Entry("wrapper", "ModelEmaV3", "timm's EMA copy holds the network as .module"),
)

# Hugging Face's GradientCheckpointingLayer checkpoints the layer's forward in a class-level __call__ wrapper,
# reading ``gradient_checkpointing``: the injected forward does what that wrapper does.
_HF_CHECKPOINTING_LAYER = ("transformers.modeling_layers", "GradientCheckpointingLayer")

# Extractors whose extra pyramid levels structure cannot tell from a body stage: (module, class) -> the
# ``ModuleList`` holding the levels, and how many of its first entries are the body. torchvision's SSD300 VGG
# extractor puts VGG's conv5/fc6/fc7 in ``extra[0]``; ``extra[1]``, SSD's first extra level, is computed from
# fc7 (stride 16) exactly as SSDlite's stride-32 MobileNetV3 stage is from its stride-16 level.
_EXTRA_LEVELS = {("torchvision.models.detection.ssd", "SSDFeatureExtractorVGG"): ("extra", 1)}

# Model objects that hold a network without being the one their training trains: Ultralytics' ``Model``
# (``YOLO(...)``, ``RTDETR(...)``, ``YOLOWorld(...)``) is an nn.Module keeping the network as ``.model``, but
# its forward runs a predictor and ``Model.train`` builds a NEW network from the YAML or checkpoint (loading
# ``.model``'s weights): DropBlocks injected into ``.model`` would not be trained. (module, class) -> the
# attribute holding the network, and the call that trains with DropBlock instead.
_OWNERS = {("ultralytics.engine.model", "Model"):
           ("model", "dropblock_inject.integrations.ultralytics.add_dropblock(yolo, recipe) before yolo.train(...)")}


def network_owner(m: object) -> tuple[str, str] | None:
    """For a model object :data:`_OWNERS` names (its library loaded; nothing is imported): the attribute that
    holds its network and how to train it with DropBlock; None for anything else."""
    for (module, name), found in _OWNERS.items():
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(m, cls):
            return found
    return None


_lock = threading.Lock()
_user: list[Entry] = []
_user_objects: dict[str, list[Any]] = {kind: [] for kind in KINDS}

_T = TypeVar("_T")


def register(kind: str, target: _T | None = None, *, reason: str) -> Any:
    """Teach the surgery a class or function of another library (or of your own).

    Args:
        kind: one of ``norm``, ``act``, ``gate``, ``leaf_function``, ``checkpoint_function``, ``wrapper``
            (see the module's documentation).
        target: the class or function; omitted, ``register`` returns a decorator.
        reason: why it is registered (shown by :func:`entries`).

    Returns:
        ``target`` itself (or the decorator).

    Raises:
        ValueError: an unknown kind, an empty reason, or a target that is neither a class nor a function.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; expected one of {list(KINDS)}")
    if not reason.strip():
        raise ValueError("register(...) needs a reason: why the surgery must know this class or function")

    def add(obj: _T) -> _T:
        if not callable(obj):
            raise ValueError(f"register({kind!r}, ...) expects a class or a function, got {type(obj).__name__}")
        with _lock:
            _user.append(Entry(kind, f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', obj)}",
                               reason))
            _user_objects[kind].append(obj)
        return obj

    return add if target is None else add(target)


def entries() -> tuple[Entry, ...]:
    """Every entry, built in first, then those registered, each with its reason."""
    return (*_BUILTIN, *_user)


def _names(kind: str) -> frozenset[str]:
    return frozenset(e.name for e in _BUILTIN if e.kind == kind)


_CLASS_NAMES = {kind: _names(kind) for kind in ("norm", "act", "gate", "wrapper")}


def is_registered_class(m: object, kind: str) -> bool:
    """Whether ``m``'s class is registered as ``kind`` (by its name, or a registered class it derives from)."""
    if type(m).__name__ in _CLASS_NAMES[kind]:
        return kind != "wrapper" or type(m).__module__.startswith("timm.")
    return any(isinstance(c, type) and isinstance(m, c) for c in _user_objects[kind])


def _loaded(kind: str) -> list[Callable[..., Any]]:
    """The functions of ``kind`` whose library is loaded (nothing is imported), then those registered."""
    found = []
    for e in _BUILTIN:
        if e.kind != kind:
            continue
        module, _, name = e.name.partition(":")
        fn = getattr(sys.modules.get(module), name, None)
        if callable(fn):
            found.append(fn)
    return [*found, *_user_objects[kind]]


def leaf_functions() -> tuple[Callable[..., Any], ...]:
    """The functions a trace records as one call: padding helpers and checkpoint functions."""
    return (*_loaded("leaf_function"), *checkpoint_functions())


def checkpoint_functions() -> tuple[Callable[..., Any], ...]:
    """The checkpoint functions kept as one fx node when traced (torch's as they are now, and as they were when
    this package was imported: a partial made before a profiler or a test wrapped them holds the original)."""
    found = _loaded("checkpoint_function")
    return (*found, *(f for f in _TORCH_CHECKPOINTS if not any(f is g for g in found)))


CHECKPOINT_MODULE = torch.utils.checkpoint  # reached as ``torch.utils.checkpoint.checkpoint`` by a forward
CHECKPOINT_NAMES = ("checkpoint", "checkpoint_sequential")  # its functions a forward may call through it
_TORCH_CHECKPOINTS = tuple(getattr(CHECKPOINT_MODULE, name) for name in CHECKPOINT_NAMES)


def is_checkpointing_layer(m: nn.Module) -> bool:
    """Whether ``m`` is a Hugging Face ``GradientCheckpointingLayer`` (see :data:`_HF_CHECKPOINTING_LAYER`)."""
    module, name = _HF_CHECKPOINTING_LAYER
    layer = getattr(sys.modules.get(module), name, None)
    return isinstance(layer, type) and isinstance(m, layer)


def extra_levels(scope: nn.Module) -> tuple[str, int] | None:
    """For an extractor :data:`_EXTRA_LEVELS` names: its levels' container and how many entries are body."""
    return _EXTRA_LEVELS.get((type(scope).__module__, type(scope).__qualname__))


def wrapper_types() -> tuple[type, ...]:
    """torch's wrappers holding the network: ``.module`` (DataParallel, DDP, AveragedModel), ``._orig_mod``
    (torch.compile's OptimizedModule, from torch's private dynamo package when torch has one)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    from torch.optim.swa_utils import AveragedModel

    types: list[type] = [DataParallel, DistributedDataParallel, AveragedModel]
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # a torch without dynamo
        pass
    else:
        types.append(OptimizedModule)
    return tuple(types)


# --- torch internals the surgery reads (private attributes of torch, read only) ----------------------------

# torch's private base classes of its norms and convolutions: every BatchNorm (1d/2d/3d, SyncBatchNorm, lazy)
# and InstanceNorm variant, every ConvNd, without listing each
NORM_BASES: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
CONV_BASE: type = nn.modules.conv._ConvNd


def dispatch_mode_base() -> type:
    """torch's base class of a dispatch mode (``torch.utils._python_dispatch``: no public path), which the
    example forward's meta mode derives from."""
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode

def global_hooks_present(*names: str) -> bool:
    """Whether the process holds global module hooks (``register_module_forward_hook`` and the like) of the
    given kinds (``forward``, ``forward_pre``, ``backward``): torch keeps them in private dicts of
    ``torch.nn.modules.module``, read here, never changed."""
    from torch.nn.modules import module as torch_module

    return any(getattr(torch_module, f"_global_{name}_hooks", None) for name in names)


CALL_IMPL_SLOT = "_compiled_call_impl"
"""The instance attribute ``nn.Module.__call__`` runs instead of its hook dispatch when set (``Module.compile``
sets it): the example forward puts a function of its own there, on the model's modules only, so neither the
user's per-module nor global hooks fire, and restores it after."""


def fx_tracing() -> bool:
    """Whether ``torch.fx``'s symbolic tracer is running: ``Tracer.trace`` sets a flag of
    ``torch.fx._symbolic_trace`` for the whole trace (thread-local in current torch, a module flag in older
    releases). Read through its private getter: the public ``is_fx_tracing`` logs a warning on its first call."""
    from torch.fx import _symbolic_trace

    get = getattr(_symbolic_trace, "_get_is_fx_tracing", None)
    return bool(get() if get is not None else getattr(_symbolic_trace, "_is_fx_tracing_flag", False))


def compile_forward(src: str, namespace: dict[str, Any]) -> Callable[..., Any]:
    """The ``forward`` function of fx-generated code ``src`` (``Graph.python_code``), compiled by torch's own
    helper, as ``GraphModule.recompile`` does: the package runs no ``exec`` of its own."""
    from torch.fx import graph_module

    return graph_module._forward_from_src(src, namespace)

