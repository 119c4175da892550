"""Pictures: DropBlock masks over a photo, the keep_prob schedule, and where a recipe puts DropBlock.

Needs the optional ``viz`` extra (matplotlib, and scikit-image for the default photo)::

    pip install "dropblock_inject[viz]"

    from dropblock_inject import viz
    viz.plot_masks("masks.png")                                   # block size x keep_prob grid on a photo
    viz.plot_schedule("schedule.png", KeepProbScheduler(model, total_steps=10_000))
    viz.plot_plan("plan.png", dropblock_inject.plan(model, "resnet50_paper"))

or, from the command line, ``python -m dropblock_inject viz --out DIR``.

Each ``plot_*`` function draws what a small helper computes (:func:`mask_panels`, :func:`schedule_curves`,
:func:`plan_counts`), so the numbers in a picture can be checked without looking at it. Figures are drawn on
a :class:`matplotlib.figure.Figure` with the Agg canvas: no pyplot, no global state, no display needed.
"""

from .masks import MaskPanel, expected_drop_fraction, mask_panels, plot_masks
from .plan import StageCount, plan_counts, plot_plan
from .schedule import ScheduleCurve, plot_schedule, schedule_curves

__all__ = [
    "MaskPanel",
    "ScheduleCurve",
    "StageCount",
    "expected_drop_fraction",
    "mask_panels",
    "plan_counts",
    "plot_masks",
    "plot_plan",
    "plot_schedule",
    "schedule_curves",
]
