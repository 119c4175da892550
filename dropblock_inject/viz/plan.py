"""Where a recipe puts DropBlock: branch and shortcut points per stage."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from .. import InsertionPoint
from ._common import PathLike, figure_tools, save, stage


class StageCount(NamedTuple):
    """DropBlocks of one stage in a plan: on residual branches and on shortcuts."""

    stage: str
    branch: int
    shortcut: int


def plan_counts(points: Sequence[InsertionPoint], *, level: int | None = None) -> list[StageCount]:
    """DropBlocks per stage of a :func:`~dropblock_inject.plan`, branch and shortcut apart.

    Args:
        points: the insertion points.
        level: group module paths by their first ``level`` components; ``None`` groups the traced modules
            (residual blocks) by their parent (``layer3.0`` and ``layer3.1`` -> ``layer3``).

    Returns:
        One row per stage, in plan order.
    """
    counts: dict[str, list[int]] = {}
    for p in points:
        if p.kind not in ("branch", "shortcut"):
            raise ValueError(f"insertion point kind must be 'branch' or 'shortcut', got {p.kind!r}")
        row = counts.setdefault(stage(p.module, level), [0, 0])
        row[p.kind == "shortcut"] += 1
    return [StageCount(stage, branch, shortcut) for stage, (branch, shortcut) in counts.items()]


def plot_plan(path: PathLike, points: Sequence[InsertionPoint], *, level: int | None = None,
              title: str | None = None, dpi: int = 100) -> Path:
    """A stacked bar chart of DropBlocks per stage (branch and shortcut), saved as an image file.

    Each bar is annotated with its total and the block sizes and final keep_probs of its points.

    Args:
        path: where to write the figure; the format follows the suffix (``.png``).
        points: the insertion points of :func:`~dropblock_inject.plan`.
        level: how to group module paths into stages; see :func:`plan_counts`.
        title: the figure's title; a default one gives the totals.
        dpi: resolution of the saved figure.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``points`` is empty.
        ImportError: matplotlib is not installed.
    """
    figure_type, canvas_type = figure_tools()
    if not points:
        raise ValueError("plot_plan needs at least one insertion point; plan() returned none")
    rows = plan_counts(points, level=level)
    settings: dict[str, tuple[set[int], set[float]]] = {}
    for p in points:
        sizes, keeps = settings.setdefault(stage(p.module, level), (set(), set()))
        sizes.add(p.block_size)
        keeps.add(round(p.keep_prob, 6))
    fig = figure_type(figsize=(max(4.8, 1.3 * len(rows) + 2.0), 3.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(rows))
    branch = np.array([r.branch for r in rows])
    shortcut = np.array([r.shortcut for r in rows])
    ax.bar(x, branch, label="residual branch", color="tab:blue")
    ax.bar(x, shortcut, bottom=branch, label="shortcut", color="tab:orange")
    for i, row in enumerate(rows):
        sizes, keeps = settings[row.stage]
        note = (f"{row.branch + row.shortcut}\nblock {'/'.join(map(str, sorted(sizes)))}\n"
                f"keep {'/'.join(f'{k:g}' for k in sorted(keeps))}")
        ax.annotate(note, (i, row.branch + row.shortcut), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [r.stage for r in rows], rotation=30 if len(rows) > 4 else 0, ha="right" if len(rows) > 4
                  else "center", fontsize=8)
    ax.set_ylabel("DropBlocks")
    ax.set_ylim(0, max(branch + shortcut) * 1.45)
    ax.legend(fontsize=8, loc="upper left")
    n_branch = int(branch.sum())
    ax.set_title(title or f"{len(points)} DropBlocks: {n_branch} branch, {len(points) - n_branch} shortcut",
                 fontsize=10)
    return save(fig, canvas_type, path, dpi)

