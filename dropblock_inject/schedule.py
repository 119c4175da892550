"""Linear keep_prob schedule over the global step, for every DropBlock that :func:`inject` inserted.

As in the authors' code (tensorflow/tpu ``resnet_main.py``), keep_prob falls linearly from its start value to
its target as training advances, and stays at the target once the ramp is over (the reference keeps going;
this clamps). Every DropBlock ramps to its own target: a point whose rule has ``drop_rate_scale`` ``s`` drops
``s`` times the recipe's rate all along the ramp, so in ``resnet50_paper`` layer3 (``s = 0.25``) ends at
``1 - 0.1 / 4 = 0.975`` while layer4 ends at 0.9. For a DropBlock with scale ``s``::

    start  = 1 - (1 - schedule.start_keep_prob) * s
    target = point.keep_prob                      # or 1 - (1 - target) * s when a target is given
    keep_prob(step) = start - min(step / (schedule.ramp_fraction * total_steps), 1) * (start - target)

The schedule is a pure function of the global step: ``step(global_step)`` can be called any number of times,
in any order, and every rank of a distributed job computes the same values without communicating.

Two ways to drive it, as torch's learning-rate schedulers allow:

* ``sched.step(global_step)`` before each forward pass: idempotent, sets the values of that step;
* ``sched.step()`` with no argument after each ``optimizer.step()``: counts steps itself, like
  ``torch.optim.lr_scheduler.LRScheduler.step()``. Building the scheduler applies step 0 (torch's
  constructor likewise takes its initial step, ``last_epoch`` -1 -> 0), so the first training step runs at
  step 0 and the first ``step()`` call moves to step 1.

Mixing them is defined: ``step()`` moves to ``last_step + 1``, where ``last_step`` is the step applied last,
by either form (after ``step(10)``, ``step()`` applies 11). :meth:`KeepProbScheduler.state_dict` stores
``last_step``, so both styles resume where they stopped.

The ramp ends at ``ramp_fraction * total_steps``, as in the authors' code (``current_step / total_steps``)
and torch's ``CosineAnnealingLR`` (``eta_min`` at ``last_epoch == T_max``): in a run of ``total_steps``
steps, numbered 0 to ``total_steps - 1``, the last step runs at ``1 / total_steps`` of the ramp before its
end (keep_prob 0.9033 instead of 0.9 for 30 steps to 0.9), and the target holds from step ``total_steps``.
Pass ``total_steps - 1`` (when above 1) to reach the target on the last step itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ._args import check_model, check_probability, check_step, check_total_steps, quote
from .surgery import injected_dropblocks
from .surgery.s03_points import InjectedDropBlock
from .recipe import ScheduleConfig

__all__ = ["KeepProbScheduler"]

_STATE_VERSION = 1


def _check_total_steps(total_steps: object) -> int:
    return check_total_steps(total_steps, "total_steps")


def _check_step(step: object) -> int:
    return check_step(step, "global_step")


def _check_target(target: object) -> float | None:
    return check_probability(target, "target", optional=True)


_STATE_KEYS = ("total_steps", "target", "last_step")


def _check_state(state_dict: object, where: str) -> tuple[int, float | None, int]:
    """``total_steps``, ``target`` and ``last_step`` of a :meth:`KeepProbScheduler.state_dict`, checked.

    Args:
        state_dict: the value given to ``load_state_dict``.
        where: the method, for messages.

    Returns:
        The three values, valid for the constructor.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{where}: state_dict must be the dict that KeepProbScheduler.state_dict() returns, but "
                        f"got {quote(state_dict)} ({type(state_dict).__name__})")
    missing = [k for k in _STATE_KEYS if k not in state_dict]
    unknown = [k for k in state_dict if k not in (*_STATE_KEYS, "version")]
    if missing or unknown:
        what = "; ".join(part for part in (f"missing {missing}" if missing else "",
                                            f"unknown keys {quote(unknown)}" if unknown else "") if part)
        raise ValueError(f"{where}: state_dict is not a KeepProbScheduler state ({what}); expected the keys "
                         f"{', '.join(_STATE_KEYS)} and version")
    version = state_dict.get("version", _STATE_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version != _STATE_VERSION:
        raise ValueError(f"{where}: state_dict has version {quote(version)}; this dropblock_inject reads version "
                         f"{_STATE_VERSION}")
    return (check_total_steps(state_dict["total_steps"], "state_dict['total_steps']"),
            check_probability(state_dict["target"], "state_dict['target']", optional=True),
            check_step(state_dict["last_step"], "state_dict['last_step']"))


def _clamp(value: float) -> float:
    return min(max(value, 0.0), 1.0)


class KeepProbScheduler:
    """Ramps the keep_prob of every injected DropBlock linearly with the global step.

    Building the scheduler applies step 0, so the model starts at the schedule's start values (``inject``
    leaves each DropBlock at its final keep_prob). Then call :meth:`step` with the global step before each
    forward pass, or with no argument after each optimizer step (see the module docstring); it is idempotent and costs one float per DropBlock (a DropBlock whose value does not change
    is not touched, and none allocates: the values go into each module's existing ``keep_prob_tensor``).

    Example::

        model = dropblock_inject.inject(torchvision.models.resnet50(), "resnet50_paper")
        sched = dropblock_inject.KeepProbScheduler(model, total_steps=len(loader) * epochs)
        for step, (x, y) in enumerate(loader):
            sched.step(step)
            ...

    Args:
        model: a model that :func:`~dropblock_inject.inject` rewrote (or a wrapper of it: DDP, a
            LightningModule, ...). The DropBlocks are collected once, here.
        total_steps: number of optimizer steps of the whole training run; the ramp ends after
            ``schedule.ramp_fraction * total_steps`` of them.
        target: the final keep_prob for a DropBlock of drop-rate scale 1; ``None`` keeps the recipe's. The
            per-rule scales still apply: a point of scale ``s`` ends at ``1 - (1 - target) * s``.

    Raises:
        TypeError: ``total_steps`` is not an int, ``target`` not a number, or ``model`` not a Module.
        ValueError: ``total_steps`` not in [1, 2**63 - 1], ``target`` outside [0, 1] (a number too large for a
            float included), or no injected DropBlock in ``model``.

    Values are clamped to [0, 1] (which only matters for drop-rate scales above 1).
    """

    def __init__(self, model: nn.Module, total_steps: int, *, target: float | None = None) -> None:
        check_model(model, "KeepProbScheduler")
        total_steps = _check_total_steps(total_steps)
        target = _check_target(target)
        self._dropblocks: tuple[InjectedDropBlock, ...] = tuple(injected_dropblocks(model))
        if not self._dropblocks:
            raise ValueError(f"{type(model).__name__} has no DropBlock inserted by dropblock_inject; call "
                             f"dropblock_inject.inject(model, recipe) first (or the model was stripped)")
        self.total_steps = total_steps
        self.target = target
        self.last_step: int = 0
        self._precompute()
        self.step(0)

    # ------------------------------------------------------------------------------------------------------

    def _precompute(self) -> None:
        """Per-DropBlock floats: ramp length in steps, start value, distance to the target, target."""
        ramps, starts, deltas, targets = [], [], [], []
        for db in self._dropblocks:
            point = db.point
            sched: ScheduleConfig = db.schedule
            scale = float(point.drop_rate_scale)
            start = _clamp(1.0 - (1.0 - sched.start_keep_prob) * scale)
            if self.target is None:
                target = float(point.keep_prob)
            else:
                target = _clamp(1.0 - (1.0 - self.target) * scale)
            ramps.append(sched.ramp_fraction * self.total_steps)
            starts.append(start)
            deltas.append(start - target)
            targets.append(target)
        self._ramps = tuple(ramps)
        self._starts = tuple(starts)
        self._deltas = tuple(deltas)
        self._targets = tuple(targets)

        # the headline: a DropBlock of drop-rate scale 1 under the first DropBlock's schedule
        first = self._dropblocks[0]
        sched = first.schedule
        self._headline_ramp = sched.ramp_fraction * self.total_steps
        self._headline_start = float(sched.start_keep_prob)
        self._headline_target = self.target if self.target is not None else self._recipe_target()

    def _recipe_target(self) -> float:
        """The recipe's keep_prob (drop-rate scale 1), recovered from the DropBlocks' points."""
        points = [db.point for db in self._dropblocks]
        for p in points:
            if p.drop_rate_scale == 1.0:
                return float(p.keep_prob)
        for p in points:
            if p.drop_rate_scale > 0:
                return _clamp(1.0 - (1.0 - p.keep_prob) / p.drop_rate_scale)
        return 1.0

    @staticmethod
    def _value(step: int, ramp: float, start: float, delta: float, target: float) -> float:
        if ramp <= 0 or step >= ramp:
            return target  # exactly the target once the ramp is over
        return start - (step / ramp) * delta

    # ------------------------------------------------------------------------------------------------------

    @property
    def dropblocks(self) -> tuple[InjectedDropBlock, ...]:
        """The DropBlock modules this scheduler drives, in module order."""
        return self._dropblocks

    @property
    def keep_prob(self) -> float:
        """The current keep_prob of a DropBlock of drop-rate scale 1 (the recipe's headline value)."""
        return self.keep_prob_at(self.last_step)

    def keep_prob_at(self, global_step: int) -> float:
        """The headline keep_prob (drop-rate scale 1) at ``global_step``, without changing any module.

        Args:
            global_step: a step >= 0.

        Returns:
            The keep_prob a DropBlock of drop-rate scale 1 has at that step.
        """
        step = _check_step(global_step)
        start = self._headline_start
        return _clamp(self._value(step, self._headline_ramp, start, start - self._headline_target,
                                  self._headline_target))

    def keep_probs_at(self, global_step: int) -> list[float]:
        """Every DropBlock's keep_prob at ``global_step`` (in :attr:`dropblocks` order), changing nothing.

        Args:
            global_step: a step >= 0.

        Returns:
            One float per DropBlock.
        """
        step = _check_step(global_step)
        value = self._value
        return [value(step, r, s, d, t)
                for r, s, d, t in zip(self._ramps, self._starts, self._deltas, self._targets)]

    def step(self, global_step: int | None = None) -> float:
        """Set every DropBlock's keep_prob for ``global_step``, or for the next step when it is omitted.

        With ``global_step``, idempotent (the values are a function of the step only), so it is safe to
        call it again for the same step, after a resume, or on every rank of a distributed job. Without it,
        the scheduler counts like torch's LR schedulers: it applies ``last_step + 1`` (the constructor
        applied step 0, so the first call applies step 1); call it once after each ``optimizer.step()``.

        Args:
            global_step: the number of optimizer steps taken so far (>= 0); steps past the end of the ramp
                keep the final values. ``None``: :attr:`last_step` + 1.

        Returns:
            The headline keep_prob (drop-rate scale 1) now in effect, as :attr:`keep_prob`.

        Raises:
            TypeError: ``global_step`` is not an int.
            ValueError: ``global_step`` is negative.
        """
        step = self.last_step + 1 if global_step is None else _check_step(global_step)
        value = self._value
        for db, r, s, d, t in zip(self._dropblocks, self._ramps, self._starts, self._deltas, self._targets):
            v = value(step, r, s, d, t)
            if db._keep_prob != v:  # noqa: SLF001 - skip the buffer fill (a kernel launch on GPU) if unchanged
                db.keep_prob = v
        self.last_step = step
        return self.keep_prob

    # ------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state: ``total_steps``, ``target`` and ``last_step`` (plain Python values).

        Returns:
            A dict that :meth:`load_state_dict` accepts, safe for ``torch.save`` with ``weights_only=True``.
        """
        return {"version": _STATE_VERSION, "total_steps": self.total_steps, "target": self.target,
                "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` and re-apply its values to the DropBlocks.

        Args:
            state_dict: the dict returned by :meth:`state_dict` (possibly of another scheduler over a copy of
                the same model, e.g. before a restart).

        Raises:
            TypeError: ``state_dict`` is not a mapping, or a stored value has the wrong type.
            ValueError: a key is missing or unknown, the version is not this one's, or a stored value is out
                of range (as for the constructor). Nothing changes on an error.
        """
        total_steps, target, last_step = _check_state(state_dict, "KeepProbScheduler.load_state_dict()")
        self.total_steps = total_steps
        self.target = target
        self._precompute()
        self.step(last_step)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(dropblocks={len(self._dropblocks)}, total_steps={self.total_steps}, "
                f"target={self.target}, last_step={self.last_step}, keep_prob={self.keep_prob:.6g})")
