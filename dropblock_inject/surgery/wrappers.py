"""Stage 0, wrappers: the network inside the modules people hold their models in.

``nn.DataParallel`` and ``DistributedDataParallel`` keep the network as ``.module``, ``torch.compile`` as
``._orig_mod`` (an ``OptimizedModule``), timm's ``ModelEma*`` and ``torch.optim.swa_utils.AveragedModel`` as
``.module``. Module paths in a recipe (``layer3.*``) are paths of the network, so ``plan``, ``inject`` and
``strip`` apply to the module inside; the wrapper itself is never changed. An ``OptimizedModule`` calls the
network's ``forward`` at run time, so an injected network inside one runs its DropBlocks (compile the model
after ``inject``, or call ``torch._dynamo.reset()``, so that dynamo traces the new code).
"""

from __future__ import annotations

from torch import nn


def _wrapper_types() -> tuple[type, ...]:
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


_EMA_NAMES = ("ModelEma", "ModelEmaV2", "ModelEmaV3")  # timm.utils.model_ema, without importing timm


def _is_timm_ema(m: nn.Module) -> bool:
    return type(m).__name__ in _EMA_NAMES and type(m).__module__.startswith("timm.")


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside any number of wrappers (DataParallel, DDP, compile, EMA / SWA copies).

    Args:
        model: a network, or a wrapper holding one.

    Returns:
        The innermost wrapped module; ``model`` itself when it is not a wrapper.
    """
    types = _wrapper_types()
    while True:
        if not (isinstance(model, types) or _is_timm_ema(model)):
            return model
        children = model.__dict__["_modules"]
        inner = children.get("_orig_mod", children.get("module"))
        if not isinstance(inner, nn.Module):
            return model
        model = inner
