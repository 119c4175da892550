"""Hugging Face ``transformers.Trainer`` callback that ramps DropBlock's keep_prob with the global step.

Usage::

    import dropblock_inject as dbi
    from dropblock_inject.integrations.transformers import DropBlockScheduleCallback

    model = ...                                   # a model whose CNN was injected: dbi.inject(cnn, "resnet50_paper")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds,
                                   callbacks=[DropBlockScheduleCallback(strip_on_train_end=True)])
    trainer.train()                               # or trainer.train(resume_from_checkpoint=True)

The callback builds a :class:`~dropblock_inject.KeepProbScheduler` over the injected DropBlocks found in the
Trainer's model when training begins, with ``state.max_steps`` as the length of the run unless
``total_steps`` is given, and sets keep_prob for ``state.global_step`` at the beginning of every optimizer
step. Resuming needs nothing more: the Trainer restores ``state.global_step`` and the schedule is a function
of it. With ``TrainingArguments(restore_callback_states_from_checkpoint=True)`` the callback is also rebuilt
from the checkpoint with the run length it had (see :meth:`DropBlockScheduleCallback.state`).
"""

from __future__ import annotations

from typing import Any

from .._args import check_bool, check_probability, check_total_steps
from ..surgery import strip
from ..schedule import KeepProbScheduler

try:
    from transformers.trainer_callback import ExportableState, TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("dropblock_inject.integrations.transformers needs Hugging Face transformers; install it "
                      "with `pip install dropblock_inject[transformers]` (or `pip install transformers "
                      f"accelerate`) ({e})") from e

__all__ = ["DropBlockScheduleCallback"]

_NAME = "DropBlockScheduleCallback"


class DropBlockScheduleCallback(TrainerCallback, ExportableState):
    """Sets the keep_prob of every injected DropBlock for ``state.global_step`` before each optimizer step.

    Args:
        total_steps: length of the whole run in optimizer steps; ``None`` (the default) uses the Trainer's
            ``state.max_steps`` (from ``max_steps`` or ``num_train_epochs``, with gradient accumulation).
        target: final keep_prob for a DropBlock of drop-rate scale 1; ``None`` keeps the recipe's. Per-rule
            scales still apply (see :class:`~dropblock_inject.KeepProbScheduler`).
        strip_on_train_end: call :func:`~dropblock_inject.strip` on the model when training ends, so it is
            ready for export.

    Raises:
        TypeError: ``total_steps`` not an int, ``target`` not a number, ``strip_on_train_end`` not a bool.
        ValueError: ``total_steps`` or ``target`` out of range; when training begins, if the model holds no
            injected DropBlock, or if the run length is unknown (``state.max_steps <= 0``) and ``total_steps``
            is not given.
    """

    def __init__(self, total_steps: int | None = None, target: float | None = None,
                 strip_on_train_end: bool = False) -> None:
        self.total_steps = None if total_steps is None else check_total_steps(total_steps, f"{_NAME}: total_steps")
        self.target = check_probability(target, f"{_NAME}: target", optional=True)
        self.strip_on_train_end = check_bool(strip_on_train_end, f"{_NAME}: strip_on_train_end")
        self.scheduler: KeepProbScheduler | None = None

    def _resolved_total_steps(self, state: Any) -> int:
        if self.total_steps is not None:
            return self.total_steps
        max_steps = getattr(state, "max_steps", 0) or 0
        if max_steps <= 0:
            raise ValueError(f"DropBlockScheduleCallback cannot tell the length of training: state.max_steps "
                             f"is {max_steps!r}; set TrainingArguments(max_steps=...) or pass "
                             f"DropBlockScheduleCallback(total_steps=...)")
        return int(max_steps)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Build the scheduler over the model's DropBlocks and apply the (possibly resumed) global step."""
        if model is None:
            raise ValueError("DropBlockScheduleCallback needs the Trainer's model, but the callback got none")
        self.scheduler = KeepProbScheduler(model, self._resolved_total_steps(state), target=self.target)
        self.scheduler.step(state.global_step)

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Set keep_prob for the optimizer step about to run."""
        if self.scheduler is None:
            self.on_train_begin(args, state, control, model=model, **kwargs)
        assert self.scheduler is not None
        self.scheduler.step(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Strip the DropBlocks when ``strip_on_train_end`` is set."""
        if self.strip_on_train_end and model is not None:
            strip(model)

    def state(self) -> dict[str, Any]:
        """What the Trainer stores in a checkpoint's ``trainer_state.json`` to rebuild this callback.

        Returns:
            ``{"args": {...}, "attributes": {}}``: the constructor arguments, with ``total_steps`` resolved
            once training has begun, so a resumed run keeps the original ramp length (as the learning-rate
            scheduler does). The global step itself is restored by the Trainer.
        """
        total_steps = self.scheduler.total_steps if self.scheduler is not None else self.total_steps
        return {"args": {"total_steps": total_steps, "target": self.target,
                         "strip_on_train_end": self.strip_on_train_end},
                "attributes": {}}
