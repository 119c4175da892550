"""Ultralytics YOLO: DropBlock in the model that ``YOLO.train`` trains, ramped by the trainer's iteration.

Usage::

    from ultralytics import YOLO
    from dropblock_inject.integrations.ultralytics import add_dropblock

    yolo = YOLO("yolov8n.pt")                            # or a YAML, or last.pt to resume
    add_dropblock(yolo, recipe="paper_generic")          # registers callbacks; changes nothing yet
    yolo.train(data="coco8.yaml", epochs=100)            # or .train(resume=True)
    yolo.export(format="onnx")                           # yolo.model is best.pt: no DropBlock in it

``YOLO.train`` does not train ``yolo.model``: its trainer builds a new model from the YAML (loading the
weights of ``yolo.model`` or of a checkpoint into it), wraps it (``torch.compile``, DDP), keeps an EMA deep copy
for validation and checkpoints, and after training ``yolo.model`` becomes the model loaded from ``best.pt``.
So :func:`add_dropblock` injects nothing itself; it registers callbacks that act on the trainer's model:

* ``on_pretrain_routine_end`` (the model is built, wrapped, its EMA copy and optimizer made, a resumed
  checkpoint loaded): :func:`~dropblock_inject.inject` into the trainer's model, with an example input of the
  training image size, and build a :class:`~dropblock_inject.KeepProbScheduler` over
  ``epochs * len(train_loader)`` iterations.
* ``on_train_epoch_start`` / ``on_train_batch_start`` / ``on_train_batch_end``: set keep_prob for the global
  iteration ``epoch * nb + i``, the trainer's own ``ni``. It is recomputed from the epoch, so a run resumed with
  ``resume=True`` continues the ramp where it stopped; an epoch restarted by the trainer (out-of-memory batch
  halving, NaN recovery) restarts its count, and a run length changed by ``time=`` or a new batch size resizes
  the ramp.
* The EMA copy never carries DropBlocks. The trainer copies its model into the EMA before the injection, and
  the EMA update pairs tensors by ``state_dict`` key, which injection does not change. The EMA is what the
  trainer validates and what it pickles into ``last.pt`` / ``best.pt``, so checkpoints hold plain Ultralytics
  modules, load without dropblock_inject, and resume. Should the trainer rebuild its EMA from the injected
  model (its NaN recovery does), ``on_train_epoch_end`` strips that copy before the epoch's checkpoint.
* ``on_train_end`` and ``teardown`` (also after a failed run): :func:`~dropblock_inject.strip` the trainer's
  model, so ``yolo.trainer.model`` exports too, and a run that raised leaves no DropBlock in ``yolo.model``.

Multi-GPU training (``device="0,1"``) runs in subprocesses that Ultralytics launches with
``torch.distributed.run``; in Ultralytics 8.4 the parent pickles the trainer's callbacks with cloudpickle into the launch state, and
every worker runs them, so each rank injects its own model and computes the same keep_prob from the iteration.
See ``docs/ultralytics.md`` for what is and is not covered.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..recipe import Recipe, load_recipe
from ..schedule import KeepProbScheduler, _check_target, _check_total_steps
from ..surgery import inject, injected_dropblocks, strip
from ..ops._modules import _DropBlockNd

try:
    from ultralytics.engine.model import Model
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.utils import LOGGER
    from ultralytics.utils.torch_utils import unwrap_model
except ImportError as e:
    raise ImportError("dropblock_inject.integrations.ultralytics needs Ultralytics; install it with "
                      f"`pip install dropblock_inject[ultralytics]` (or `pip install ultralytics`) ({e})") from e

__all__ = ["DropBlockCallbacks", "add_dropblock"]

_TRAIN_EVENTS = ("on_pretrain_routine_end", "on_train_epoch_start", "on_train_batch_start", "on_train_batch_end",
                 "on_train_epoch_end", "on_train_end", "teardown")


def _network(model: nn.Module) -> nn.Module:
    """The trainable network inside the trainer's model: no compile/DDP wrapper, the student when distilling."""
    net = unwrap_model(model)
    student = getattr(net, "student_model", None)  # DistillationModel: the frozen teacher gets no DropBlock
    return student if isinstance(student, nn.Module) else net


