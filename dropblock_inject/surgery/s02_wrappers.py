"""Wrappers: the network inside the modules people hold their models in.

``nn.DataParallel`` and ``DistributedDataParallel`` keep the network as ``.module``, ``torch.compile`` as
``._orig_mod`` (an ``OptimizedModule``), timm's ``ModelEma*`` and ``torch.optim.swa_utils.AveragedModel`` as
``.module``. Module paths in a recipe (``layer3.*``) are paths of the network, so ``plan``, ``inject`` and
``strip`` apply to the module inside; the wrapper itself is never changed. An ``OptimizedModule`` calls the
network's ``forward`` at run time, so an injected network inside one runs its DropBlocks (compile the model
after ``inject``, or reset dynamo's cache, so that dynamo traces the new code). The wrapper classes are
listed in :mod:`.s01_registry`.

A model object that holds a network but trains a new one (Ultralytics' ``YOLO(...)``: ``YOLO.train`` builds
its network afresh) is not seen through but refused, with what to pass instead: DropBlock injected into
``yolo.model`` would silently not be trained by ``yolo.train``.
"""

from __future__ import annotations

from torch import nn

from ..errors import SurgeryError
from .s01_registry import is_registered_class, network_owner, wrapper_types


def _refuse_owner(model: nn.Module, found: tuple[str, str]) -> None:
    attr, train = found
    net = getattr(model, attr, None)
    raise SurgeryError(
        f"{type(model).__name__} is a model object of another library, not the network: its training builds a new "
        f"network, so DropBlock put into this one would not be trained. To train with DropBlock, call {train}; to "
        f"plan, inject or strip the network itself (for a training loop of your own), pass its .{attr}"
        f"{f' ({type(net).__name__})' if isinstance(net, nn.Module) else ''}")


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside any number of wrappers (DataParallel, DDP, compile, EMA / SWA copies).

    Args:
        model: a network, or a wrapper holding one.

    Returns:
        The innermost wrapped module; ``model`` itself when it is not a wrapper.

    Raises:
        SurgeryError: ``model`` (or a module it wraps) is a model object whose training builds a new network
            (Ultralytics' ``YOLO(...)``), naming what to pass: ``add_dropblock(yolo, ...)`` to train with
            DropBlock, ``yolo.model`` for the network itself.
    """
    types = wrapper_types()
    while True:
        owner = network_owner(model)
        if owner is not None:
            _refuse_owner(model, owner)
        if not (isinstance(model, types) or is_registered_class(model, "wrapper")):
            return model
        children = model.__dict__["_modules"]
        inner = children.get("_orig_mod", children.get("module"))
        if not isinstance(inner, nn.Module):
            return model
        model = inner
