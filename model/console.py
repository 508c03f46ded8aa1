"""How the project's command lines log to the console (``pipeline.run``,
``pipeline.analyze``, ``pipeline.query``, ``pipeline.compact``,
``python -m model.convert``, ``python -m model.quantize``): one line format
on stderr, and one rule for what shows.

Quiet (the default of the pipeline's commands): our warnings and errors,
progress lines, and other libraries' errors.  Verbose (``--verbose``, and
the model tools, whose INFO lines say what they are doing): our INFO lines
too, and the libraries' warnings.  Python warnings are log records of
``py.warnings``: hidden unless verbose.

Standard library only, so that an entry point can set its console up
before its slow imports.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

# This project's packages; their INFO lines are shown when verbose.
OUR_PACKAGES = ("pipeline", "model", "transforms")
# Progress lines are shown when quiet too.
PROGRESS_LOGGER = "transforms.progress"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def is_ours(name: str) -> bool:
    """Whether logger ``name`` belongs to one of ``OUR_PACKAGES``."""
    return name.split(".", 1)[0] in OUR_PACKAGES


def shown(name: str, level: int, verbose: bool) -> bool:
    """Whether the console shows a record of logger ``name`` at ``level``
    (see the module docstring)."""
    if is_ours(name):
        floor = logging.INFO if (
            verbose or name == PROGRESS_LOGGER) else logging.WARNING
    else:
        floor = logging.WARNING if verbose else logging.ERROR
    return level >= floor


class ConsoleLevels(logging.Filter):
    """The console's filter: ``shown`` for each record."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return shown(record.name, record.levelno, self.verbose)


class ConsoleStreamHandler(logging.StreamHandler):
    """The console's handler (stderr); ``setup_logging`` sets the filter of
    handlers of this kind only, never of handlers others installed."""


def setup_logging(verbose: bool = False,
                  handler_class: type = ConsoleStreamHandler,
                  filter_class: type = ConsoleLevels,
                  info_loggers: Sequence[str] = ()) -> None:
    """Timestamped log lines on stderr through a ``filter_class(verbose)``;
    our loggers (and ``info_loggers``) at INFO, so that the filter decides
    what shows.  Called again (``--verbose`` parsed late, a second command
    in one process), it swaps the filter instead of adding a handler."""
    root = logging.getLogger()
    if not root.handlers:
        handler = handler_class(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    for handler in root.handlers:
        if isinstance(handler, ConsoleStreamHandler):
            for old in list(handler.filters):
                handler.removeFilter(old)
            handler.addFilter(filter_class(verbose))
    root.setLevel(logging.WARNING)
    for name in OUR_PACKAGES + tuple(info_loggers):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.captureWarnings(not verbose)
