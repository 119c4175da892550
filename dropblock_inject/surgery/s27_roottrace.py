"""An fx trace of a rewritten module as the root, in training mode, is refused rather than left without the
DropBlocks of that module's own code.

``torch.fx.Tracer.trace`` traces ``type(root).forward``, the class's forward, of the module it is given, not
the instance ``forward`` inject installed: a rewritten module traced as the root would lose its own DropBlocks
from the training graph (its rewritten children keep theirs: fx calls their instance forwards). Nothing the
root holds is handed the tracer before that class forward runs (the model's type stays its own, and no frame
is inspected), so the trace cannot be pointed at the installed forward. :class:`RefuseRootTrace`, stored as the
module's ``_get_name``, which ``Tracer.trace`` calls on its root before tracing, raises a
:class:`~dropblock_inject.SurgeryError` instead when it is called while fx traces (fx's own tracing flag, read
through :mod:`.s01_registry`) and the module is in training mode. Eval traces (the original code, exact) and every
other caller (``repr``) get the module's name.
Used by :mod:`.s28_rewrite` (installing it); depends on :mod:`.s01_registry` only.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import SurgeryError
from .s01_registry import fx_tracing


class RefuseRootTrace:
    """Stored as ``module._get_name``: refuses an fx trace of ``module`` as the root in training mode.

    ``torch.fx.Tracer.trace`` calls ``root._get_name()`` right after choosing ``type(root).forward`` as the
    function to trace; that trace (``symbolic_trace``, ``create_feature_extractor``, timm's ``FeatureGraphNet``)
    would hold the original code of ``module``, without the DropBlocks its installed forward runs. Called while
    fx's tracing flag is set (see :func:`.s01_registry.fx_tracing`) and ``module`` is in training mode, this raises
    a :class:`SurgeryError` saying which DropBlocks and what to do; otherwise it returns the module's name.

    Args:
        module: the rewritten module.
        name: its path in the model (``<root>`` for the top module), for the message.
        points: the DropBlocks its own code runs (``after bn2``, ``shortcut of add``), for the message.
        original: an instance-level ``_get_name`` that was there before, if any (``strip`` puts it back).
        holder: the module holding its DropBlocks when it is not ``module`` (a Sequential running its owner's
            points, see :mod:`.s24_sequentials`), for the message.
    """

    def __init__(self, module: nn.Module, name: str, points: tuple[str, ...],
                 original: Callable[[], str] | None, holder: nn.Module | None = None) -> None:
        self.module = module
        self.name = name
        self.points = points
        self.original = original
        self.holder = holder

    def __call__(self) -> str:
        """The module's name.

        Raises:
            SurgeryError: called while torch.fx traces, with the module in training mode.
        """
        if self.module.training and fx_tracing():
            raise SurgeryError(self.message())
        if self.original is not None:
            return self.original()
        return type(self.module)._get_name(self.module)

    def message(self) -> str:
        """What the refusal says: what would go missing, and the ways to a graph that is right."""
        cls = type(self.module).__name__
        listed = ", ".join(self.points[:4]) + (", ..." if len(self.points) > 4 else "")
        if self.holder is not None:
            routes = (f"trace the module they are held by ({type(self.holder).__name__}): it calls this one, "
                      f"whose installed forward fx then traces")
        elif self.name != "<root>":
            routes = ("trace a module that contains it (fx traces the installed forward of every module it calls), "
                      "or use torch.export.export (it calls the installed forward)")
        else:
            routes = ("build the fx module from the plain model and inject into it "
                      "(dbi.inject(create_feature_extractor(dbi.strip(model), ...), recipe)), or use "
                      "torch.export.export (it calls the installed forward)")
        return (f"torch.fx traces {cls}.forward, the class's forward, of the module it is given as the root "
                f"({self.name!r}), not the forward dropblock_inject installed on it, so in training mode its "
                f"{len(self.points)} DropBlock(s) ({listed}) would be missing from the graph: the trace is "
                f"refused. Trace in eval mode (the eval graph is the original code, exact), or {routes}, or call "
                f"dropblock_inject.strip(model) first. torchvision's create_feature_extractor and timm's FX feature "
                f"models always trace training mode too")
