"""An fx trace of a rewritten module as the root traces the forward inject installed on it.

``torch.fx.Tracer.trace`` traces ``type(root).forward``, the class's forward, of the module it is given, not
the instance ``forward`` inject installed: a rewritten module traced as the root would lose its own DropBlocks
from the training graph. :class:`TraceInstalledForward`, stored as the module's ``_get_name``, hands that trace
the installed forward instead. Used by :mod:`.rewrite` (installing it); depends on :mod:`.trace` only.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any, Callable

import torch.fx as fx
from torch import nn

from ..errors import SurgeryError
from .trace import concrete_args as concrete_args_of  # (``concrete_args`` is fx's parameter name)


def _trace_code() -> Any:
    """The code object of fx's ``Tracer.trace`` (torch.compile wraps the function once dynamo is loaded)."""
    return inspect.unwrap(fx.Tracer.trace).__code__


class TraceInstalledForward:
    """Stored as ``module._get_name``: makes an fx trace of ``module`` as the root trace the forward inject
    installed, so the training graph holds its DropBlocks.

    ``torch.fx.Tracer.trace`` traces ``type(root).forward``, the class's forward, not the instance ``forward``
    that inject installed: a rewritten module traced as the root of an fx graph (``symbolic_trace``,
    ``create_feature_extractor``, timm's ``FeatureGraphNet``) would lose its own DropBlocks from the training
    graph (its rewritten children are fine: fx calls their instance forwards). ``Tracer.trace`` calls
    ``root._get_name()`` after choosing that function and before building the graph's arguments from it
    (``Tracer.create_args_for_root``); called from there in training mode, this hands that one call the
    installed forward instead, wrapped with the class forward's signature, so the arguments are the same.
    Where that cannot work (the tracer is not found, or the module is a Sequential whose DropBlocks its owner
    holds, out of the traced module's reach), it raises a :class:`SurgeryError` rather than let them go
    missing. Eval traces, and any other caller (``repr``), get the module's name as usual.

    Args:
        module: the rewritten module.
        name: its path in the model (``<root>`` for the top module), for the message.
        points: the DropBlocks its own code runs (``after bn2``, ``shortcut of add``), for the message.
        original: an instance-level ``_get_name`` that was there before, if any (``strip`` puts it back).
    """

    def __init__(self, module: nn.Module, name: str, points: tuple[str, ...],
                 original: Callable[[], str] | None) -> None:
        self.module = module
        self.name = name
        self.points = points
        self.original = original

    def __call__(self) -> str:
        """The module's name; from fx's ``Tracer.trace`` in training mode, also the redirection."""
        caller = sys._getframe(1)  # noqa: SLF001 - who asks: fx's Tracer.trace, or anyone else
        if caller.f_code is _trace_code() and self.module.training:
            tracer = caller.f_locals.get("self")
            holder = getattr(self.module.__dict__.get("forward"), "holder", None)
            if holder is not None:  # a Sequential running its owner's DropBlocks: fx would not find them
                raise SurgeryError(self._lost(f"; its DropBlocks are held by the module that calls it "
                                              f"({type(holder).__name__}): trace that one"))
            if not isinstance(tracer, fx.Tracer) or tracer.root is not self.module:
                raise SurgeryError(self._lost())
            _trace_installed(tracer, self.module)
        if self.original is not None:
            return self.original()
        return type(self.module)._get_name(self.module)

    def _lost(self, why: str = "") -> str:
        cls = type(self.module).__name__
        return (f"torch.fx traces {cls}.forward, the class's forward, of the module it is given ({self.name!r}), "
                f"not the forward dropblock_inject installed on it, so its {len(self.points)} DropBlock(s) "
                f"({', '.join(self.points[:4])}{', ...' if len(self.points) > 4 else ''}) would be missing from "
                f"this training-mode graph{why}. Trace in eval mode (the eval graph is the original code, exact) or "
                f"after dropblock_inject.strip(model), or inject into the fx module itself "
                f"(dbi.inject(create_feature_extractor(plain_model, ...), recipe))")


def _trace_installed(tracer: fx.Tracer, module: nn.Module) -> None:
    """Make ``tracer``'s next ``create_args_for_root`` call, for ``type(module).forward``, trace the forward
    installed on ``module`` instead (once: the instance attribute removes itself), with the arguments that
    forward's graph was specialised to (``None``, constants) fixed unless the caller fixed them."""
    cls_forward = type(module).forward

    @functools.wraps(cls_forward)  # fx reads the arguments' names through __wrapped__
    def installed(root: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return root.forward(*args, **kwargs)

    def create_args_for_root(root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None) -> Any:
        del tracer.create_args_for_root
        if root_fn is not cls_forward:
            return tracer.create_args_for_root(root_fn, is_module, concrete_args)
        if concrete_args is None or isinstance(concrete_args, dict):  # arguments inject's graph was specialised to
            concrete_args = {**concrete_args_of(module.__dict__["forward"].params), **(concrete_args or {})} or None
        return tracer.create_args_for_root(installed, is_module, concrete_args)

    tracer.create_args_for_root = create_args_for_root  # type: ignore[method-assign]
