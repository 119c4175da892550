"""Training-framework callbacks that drive :class:`~dropblock_inject.KeepProbScheduler`.

* :mod:`dropblock_inject.integrations.lightning`: ``DropBlockScheduleCallback`` for Lightning
  (``lightning.pytorch`` and ``pytorch_lightning``); ``pip install dropblock_inject[lightning]``.
* :mod:`dropblock_inject.integrations.transformers`: ``DropBlockScheduleCallback`` for the Hugging Face
  ``transformers.Trainer``; ``pip install dropblock_inject[transformers]``.

Neither framework is a dependency of ``dropblock_inject``: each submodule imports its framework when it is
itself imported, and raises an ImportError that says what to install when the framework is missing.
"""

__all__: list[str] = []
