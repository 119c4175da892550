"""What every picture needs: the optional matplotlib import, the default photo, saving, stage names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

EXTRA = 'pip install "dropblock_inject[viz]"'


def figure_tools() -> tuple[Any, Any]:
    """matplotlib's ``Figure`` and ``FigureCanvasAgg``, or an ImportError naming the extra to install."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"dropblock_inject.viz needs matplotlib ({e}); install it with {EXTRA}") from e
    return Figure, FigureCanvasAgg


def sample_photo() -> np.ndarray:
    """scikit-image's ``chelsea`` photo (300 x 451 RGB, shipped in the scikit-image wheel)."""
    try:
        from skimage import data
    except ImportError as e:
        raise ImportError(f"dropblock_inject.viz needs scikit-image for its sample photo ({e}); install it with "
                          f"{EXTRA}, or pass image=") from e
    return data.chelsea()


def save(fig: Any, canvas_type: Any, path: PathLike, dpi: int) -> Path:
    out = Path(path)
    canvas_type(fig)
    fig.savefig(out, dpi=dpi)
    return out


def stage(module: str, level: int | None = None) -> str:
    """The group a module path belongs to: its first ``level`` components, or (``None``) its parent, the
    container of the residual block (``layer3.0`` -> ``layer3``, ``stages.2.blocks.1`` -> ``stages.2.blocks``,
    ``trunk_output.block3.block3-0`` -> ``trunk_output.block3``); a top-level path is its own group."""
    if not module:
        return "(model)"
    parts = module.split(".")
    if level is not None:
        return ".".join(parts[:level])
    return ".".join(parts[:-1]) if len(parts) > 1 else module

