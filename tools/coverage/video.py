"""Video ResNets (N, 3, T, H, W) through :func:`dropblock_inject.check`, every DropBlock a DropBlock3d."""

from __future__ import annotations

import gc
from typing import Any, Callable

import torch
from torch import nn

from .check import CoverageRow, _first_line


def _all_3d(model: nn.Module, report: Any) -> str:
    import dropblock_inject as dbi

    dbs = dbi.injected_dropblocks(model)
    if dbs and all(isinstance(db, dbi.DropBlock3d) for db in dbs):
        return ""
    return f"inserted modules are not all DropBlock3d: {sorted({type(db).__name__ for db in dbs})}"


def check_video_model(name: str, ctor: Callable[[], nn.Module], recipe: Any = "video_r3d",
                      shape: tuple[int, ...] = (2, 3, 8, 64, 64)) -> CoverageRow:
    """A video ResNet through ``dbi.check`` (no export), every inserted module a DropBlock3d; never raises.

    Args:
        name: the model's name in the report.
        ctor: builds the model.
        recipe: the recipe to check.
        shape: the example clip's shape, (N, 3, T, H, W).

    Returns:
        The report row.
    """
    import dropblock_inject as dbi

    row = CoverageRow(name, "video_resnet", library="torchvision")
    stage = "build"
    model = None
    try:
        torch.manual_seed(0)
        model = ctor().eval()
        stage = "check"
        report = dbi.check(model, recipe, example_input=torch.randn(*shape), export=False,
                           extra_checks=[("DropBlock3d", _all_3d)])
        row.inject_s = report.inject_seconds
        row.branch = sum(p.kind == "branch" for p in report.points)
        row.shortcut = len(report.points) - row.branch
        failed = report.failures
        row.status, row.reason = ("fail", f"{failed[0].name}: {failed[0].detail}") if failed else ("ok", "")
    except Exception as e:  # noqa: BLE001 - a sweep reports, it does not stop
        row.status, row.reason = "fail", f"{stage}: {_first_line(e)}"
    finally:
        del model
        gc.collect()
    return row
