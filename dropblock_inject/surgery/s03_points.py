"""What a plan decides and what inject inserts: :class:`InsertionPoint` (one DropBlock's place and settings) and
the DropBlock modules inject inserts, which carry their point and schedule as fields of their own class.

An inserted DropBlock is an :class:`InjectedDropBlock2d` (or ``3d``): a :class:`~dropblock_inject.DropBlock2d`
that knows where it was put. ``strip``, the scheduler and :func:`injected_dropblocks` recognise inserted
DropBlocks by this class, never by an attribute name a user's module could also have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..errors import SurgeryError
from ..ops import DropBlock2d, DropBlock3d
from ..recipe import ScheduleConfig


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


class InjectedDropBlock:
    """What every DropBlock that inject inserted is, besides a DropBlock: its ``point`` (the
    :class:`InsertionPoint`, rule name included) and the recipe's ``schedule``."""

    point: InsertionPoint
    schedule: ScheduleConfig

    @property
    def rule(self) -> str:
        """The name of the recipe rule that selected this DropBlock's point."""
        return self.point.rule


class InjectedDropBlock2d(DropBlock2d, InjectedDropBlock):
    """A :class:`~dropblock_inject.DropBlock2d` inserted by inject at ``point``, ramped by ``schedule``."""

    def __init__(self, point: InsertionPoint, schedule: ScheduleConfig) -> None:
        super().__init__(point.block_size, point.keep_prob, per_channel=point.per_channel)
        self.point = point
        self.schedule = schedule


class InjectedDropBlock3d(DropBlock3d, InjectedDropBlock):
    """A :class:`~dropblock_inject.DropBlock3d` inserted by inject at ``point``, ramped by ``schedule``."""

    def __init__(self, point: InsertionPoint, schedule: ScheduleConfig) -> None:
        super().__init__(point.block_size, point.keep_prob, per_channel=point.per_channel)
        self.point = point
        self.schedule = schedule


def new_dropblock(point: InsertionPoint, schedule: ScheduleConfig, spatial_dims: int) -> InjectedDropBlock:
    """The DropBlock inject inserts at ``point`` (its tensor made outside any ``inference_mode``, so that the
    scheduler can set it later)."""
    cls = InjectedDropBlock3d if spatial_dims == 3 else InjectedDropBlock2d
    with torch.inference_mode(False):
        return cls(point, schedule)


def is_dropblock_container(m: nn.Module) -> bool:
    """Whether ``m`` is a container inject made: a non-empty ``ModuleDict`` of inserted DropBlocks only."""
    return isinstance(m, nn.ModuleDict) and bool(m) and all(isinstance(c, InjectedDropBlock) for c in m.values())


def injected_dropblocks(model: nn.Module) -> list[InjectedDropBlock]:
    """The DropBlock modules that ``inject`` inserted into ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, InjectedDropBlock)]


def check_not_injected(model: nn.Module) -> None:
    """Raises :class:`SurgeryError` if ``model`` holds DropBlocks that ``inject`` inserted (install is atomic:
    a model holds some exactly when it is injected)."""
    for name, m in model.named_modules():
        if isinstance(m, InjectedDropBlock):
            raise SurgeryError(f"the model is already injected (it holds the DropBlock {name!r} that inject "
                               f"inserted); call dropblock_inject.strip(model) first")


def format_plan(points: Sequence[InsertionPoint]) -> str:
    """A plain-text table of insertion points with totals.

    Args:
        points: the plan's points (``plan(model, recipe)``).

    Returns:
        The table, one row per point, and a line of totals.
    """
    header = ("module", "after", "kind", "block", "keep_prob", "shape", "rule")
    rows = [(p.module, p.after, p.kind, str(p.block_size), f"{p.keep_prob:.4g}",
             "x".join(map(str, p.shape)) if p.shape else "-", p.rule) for p in points]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    branch = sum(p.kind == "branch" for p in points)
    modules = len({p.module for p in points})
    lines.append(f"{len(points)} DropBlock{'' if len(points) == 1 else 's'}: {branch} branch, {len(points) - branch} shortcut, "
                 f"in {modules} module{'' if modules == 1 else 's'}")
    return "\n".join(lines)
