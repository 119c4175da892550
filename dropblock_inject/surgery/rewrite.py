"""Stage 6, rewrite: insert the DropBlock nodes into each planned scope's graph and install the injected
forward (``inject``); remove it all again (``strip``).

Each rewritten scope gets a ``dropblocks`` ``ModuleDict`` holding its DropBlock modules (one per point, keyed by
the node it follows), an instance ``forward`` (:class:`~.forward.InjectedForward`) and an instance
``__prepare_scriptable__`` refusing TorchScript; ``strip`` deletes exactly these, so the original objects remain.
Every rewrite is built before any module is touched, so a failure leaves the model as it was.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from ..ops import DropBlock2d, DropBlock3d
from ..recipe import RecipeLike, ScheduleConfig, load_recipe
from .analyze import Candidate, Scope
from .forward import InjectedForward, RefuseScripting, check_not_injected, injected_modules
from .select import InsertionPoint, build_plan
from .wrappers import unwrap

_CONTAINER = "dropblocks"


_OUTPUT_NOT_SAVED = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d,
                     nn.Conv3d)


def _writable(source: fx.Node, scope: nn.Module) -> bool:
    """Whether DropBlock may work in place on ``source``: a fresh BatchNorm or convolution output (exact
    types: subclasses such as timm's BatchNormAct2d end with an activation that keeps its output for
    backward) that nothing but the DropBlock reads."""
    if source.op != "call_module" or len(source.users) != 1:
        return False
    return type(scope.get_submodule(str(source.target))) in _OUTPUT_NOT_SAVED


def _rewrite(scope: Scope, points: list[tuple[Candidate, InsertionPoint]], schedule: ScheduleConfig,
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
        model: the network, usually with pretrained weights loaded, or a wrapper holding it (DataParallel,
            DistributedDataParallel, torch.compile's OptimizedModule, an EMA / SWA copy): the recipe then
            applies to the network inside.
        recipe: a recipe name (see :func:`~dropblock_inject.available_recipes`), path, dict or Recipe.
        example_input: input used when a rule selects by output stride (default ``1x3x224x224``); with
            path-based recipes no forward pass is run unless it is given.

    Returns:
        ``model`` itself (the wrapper, if one was given): same type, same Parameter objects, same
        ``state_dict``. Each DropBlock starts at its final keep_prob; a :class:`~dropblock_inject.KeepProbScheduler` ramps it during training.

    Raises:
        RecipeError: a bad recipe, or a rule that selects nothing.
        SurgeryError: the model is already injected, or a selected module cannot be traced. On any error
            the model is left exactly as it was.
    """
    wrapper, model = model, unwrap(model)
    recipe = load_recipe(recipe)
    check_not_injected(model)
    built = build_plan(model, recipe, example_input, with_shapes=example_input is not None)
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
            fwd = InjectedForward(module, graph, original, f"{type(module).__name__} {path}",
                                   built.scopes[path].params, built.scopes[path].out_spec)
            module.add_module(name, container)
            module.forward = fwd  # type: ignore[method-assign]
            module.__dict__["__prepare_scriptable__"] = RefuseScripting(
                fwd.name, module.__dict__.get("__prepare_scriptable__"))
            done.append((module, name))
    except Exception:
        for module, name in done:
            _undo(module)
        raise
    return wrapper


def _undo(module: nn.Module) -> None:
    guard = module.__dict__.pop("__prepare_scriptable__", None)
    if isinstance(guard, RefuseScripting) and guard.original is not None:
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
        model: an injected (or plain) model, or a wrapper holding one.

    Returns:
        ``model`` itself, made of its original module objects with their current (trained) weights, ready
        for TorchScript, ONNX or torch.export.
    """
    for _, module in list(injected_modules(unwrap(model))):
        _undo(module)
    return model
