"""What the command-line entry points (``pipeline.run``,
``pipeline.analyze``) share: spotting ``--help`` and setting up logging."""

from __future__ import annotations

import logging
from typing import Sequence

# This project's packages log at INFO; everything else (Beam, TensorFlow)
# only from WARNING, so a run's own progress lines stay readable.
_OUR_PACKAGES = ("pipeline", "model", "transforms")


def wants_help(args: Sequence[str]) -> bool:
    """Whether the command line asks for the help text."""
    return "-h" in args or "--help" in args


def setup_logging() -> None:
    """Timestamped log lines: WARNING for libraries, INFO for ours."""
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: "
                               "%(message)s")
    for package in _OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.INFO)
