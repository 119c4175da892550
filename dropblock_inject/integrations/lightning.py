"""Lightning callback that ramps DropBlock's keep_prob with the trainer's global step.

Usage::

    import lightning.pytorch as pl                     # or: import pytorch_lightning as pl
    import dropblock_inject as dbi
    from dropblock_inject.integrations.lightning import DropBlockScheduleCallback

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = dbi.inject(torchvision.models.resnet50(weights=...), "resnet50_paper")
        ...

    trainer = pl.Trainer(max_epochs=90, callbacks=[DropBlockScheduleCallback(strip_on_fit_end=True)])
    trainer.fit(Classifier(), datamodule)

The callback builds a :class:`~dropblock_inject.KeepProbScheduler` over the injected modules found anywhere in
the LightningModule when fitting starts (so injecting in ``__init__``, ``setup`` or ``configure_model`` all
work), sets keep_prob for ``trainer.global_step`` before every training batch, and is saved in and restored
from Lightning checkpoints. The class derives from ``lightning.pytorch.Callback`` and, when that package is
installed too, from ``pytorch_lightning.Callback``, so it works with either namespace's ``Trainer``.
"""

from __future__ import annotations

import math
from typing import Any

from .._args import check_bool, check_probability, check_total_steps
from ..surgery import strip
from ..schedule import KeepProbScheduler, _check_state

_INSTALL_HINT = ("dropblock_inject.integrations.lightning needs Lightning; install it with "
                 "`pip install dropblock_inject[lightning]` (or `pip install lightning`)")


def _callback_bases() -> tuple[type, ...]:
    bases: list[type] = []
    errors: list[str] = []
    try:
        from lightning.pytorch import Callback as LightningCallback
        bases.append(LightningCallback)
    except ImportError as e:
        errors.append(f"lightning.pytorch: {e}")
    try:  # the standalone namespace; cheap once lightning.pytorch is imported (shared dependencies)
        from pytorch_lightning import Callback as PLCallback
        bases.append(PLCallback)
    except ImportError as e:
        errors.append(f"pytorch_lightning: {e}")
    if not bases:
        raise ImportError(f"{_INSTALL_HINT} ({'; '.join(errors)})")
    return tuple(bases)


_Bases = _callback_bases()

__all__ = ["DropBlockScheduleCallback"]

_NAME = "DropBlockScheduleCallback"


class DropBlockScheduleCallback(*_Bases):  # type: ignore[misc]
    """Sets the keep_prob of every injected DropBlock for ``trainer.global_step`` before each training batch.

    Args:
        total_steps: length of the whole run in optimizer steps. ``None`` (the default) reads
            ``trainer.estimated_stepping_batches`` when fitting starts, which accounts for ``max_steps``,
            ``max_epochs``, gradient accumulation and the number of devices.
        target: final keep_prob for a DropBlock of drop-rate scale 1; ``None`` keeps the recipe's. Per-rule
            scales still apply (see :class:`~dropblock_inject.KeepProbScheduler`).
        strip_on_fit_end: call :func:`~dropblock_inject.strip` on the LightningModule when ``fit`` ends, so
            it is ready for export.

    Resuming: the callback's :meth:`state_dict` (``total_steps``, ``target``, last step) is stored in every
    Lightning checkpoint and restored by ``trainer.fit(..., ckpt_path=...)``; the stored ``total_steps`` then
    wins over a newly estimated one, as for learning-rate schedulers. Since keep_prob is a function of the
    global step, even a checkpoint without this state resumes at the right values.

    Raises:
        TypeError: ``total_steps`` not an int, ``target`` not a number, ``strip_on_fit_end`` not a bool.
        ValueError: ``total_steps`` or ``target`` out of range; at fit start, when the LightningModule holds
            no injected DropBlock, or when ``total_steps`` is ``None`` and the trainer cannot tell the number
            of steps (``max_steps=-1`` with an infinite ``max_epochs`` or an iterable dataset of unknown length).
    """

    def __init__(self, total_steps: int | None = None, target: float | None = None,
                 strip_on_fit_end: bool = False) -> None:
        total_steps = None if total_steps is None else check_total_steps(total_steps, f"{_NAME}: total_steps")
        target = check_probability(target, f"{_NAME}: target", optional=True)
        strip_on_fit_end = check_bool(strip_on_fit_end, f"{_NAME}: strip_on_fit_end")
        super().__init__()
        self.total_steps = total_steps
        self.target = target
        self.strip_on_fit_end = strip_on_fit_end
        self.scheduler: KeepProbScheduler | None = None
        self._pending_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------------------

    def _resolve_total_steps(self, trainer: Any) -> int:
        if self.total_steps is not None:
            return self.total_steps
        estimated = trainer.estimated_stepping_batches
        if not isinstance(estimated, int) and not (isinstance(estimated, float) and math.isfinite(estimated)):
            raise ValueError(
                f"DropBlockScheduleCallback cannot tell the length of training: "
                f"trainer.estimated_stepping_batches is {estimated!r}; set Trainer(max_steps=...) or pass "
                f"DropBlockScheduleCallback(total_steps=...)")
        return max(int(estimated), 1)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Build the scheduler over ``pl_module``'s DropBlocks (and restore a checkpointed state)."""
        self.scheduler = KeepProbScheduler(pl_module, self._resolve_total_steps(trainer), target=self.target)
        if self._pending_state is not None:
            self.scheduler.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Apply the global step, which Lightning restores from a checkpoint after ``on_fit_start``."""
        self._step(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Set keep_prob for the optimizer step this batch belongs to."""
        self._step(trainer, pl_module)

    def _step(self, trainer: Any, pl_module: Any) -> None:
        if self.scheduler is None:  # a loop entered without on_fit_start (should not happen)
            self.on_fit_start(trainer, pl_module)
        assert self.scheduler is not None
        self.scheduler.step(trainer.global_step)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Strip the DropBlocks when ``strip_on_fit_end`` is set."""
        if self.strip_on_fit_end:
            strip(pl_module)

    # ------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state (``total_steps``, ``target``, ``last_step``), saved in checkpoints."""
        if self.scheduler is not None:
            return self.scheduler.state_dict()
        if self._pending_state is not None:
            return dict(self._pending_state)
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`; applied now, or when fitting starts.

        Args:
            state_dict: what :meth:`state_dict` returned (``{}`` when it was saved before fitting started).

        Raises:
            TypeError, ValueError: ``state_dict`` is not such a state (checked now, not when fitting starts).
        """
        where = "DropBlockScheduleCallback.load_state_dict()"
        if isinstance(state_dict, dict) and not state_dict:
            return
        _check_state(state_dict, where)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)
