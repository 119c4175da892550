"""Zoo coverage (dev tooling, not in the wheel): run ``paper_generic`` (or any recipe) over the CNNs of torchvision, timm, Hugging Face
transformers and segmentation_models_pytorch, and report every model's status and reason.

* :mod:`.check` -- one model through plan, inject, eval, train and strip, with the placement checks
  (:mod:`.video` the same for video ResNets);
* :mod:`.zoo` -- which models, how to build them (random weights) and how big an input they need;
* :mod:`.report` -- the sweep, the Markdown report and ``python -m tools.coverage``.
"""

from .check import CoverageRow, _nested_dropblocks, check_model
from .video import check_video_model
from .report import main, pass_rates, sweep, write_report
from .zoo import (FAMILIES, KNOWN_LIMITS, TIMM_FAST, TIMM_SAMPLE, TV_FAST, TV_HEAVY, VIDEO_MODELS, _timm_family, _tv_family,
                  timm_models, torchvision_models)

__all__ = ["FAMILIES", "CoverageRow", "check_model", "check_video_model", "main", "pass_rates", "sweep", "timm_models",
           "torchvision_models", "write_report", "KNOWN_LIMITS", "TIMM_FAST", "TIMM_SAMPLE", "TV_FAST", "TV_HEAVY",
           "VIDEO_MODELS", "_nested_dropblocks", "_timm_family", "_tv_family"]