class DropBlockCallbacks:
    """The Ultralytics callbacks that :func:`add_dropblock` registers; one method per trainer event.

    Args:
        recipe: a recipe name, path, dict or :class:`~dropblock_inject.Recipe`.
        target: final keep_prob for a DropBlock of drop-rate scale 1; ``None`` keeps the recipe's.
        total_steps: length of the ramp's run in iterations (batches); ``None`` uses
            ``trainer.epochs * len(trainer.train_loader)``, re-read at every epoch start.
        imgsz: side of the square example input that shape-based recipes need; ``None`` uses the trainer's
            ``imgsz``. It decides placement (a map of 1x1 gets no DropBlock), so keep it the training size.
        strip_on_train_end: strip the trainer's model when training ends.

    Attributes:
        scheduler: the :class:`~dropblock_inject.KeepProbScheduler` of the current (or last) run, or ``None``
            before one starts.
        step: the global iteration whose keep_prob was applied last (-1 before the first batch).
    """

    def __init__(self, recipe: str | dict | Recipe = "paper_generic", *, target: float | None = None,
                 total_steps: int | None = None, imgsz: int | None = None,
                 strip_on_train_end: bool = True) -> None:
        self.recipe = load_recipe(recipe)
        self.target = _check_target(target)
        self.total_steps = None if total_steps is None else _check_total_steps(total_steps)
        if imgsz is not None and (isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz <= 0):
            raise ValueError(f"imgsz must be a positive int or None, but got {imgsz!r}")
        self.imgsz = imgsz
        self.strip_on_train_end = bool(strip_on_train_end)
        self._reset()

    def _reset(self) -> None:
        self.scheduler: KeepProbScheduler | None = None
        self.step = -1
        self._batches = 0  # batches per epoch of the current epoch
        self._batch = 0  # index of the next batch in the current epoch

    def __getstate__(self) -> dict[str, Any]:
        # the DDP launch pickles the callbacks: send the configuration, never a model or scheduler of a past run
        state = dict(self.__dict__)
        state.update(scheduler=None, step=-1, _batches=0, _batch=0)
        return state

    # ------------------------------------------------------------------------------------------------------

    @property
    def dropblocks(self) -> tuple[_DropBlockNd, ...]:
        """The DropBlock modules of the current run (empty before it starts)."""
        return () if self.scheduler is None else self.scheduler.dropblocks

    def _example_input(self, trainer: BaseTrainer, net: nn.Module) -> torch.Tensor:
        size = self.imgsz or trainer.args.imgsz
        if isinstance(size, (list, tuple)):
            size = max(size)
        param = next(net.parameters(), None)
        device = param.device if param is not None else trainer.device
        return torch.zeros(1, 3, int(size), int(size), device=device)

    def _run_length(self, trainer: BaseTrainer) -> int:
        if self.total_steps is not None:
            return self.total_steps
        return max(int(trainer.epochs) * len(trainer.train_loader), 1)

    def _strip_ema(self, trainer: BaseTrainer) -> None:
        ema = getattr(getattr(trainer, "ema", None), "ema", None)
        if isinstance(ema, nn.Module) and injected_dropblocks(ema):
            strip(ema)  # same parameters and buffers, so the EMA's update pairs stay valid

    def on_pretrain_routine_end(self, trainer: BaseTrainer) -> None:
        """Inject into the trainer's model (built, weights loaded, EMA copied) and build the scheduler."""
        self._reset()
        net = _network(trainer.model)
        if not injected_dropblocks(net):
            inject(net, self.recipe, example_input=self._example_input(trainer, net))
        self.scheduler = KeepProbScheduler(net, self._run_length(trainer), target=self.target)
        self._strip_ema(trainer)
        sched = self.scheduler  # the ramp ends by total_steps (its fraction is at most 1)
        LOGGER.info(f"DropBlock: {len(sched.dropblocks)} inserted by recipe {self.recipe.name!r}, keep_prob "
                    f"{sched.keep_prob_at(0):.4g} -> {sched.keep_prob_at(sched.total_steps):.4g} over "
                    f"{sched.total_steps} iterations")

    def on_train_epoch_start(self, trainer: BaseTrainer) -> None:
        """Start the epoch's batch count; follow a run length the trainer changed."""
        self._batches = len(trainer.train_loader)
        self._batch = 0
        if self.scheduler is not None and self.total_steps is None:
            length = self._run_length(trainer)
            if length != self.scheduler.total_steps:
                self.scheduler.load_state_dict({**self.scheduler.state_dict(), "total_steps": length})

    def on_train_batch_start(self, trainer: BaseTrainer) -> None:
        """Set keep_prob for the global iteration ``epoch * nb + i`` about to run."""
        if self.scheduler is None:
            raise RuntimeError("DropBlockCallbacks.on_train_batch_start ran before on_pretrain_routine_end: the "
                               "trainer did not run its setup callbacks, so no DropBlock was inserted")
        self.step = int(trainer.epoch) * self._batches + self._batch
        self.scheduler.step(self.step)

    def on_train_batch_end(self, trainer: BaseTrainer) -> None:
        """Count the batch."""
        self._batch += 1

    def on_train_epoch_end(self, trainer: BaseTrainer) -> None:
        """Keep the EMA copy (validated and saved next) free of DropBlock."""
        self._strip_ema(trainer)

    def on_train_end(self, trainer: BaseTrainer) -> None:
        """Strip the trainer's model, ready for export."""
        if self.strip_on_train_end:
            strip(_network(trainer.model))

    def teardown(self, trainer: BaseTrainer) -> None:
        """Strip after a failed run too, so no injected model is left behind (a no-op once stripped)."""
        if self.strip_on_train_end and isinstance(getattr(trainer, "model", None), nn.Module):
            strip(_network(trainer.model))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(recipe={self.recipe.name!r}, target={self.target}, "
                f"total_steps={self.total_steps}, scheduler={self.scheduler!r})")


