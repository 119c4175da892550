"""keep_prob over the global step, one line per distinct ramp."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import KeepProbScheduler
from ._common import PathLike, figure_tools, save, stage


@dataclass(frozen=True)
class ScheduleCurve:
    """keep_prob over the global step shared by a group of DropBlocks.

    Attributes:
        label: the stages (and recipe rules) of the group, e.g. ``"layer3 (group3)"``.
        count: how many DropBlocks follow this curve.
        steps: global steps, increasing, from 0 to ``total_steps``.
        keep_probs: keep_prob at each step.
    """

    label: str
    count: int
    steps: tuple[int, ...]
    keep_probs: tuple[float, ...]


def schedule_curves(scheduler: KeepProbScheduler, *, num_points: int = 201) -> list[ScheduleCurve]:
    """The distinct keep_prob ramps of a scheduler (e.g. layer3 and layer4 targets), without changing the model.

    Args:
        scheduler: a :class:`~dropblock_inject.KeepProbScheduler`.
        num_points: how many steps to sample between 0 and ``scheduler.total_steps`` (fewer when there are
            fewer steps).

    Returns:
        One curve per distinct ramp, in the order of its first DropBlock.
    """
    if not isinstance(scheduler, KeepProbScheduler):
        raise TypeError(f"scheduler must be a KeepProbScheduler, got {type(scheduler).__name__}")
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    steps = tuple(sorted({int(round(float(s))) for s in np.linspace(0, scheduler.total_steps, num_points)}))
    per_step = [scheduler.keep_probs_at(s) for s in steps]  # [step][dropblock]
    groups: dict[tuple[float, ...], list[Any]] = {}
    for i, db in enumerate(scheduler.dropblocks):
        groups.setdefault(tuple(values[i] for values in per_step), []).append(db)
    curves = []
    for values, members in groups.items():
        stages = list(dict.fromkeys(stage(db.point.module) for db in members))
        rules = [r for r in dict.fromkeys(db.point.rule for db in members) if r]
        label = ", ".join(stages) + (f" ({', '.join(rules)})" if rules else "")
        curves.append(ScheduleCurve(label=label, count=len(members), steps=steps, keep_probs=values))
    return curves


def plot_schedule(path: PathLike, scheduler: KeepProbScheduler, *, num_points: int = 201, title: str | None = None,
                  dpi: int = 100) -> Path:
    """keep_prob over the global step for each distinct ramp of ``scheduler``, saved as an image file.

    Args:
        path: where to write the figure; the format follows the suffix (``.png``).
        scheduler: a :class:`~dropblock_inject.KeepProbScheduler`; it is only read.
        num_points: steps sampled per curve.
        title: the figure's title; a default one names the number of DropBlocks and steps.
        dpi: resolution of the saved figure.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.

    Raises:
        ImportError: matplotlib is not installed.
    """
    figure_type, canvas_type = figure_tools()
    curves = schedule_curves(scheduler, num_points=num_points)
    fig = figure_type(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.subplots()
    for curve in curves:
        ax.plot(curve.steps, curve.keep_probs, linewidth=2,
                label=f"{curve.label}: {curve.count} DropBlocks, ends at {curve.keep_probs[-1]:.4g}")
    ax.set_xlabel("global step")
    ax.set_ylabel("keep_prob")
    ax.set_xlim(0, scheduler.total_steps)
    low = min(min(c.keep_probs) for c in curves)
    ax.set_ylim(max(0.0, low - 0.1 * (1.0 - low) - 0.005), 1.005)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title or f"Linear keep_prob schedule: {len(scheduler.dropblocks)} DropBlocks, "
                          f"{scheduler.total_steps} steps", fontsize=10)
    return save(fig, canvas_type, path, dpi)
