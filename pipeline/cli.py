"""What the command-line entry points (``pipeline.run``,
``pipeline.analyze``, the Flex Template's ``dataflow/flex_main.py``) share:
spotting ``--help``, refusing unknown flags, setting up logging, and ending
quietly on Ctrl-C.

This module imports only the standard library at load time, so that an
entry point can call ``exit_on_interrupt`` before its slow imports (Beam,
TensorFlow) begin.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import signal
import threading
from typing import Any, Iterator, Sequence

# This project's packages log at INFO; everything else (Beam, TensorFlow)
# only from WARNING, so a run's own progress lines stay readable.
_OUR_PACKAGES = ("pipeline", "model", "transforms")

# What a shell reports for a process ended by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 128 + signal.SIGINT
INTERRUPTED = "interrupted, nothing published"

_LOG = logging.getLogger("pipeline.cli")


class UsageError(ValueError):
    """A flag is missing, unknown or inconsistent."""


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


def check_known_flags(args: Sequence[str]) -> None:
    """Raises ``UsageError`` for an argument that no ``PipelineOptions``
    class (ours or Beam's) defines, naming the closest known flag.

    Beam itself only logs such arguments and drops them, so a typo such as
    ``--max_seq_lenght 16`` would otherwise run at the default.  The parser
    checked is the one Beam builds from every options class (handed over
    through ``get_all_options``' ``add_extra_args_fn``), so each Beam option
    (``--runner``, ``--project``, ``--experiments``, ...) still passes.
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    def refuse_unknown(parser: Any) -> None:
        _, unknown = parser.parse_known_args(list(args))
        if unknown:
            actions = parser._actions  # pylint: disable=protected-access
            known = [flag for action in actions
                     for flag in action.option_strings]
            raise UsageError(unknown_argument_message(unknown[0], known))

    PipelineOptions(list(args)).get_all_options(
        add_extra_args_fn=refuse_unknown)


def unknown_argument_message(arg: str, known_flags: Sequence[str]) -> str:
    """One line about an argument the parser did not take, with the known
    flag it most resembles (the way Beam's own warning suggests one)."""
    if not arg.startswith("-"):
        return (f"unexpected argument {arg!r} (a value given to a flag that "
                "takes none, or a missing --flag before it)")
    name = arg.split("=", 1)[0]
    close = difflib.get_close_matches(name, known_flags, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown flag {name}{hint}; see --help"


def _end_interrupted(signum: int, frame: Any) -> None:
    """SIGINT handler: one line, exit 130, at once.

    Nothing is published before the pipeline has finished and its counts
    are checked, so a run stopped anywhere before that leaves the output as
    it was; its staging directory is removed by the next run at the same
    output.  ``os._exit`` ends the process without unwinding: Beam's worker
    threads would otherwise log the interrupt as a failure, with
    tracebacks, or keep the process alive.  ``os.write`` because a signal
    handler may run in the middle of another write to ``sys.stderr``.
    """
    del signum, frame
    os.write(2, (INTERRUPTED + "\n").encode())
    os._exit(EXIT_INTERRUPTED)  # pylint: disable=protected-access


def exit_on_interrupt() -> None:
    """Makes Ctrl-C (SIGINT) end the process with ``INTERRUPTED`` on stderr
    and exit code 130, instead of a traceback.  For command-line entry
    points only: call it from the main thread, first thing."""
    signal.signal(signal.SIGINT, _end_interrupted)


@contextlib.contextmanager
def interrupts_deferred(what: str) -> Iterator[None]:
    """Holds Ctrl-C back while ``what`` (e.g. publishing) runs, so that it
    is never left half done; an interrupt that came meanwhile is logged
    afterwards and otherwise ignored, since ``what`` is then complete."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives signals
        return
    came: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _: came.append(1))
    if previous is None:  # a handler set outside Python: restore the default
        previous = signal.default_int_handler
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if came:
            _LOG.warning("Ctrl-C during %s: it was completed first", what)
