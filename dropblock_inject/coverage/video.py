"""Video ResNets (N, 3, T, H, W) through inject, eval, train and strip, with DropBlock3d."""

from __future__ import annotations

import copy
import gc
import time
from typing import Any, Callable

import torch
from torch import nn

from .check import CoverageRow, _CheckFailed, _first_line


def check_video_model(name: str, ctor: Callable[[], nn.Module], recipe: Any = "video_r3d",
                      shape: tuple[int, ...] = (1, 3, 8, 64, 64)) -> CoverageRow:
    """Video ResNets (N, 3, T, H, W): inject, every inserted module a DropBlock3d, eval output identical,
    a finite train step at keep_prob 0.8, strip restores module types; never raises."""
    import dropblock_inject as dbi

    from ..ops import DropBlock3d

    row = CoverageRow(name, "video_resnet", library="torchvision")
    stage = "build"
    model = None
    try:
        torch.manual_seed(0)
        model = ctor().eval()
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = model(x)
        types_before = [type(m) for m in copy.deepcopy(model).modules()]
        stage = "inject"
        t0 = time.perf_counter()
        dbi.inject(model, recipe)
        row.inject_s = time.perf_counter() - t0
        dbs = dbi.injected_dropblocks(model)
        row.branch = sum(db.point.kind == "branch" for db in dbs)
        row.shortcut = len(dbs) - row.branch
        if not dbs or not all(isinstance(db, DropBlock3d) for db in dbs):
            raise _CheckFailed(f"inserted modules are not all DropBlock3d: {sorted({type(d).__name__ for d in dbs})}")
        stage = "eval parity"
        with torch.no_grad():
            if not torch.equal(model(x), ref):
                raise _CheckFailed("eval output after inject differs from the original")
        stage = "train forward/backward"
        for db in dbs:
            db.keep_prob = 0.8
        model.train()
        out = model(torch.randn(2, *shape[1:]))
        out.mean().backward()
        if not torch.isfinite(out).all():
            raise _CheckFailed("train output is not finite")
        stage = "strip"
        dbi.strip(model)
        if dbi.injected_dropblocks(model) or [type(m) for m in model.modules()] != types_before:
            raise _CheckFailed("strip did not restore the module types")
        row.status, row.reason = "ok", ""
    except _CheckFailed as e:
        row.status, row.reason = "fail", f"{stage}: {e}"
    except Exception as e:  # noqa: BLE001
        row.status, row.reason = "fail", f"{stage}: {_first_line(e)}"
    finally:
        del model
        gc.collect()
    return row
