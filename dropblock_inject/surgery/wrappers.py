"""Wrappers: the network inside the modules people hold their models in.

``nn.DataParallel`` and ``DistributedDataParallel`` keep the network as ``.module``, ``torch.compile`` as
``._orig_mod`` (an ``OptimizedModule``), timm's ``ModelEma*`` and ``torch.optim.swa_utils.AveragedModel`` as
``.module``. Module paths in a recipe (``layer3.*``) are paths of the network, so ``plan``, ``inject`` and
``strip`` apply to the module inside; the wrapper itself is never changed. An ``OptimizedModule`` calls the
network's ``forward`` at run time, so an injected network inside one runs its DropBlocks (compile the model
after ``inject``, or reset dynamo's cache, so that dynamo traces the new code). The wrapper classes are
listed in :mod:`.registry`.
"""

from __future__ import annotations

from torch import nn


from .registry import is_registered_class, wrapper_types


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside any number of wrappers (DataParallel, DDP, compile, EMA / SWA copies).

    Args:
        model: a network, or a wrapper holding one.

    Returns:
        The innermost wrapped module; ``model`` itself when it is not a wrapper.
    """
    types = wrapper_types()
    while True:
        if not (isinstance(model, types) or is_registered_class(model, "wrapper")):
            return model
        children = model.__dict__["_modules"]
        inner = children.get("_orig_mod", children.get("module"))
        if not isinstance(inner, nn.Module):
            return model
        model = inner
