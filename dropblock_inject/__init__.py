"""dropblock_inject: put DropBlock into an existing CNN with torch.fx, schedule it, strip it before export."""

from .ops import DropBlock2d, DropBlock3d, drop_block2d, drop_block3d

__all__ = ["DropBlock2d", "DropBlock3d", "drop_block2d", "drop_block3d"]
__version__ = "0.1.0"