def add_dropblock(yolo: Model | BaseTrainer, recipe: str | dict | Recipe = "paper_generic", target: float | None = None,
                  *, total_steps: int | None = None, imgsz: int | None = None,
                  strip_on_train_end: bool = True) -> DropBlockCallbacks:
    """Make ``yolo.train(...)`` train with DropBlock, ramped by the trainer's global iteration.

    Args:
        yolo: an Ultralytics model object (``YOLO(...)``) or trainer; its callbacks get one
            :class:`DropBlockCallbacks`, used by every later ``train`` call.
        recipe: where to insert DropBlock: a recipe name, path, dict or Recipe (loaded and checked now).
        target: final keep_prob for a DropBlock of drop-rate scale 1; ``None`` keeps the recipe's.
        total_steps: iterations of the ramp's run; ``None``: ``epochs * len(train_loader)`` of the trainer.
        imgsz: side of the example input used to place DropBlocks; ``None``: the trainer's ``imgsz``.
        strip_on_train_end: strip the trainer's model when training ends (or fails).

    Returns:
        The registered :class:`DropBlockCallbacks`; its ``scheduler`` and ``dropblocks`` describe the run.

    Raises:
        TypeError: ``yolo`` is not an Ultralytics model or trainer (for instance ``yolo.model``, a plain
            ``nn.Module``: use :func:`~dropblock_inject.inject` for that).
        ValueError: ``yolo`` already has DropBlock callbacks, or an argument is out of range.
        RecipeError: the recipe is unknown or invalid.
    """
    if not isinstance(yolo, (Model, BaseTrainer)):
        hint = (" (it is a torch module: pass the Ultralytics object that owns it, e.g. the YOLO(...) whose .model "
                "it is, or call dropblock_inject.inject on it for a training loop of your own)"
                if isinstance(yolo, nn.Module) else "")
        raise TypeError(f"add_dropblock expects an Ultralytics model (YOLO(...)) or trainer, but got "
                        f"{type(yolo).__name__}{hint}")
    registered = [cb for cbs in yolo.callbacks.values() for cb in cbs
                  if isinstance(getattr(cb, "__self__", None), DropBlockCallbacks)]
    if registered:
        raise ValueError(f"{type(yolo).__name__} already has DropBlock callbacks ({registered[0].__self__!r}); "
                         f"register them once per model object")
    callbacks = DropBlockCallbacks(recipe, target=target, total_steps=total_steps, imgsz=imgsz,
                                   strip_on_train_end=strip_on_train_end)
    for event in _TRAIN_EVENTS:
        yolo.add_callback(event, getattr(callbacks, event))
    return callbacks
