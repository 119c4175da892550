"""Zoo coverage (dev tooling, not in the wheel): run ``paper_generic`` (or any recipe) over the CNNs of torchvision,
timm, Hugging Face transformers, segmentation_models_pytorch, Ultralytics, pytorchcv, MONAI and efficientnet_pytorch,
and report every model's status and reason.

* :mod:`.check` -- one model through plan, inject, eval, train and strip, with the sweep's checks
  (:mod:`.blocks` residual blocks, :mod:`.placement` placement from the dataflow; :mod:`.video` the same for
  video ResNets);
* :mod:`.zoo` -- which models, how to build them (random weights, offline) and how big an input they need
  (:mod:`.zoo_cnn`, :mod:`.zoo_detect`: the other libraries' zoos);
* :mod:`.report` -- the sweep, the Markdown report and ``python -m tools.coverage``.
"""

from .check import CLEAR_ERROR, CoverageRow, _nested_dropblocks, check_model
from .video import check_video_model
from .report import main, pass_rates, sweep, write_report
from .zoo import (FAMILIES, KNOWN_LIMITS, OPEN_FAILURES, TIMM_FAST, TIMM_SAMPLE, TV_FAST, TV_HEAVY, VIDEO_MODELS, _timm_family, _tv_family,
                  timm_models, torchvision_models)

__all__ = ["CLEAR_ERROR", "FAMILIES", "CoverageRow", "check_model", "check_video_model", "main", "pass_rates", "sweep", "timm_models",
           "torchvision_models", "write_report", "KNOWN_LIMITS", "OPEN_FAILURES", "TIMM_FAST", "TIMM_SAMPLE", "TV_FAST", "TV_HEAVY",
           "VIDEO_MODELS", "_nested_dropblocks", "_timm_family", "_tv_family"]
