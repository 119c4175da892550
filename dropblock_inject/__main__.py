"""``python -m dropblock_inject``: the command line of :mod:`dropblock_inject.cli`."""

import sys

from .cli import main

sys.exit(main(prog="python -m dropblock_inject"))
