"""Masks of the real op over a photo, for a grid of block sizes and keep_probs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import drop_block2d
from ..ops import seed_rate
from ._common import PathLike, figure_tools, sample_photo, save


def expected_drop_fraction(size: Sequence[int], block_size: int, keep_prob: float) -> float:
    """The exact expected fraction of a map that DropBlock drops (``scale=False`` masks).

    The paper's seed rate ``gamma`` aims at dropping ``1 - keep_prob`` of the map but ignores that blocks
    overlap, so the true fraction is lower, the more so for large drop rates. A position is kept when none of
    the ``n(p)`` valid seeds whose block covers it fires, so the expectation is
    ``1 - mean_p (1 - gamma) ** n(p)``.

    Args:
        size: the map's ``(H, W)``.
        block_size: the requested block size (clipped to the map, as the op does).
        keep_prob: the op's keep_prob.

    Returns:
        The expected dropped fraction, in [0, 1].
    """
    height, width = (int(s) for s in size)
    gamma = min(seed_rate(keep_prob, (height, width), block_size), 1.0)
    covering = []
    for extent in (height, width):
        block = min(block_size, extent)
        positions = np.arange(extent)
        # seeds at anchors a in [0, extent - block] cover [a, a + block - 1]
        covering.append(np.minimum(positions, extent - block) - np.maximum(0, positions - block + 1) + 1)
    n = np.outer(covering[0], covering[1])
    return float(1.0 - np.mean((1.0 - gamma) ** n))


@dataclass(frozen=True)
class MaskPanel:
    """One DropBlock mask of :func:`mask_panels`.

    Attributes:
        block_size: the op's block size.
        keep_prob: the op's keep_prob.
        keep: ``bool`` tensor ``(C, H, W)``, ``True`` where the op kept the value.
        dropped: measured dropped fraction of ``keep``.
        expected: :func:`expected_drop_fraction` for this map, block size and keep_prob.
        seed: the seed of the draw shown (see ``draws`` of :func:`mask_panels`).
        draws: how many draws the panel was chosen from (1: the only one).
    """

    block_size: int
    keep_prob: float
    keep: torch.Tensor
    dropped: float
    expected: float
    seed: int = 0
    draws: int = 1

    @property
    def title(self) -> str:
        """Two lines: the settings (and the seed chosen, when there was a choice), then the measured and
        expected dropped fractions."""
        chosen = f", seed {self.seed} of {self.draws}" if self.draws > 1 else ""
        return (f"block {self.block_size}, keep {self.keep_prob:g}{chosen}\n"
                f"dropped {self.dropped:.1%} (expected {self.expected:.1%})")


def _draw_grid(size: tuple[int, int], block_sizes: Sequence[int], keep_probs: Sequence[float], channels: int,
               per_channel: bool, seed: int) -> list[MaskPanel]:
    """One mask per (block size, keep_prob), in row-major order, from a forked RNG seeded with ``seed``."""
    height, width = size
    panels = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ones = torch.ones(1, channels, height, width)
        for block_size in block_sizes:
            for keep_prob in keep_probs:
                mask = drop_block2d(ones, keep_prob, block_size, per_channel=per_channel, scale=False)[0]
                keep = mask > 0.5
                panels.append(MaskPanel(block_size=int(block_size), keep_prob=float(keep_prob), keep=keep,
                                        dropped=1.0 - keep.float().mean().item(),
                                        expected=expected_drop_fraction(size, block_size, keep_prob), seed=seed))
    return panels


def mask_panels(size: Sequence[int], *, block_sizes: Sequence[int] = (3, 7, 15),
                keep_probs: Sequence[float] = (0.9, 0.75, 0.5), channels: int = 3, per_channel: bool = False,
                seed: int = 0, draws: int = 1) -> list[MaskPanel]:
    """DropBlock masks drawn by the real op, :func:`~dropblock_inject.drop_block2d` with ``scale=False`` on ones.

    A single draw on a small map can be far from typical (at block 15, keep 0.9, a 75 x 113 map expects
    only about 3.8 seeds, and the default grid's seed 0 draws none there), so with ``draws > 1`` the grid is drawn with the seeds ``seed``,
    ``seed + 1``, ... ``seed + draws - 1``, and each panel shows the draw whose dropped fraction is nearest
    its expectation (the first such seed on a tie). The global RNG is left as it was.

    Args:
        size: the map's ``(H, W)``.
        block_sizes: block sizes, one row of panels each.
        keep_probs: keep probabilities, one column each.
        channels: channels of each mask (3 for an RGB overlay).
        per_channel: independent masks per channel (the reference's default); ``False`` shares one.
        seed: the RNG seed of the first draw.
        draws: how many draws to choose each panel from; 1 shows the draw of ``seed`` as it comes.

    Returns:
        Panels in row-major order (``block_sizes`` outer, ``keep_probs`` inner); each records the seed of
        the draw it shows and ``draws``.
    """
    height, width = (int(s) for s in size)
    if height < 1 or width < 1 or channels < 1:
        raise ValueError(f"size and channels must be positive, got size={tuple(size)}, channels={channels}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    grids = [_draw_grid((height, width), block_sizes, keep_probs, channels, per_channel, seed + k)
             for k in range(draws)]
    chosen = []
    for candidates in zip(*grids):
        best = min(candidates, key=lambda p: abs(p.dropped - p.expected))  # min keeps the first on a tie
        chosen.append(dataclasses.replace(best, draws=draws))
    return chosen


def _as_rgb(image: Any) -> np.ndarray:
    """An ``(H, W, 3)`` float array in [0, 1] from an ``(H, W)`` / ``(H, W, 3|4)`` array or a ``(3, H, W)`` tensor."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 3) or (3, H, W), got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    array = array[..., :3]
    if np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float64) / np.iinfo(array.dtype).max
    return np.clip(array.astype(np.float64), 0.0, 1.0)


def plot_masks(path: PathLike, *, image: Any = None, block_sizes: Sequence[int] = (3, 7, 15),
               keep_probs: Sequence[float] = (0.9, 0.75, 0.5), per_channel: bool = False, stride: int = 4,
               seed: int = 0, draws: int = 5, dpi: int = 80) -> Path:
    """A grid of DropBlock masks (block size x keep_prob) applied to a photo, saved as an image file.

    Each mask is drawn by :func:`mask_panels` on an ``(H / stride, W / stride)`` map, as DropBlock on a feature
    map of that output stride would be, and shown upsampled over the photo; each panel's title gives the
    measured dropped fraction and its exact expectation (:func:`expected_drop_fraction`), which is below
    ``1 - keep_prob`` because blocks overlap. Each panel is the most representative of ``draws`` draws: the
    one whose dropped fraction is nearest the expectation, as its title says.

    Args:
        path: where to write the figure; the format follows the suffix (``.png``).
        image: ``(H, W, 3)`` / ``(H, W)`` array (uint8 or float in [0, 1]) or ``(3, H, W)`` tensor; ``None``
            uses scikit-image's ``chelsea`` photo.
        block_sizes: block sizes, one row each.
        keep_probs: keep probabilities, one column each.
        per_channel: independent masks per RGB channel (coloured blocks) instead of one shared mask.
        stride: image pixels per mask cell.
        seed: the RNG seed of the first draw of the masks.
        draws: draws (seeds ``seed`` to ``seed + draws - 1``) each panel is chosen from; 1 shows one draw.
        dpi: resolution of the saved figure.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.

    Raises:
        ImportError: matplotlib (or, with ``image=None``, scikit-image) is not installed.
    """
    figure_type, canvas_type = figure_tools()
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    rgb = _as_rgb(sample_photo() if image is None else image)
    height, width = rgb.shape[:2]
    size = (math.ceil(height / stride), math.ceil(width / stride))
    panels = mask_panels(size, block_sizes=block_sizes, keep_probs=keep_probs, channels=3,
                         per_channel=per_channel, seed=seed, draws=draws)
    rows, cols = len(block_sizes), len(keep_probs)
    aspect = height / width
    fig = figure_type(figsize=(3.2 * cols, 3.2 * aspect * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for panel, ax in zip(panels, axes.flat):
        keep = panel.keep.permute(1, 2, 0).numpy()
        keep = keep.repeat(stride, axis=0).repeat(stride, axis=1)[:height, :width]
        ax.imshow(rgb * keep)
        ax.set_title(panel.title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    masks = "independent per RGB channel" if per_channel else "shared by the RGB channels"
    chosen = (f"\neach panel: the most representative of {draws} draws (seeds {seed}-{seed + draws - 1}), the one "
              f"whose dropped fraction is nearest the expectation" if draws > 1 else f", seed {seed}")
    fig.suptitle(f"DropBlock masks on a {size[0]}x{size[1]} map (stride {stride}), {masks}{chosen}", fontsize=10)
    return save(fig, canvas_type, path, dpi)
