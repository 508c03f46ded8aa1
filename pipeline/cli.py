"""What the command-line entry points (``pipeline.run``,
``pipeline.analyze``, the Flex Template's ``dataflow/flex_main.py``) share:
spotting ``--help`` and ``--verbose``, refusing unknown flags, a quiet
console, a live progress line, and ending quietly on Ctrl-C.

The console is quiet by default: our own warnings and errors, progress
lines, and errors of the libraries; TensorFlow's native start-up lines
(``model.native_log``), its C++ INFO, WARNING and ERROR log lines
(``TF_CPP_MIN_LOG_LEVEL=3`` unless the user set it), Python warnings and the
libraries' (Beam, absl, TensorFlow) INFO and WARNING lines are not shown.
``--verbose`` shows all of them, and our INFO lines.

This module imports only the standard library at load time (and
``model.native_log`` and ``model.console``, which do too), so that an entry point can call
``exit_on_interrupt`` before its slow imports (Beam, TensorFlow) begin.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import re
import shutil
import signal
import sys
import threading
from typing import Any, Iterator, NoReturn, Optional, Sequence, TextIO

from model import console, native_log

# TensorFlow's C++ log level when the user has not set one: 3 hides its
# INFO, WARNING and ERROR lines (CUDA probes on CPU machines, XLA cache
# format notes); FATAL ones, and Python errors, still show.
QUIET_TF_LOG_LEVEL = "3"
# Where Beam's local job service relays its SDK workers' log lines (local
# multi-process and portable runs), one "Worker: <LogEntry>" line each.
_WORKER_RELAY_LOGGER = "apache_beam.runners.portability.local_job_service"

# What a shell reports for a process ended by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 128 + signal.SIGINT
INTERRUPTED = "interrupted, nothing published"

_LOG = logging.getLogger("pipeline.cli")
# Whether this process set TF_CPP_MIN_LOG_LEVEL itself (undone by a later
# verbose setup in the same process).
_set_tf_log_level: list[bool] = []


class UsageError(ValueError):
    """A flag is missing, unknown or inconsistent."""


class UsageParser(argparse.ArgumentParser):
    """argparse whose mistakes raise a one-line ``UsageError`` (the entry
    point prints it and exits 2) instead of printing usage and exiting;
    ``error_hint`` is added to each such message."""

    def __init__(self, *args: Any, error_hint: str = "", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._error_hint = error_hint

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}{self._error_hint}")


def wants_help(args: Sequence[str]) -> bool:
    """Whether the command line asks for the help text."""
    return "-h" in args or "--help" in args


def wants_verbose(args: Sequence[str]) -> bool:
    """Whether the command line asks for the full console (``--verbose``)."""
    return "--verbose" in args


def setup_console(verbose: bool = False) -> None:
    """The console of a command-line run: quiet, or everything with
    ``verbose`` (see the module docstring).  Call it before TensorFlow is
    imported; local worker processes inherit the choice through their
    environment."""
    if verbose:
        if _set_tf_log_level:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
            _set_tf_log_level.clear()
        os.environ.pop(native_log.QUIET_ENV, None)
    else:
        if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = QUIET_TF_LOG_LEVEL
            _set_tf_log_level.append(True)
        os.environ[native_log.QUIET_ENV] = "1"
    native_log.quiet_tensorflow_import(not verbose)
    setup_logging(verbose)


def setup_logging(verbose: bool = False) -> None:
    """The project's console logging (``model.console.setup_logging``) as
    the pipeline's commands have it: lines written above the live progress
    line (``ConsoleHandler``), and local workers' relayed lines shown by
    the same rule (``ConsoleFilter``)."""
    console.setup_logging(verbose, ConsoleHandler, ConsoleFilter,
                          (_WORKER_RELAY_LOGGER,))


# Log levels of Beam's LogEntry severities (beam_fn_api.proto: TRACE 1,
# DEBUG 2, INFO 3, NOTICE 4, WARN 5, ERROR 6, CRITICAL 7).
_ENTRY_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO,
                 4: logging.INFO, 5: logging.WARNING, 6: logging.ERROR,
                 7: logging.CRITICAL}
_SOURCE_MODULE = re.compile(
    r"(?:^|/)((?:%s)/[\w/]+)\.py:\d+$" % "|".join(console.OUR_PACKAGES))


def relayed_worker_line(text: str) -> Optional[tuple[int, str, str]]:
    """``(level, logger, message)`` of a worker's log line that Beam's job
    service relays as the text of a ``LogEntry``; None for other text.
    ``logger`` is our module's name where the line came from our code,
    else ``worker``."""
    if not text.lstrip().startswith(("severity:", "timestamp", "message:")):
        return None
    try:
        from apache_beam.portability.api import beam_fn_api_pb2
        from google.protobuf import text_format
        entry = text_format.Parse(text, beam_fn_api_pb2.LogEntry())
    except Exception:  # pylint: disable=broad-except
        return None
    source = _SOURCE_MODULE.search(entry.log_location)
    module = source.group(1).replace("/", ".") if source else ""
    # One of our modules (the launcher has them all), not a library's
    # namesake such as apache_beam/transforms/core.py.
    logger = module if module in sys.modules else "worker"
    return (_ENTRY_LEVELS.get(entry.severity, logging.INFO), logger,
            entry.message)


class ConsoleFilter(console.ConsoleLevels):
    """Which log records the console shows (``model.console.shown``).
    Lines that local workers log reach the launcher relayed by Beam's job
    service as one protobuf text each; they are shown (as ``worker:
    <message>``, under the module that logged them) by the same rule.
    """

    def _shown(self, name: str, level: int) -> bool:
        return console.shown(name, level, self.verbose)

    def filter(self, record: logging.LogRecord) -> bool:
        relayed = None
        if record.name in (_WORKER_RELAY_LOGGER, "root"):
            try:
                relayed = relayed_worker_line(
                    record.args[0] if record.msg == "Worker: %s"
                    and record.args else str(record.getMessage()))
            except Exception:  # pylint: disable=broad-except
                relayed = None
        if relayed is None:
            return self._shown(record.name, record.levelno)
        level, name, message = relayed
        if not self._shown(name, level):
            return False
        if name != "worker":
            message = f"worker: {message}"
        record.name, record.msg, record.args = name, message, ()
        record.levelno, record.levelname = level, logging.getLevelName(level)
        return True


class StatusLine:
    """One line at the bottom of a terminal, rewritten in place (the live
    progress line); log records are written above it (``ConsoleHandler``).
    """

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._text = ""
        self._lock = threading.RLock()

    def show(self, text: str) -> None:
        """Replaces the line with ``text``, cut to the terminal's width."""
        width = shutil.get_terminal_size((100, 24)).columns - 1
        text = text if len(text) <= width else text[:max(width - 1, 0)] + "…"
        with self._lock:
            self._write("\r" + text + "\x1b[K")
            self._text = text

    def clear(self) -> None:
        """Removes the line (before the run's summary is printed)."""
        with self._lock:
            if self._text:
                self._write("\r\x1b[K")
                self._text = ""

    @contextlib.contextmanager
    def moved_down(self) -> Iterator[None]:
        """Clears the line while the block writes, then shows it again."""
        with self._lock:
            text = self._text
            if text:
                self._write("\r\x1b[K")
            try:
                yield
            finally:
                if text:
                    self._write("\r" + text + "\x1b[K")

    def _write(self, data: str) -> None:
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):
            pass


STATUS = StatusLine(sys.stderr)


class ConsoleHandler(console.ConsoleStreamHandler):
    """A stderr handler that writes log records above the live progress
    line."""

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is STATUS._stream:  # pylint: disable=protected-access
            with STATUS.moved_down():
                super().emit(record)
        else:
            super().emit(record)


@contextlib.contextmanager
def live_progress(interval: float, stream: Optional[TextIO] = None
                  ) -> Iterator[bool]:
    """While the block runs (a pipeline in this process), shows this
    process's progress as a live line on ``stream`` (stderr) when it is a
    terminal and ``interval`` (``--progress_interval``) is not 0; yields
    whether it does.  Worker processes, and runs whose stderr is a file or
    pipe, log periodic lines instead (``transforms.progress``)."""
    stream = stream or sys.stderr
    if not interval or not _isatty(stream):
        yield False
        return
    from transforms.progress import TRACKER
    status = STATUS if stream is STATUS._stream else StatusLine(stream)  # pylint: disable=protected-access
    TRACKER.show_live(status.show)
    try:
        yield True
    finally:
        TRACKER.show_live(None)
        status.clear()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` with each flag's default: ``(default: X)`` is added to a
    help text that does not already state it (``(default ...``,
    ``Default: ...``) or say that the flag is required; on/off flags show
    ``off``, lists are comma-joined."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default is argparse.SUPPRESS
                or STATES_DEFAULT.search(text)):
            return text
        return f"{text} (default: {help_default(action.default)})"


# A help text that states its flag's default itself, or that it has none.
STATES_DEFAULT = re.compile(r"\(default\b|\bdefault:|\brequired\b", re.I)


def help_default(value: Any) -> str:
    """A default as ``--help`` shows it (``%`` escaped for argparse)."""
    if value is None:
        shown = "none"
    elif value is False:
        shown = "off"
    elif value is True:
        shown = "on"
    elif isinstance(value, float):
        shown = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        shown = ",".join(map(str, value))
    else:
        shown = str(value)
    return shown.replace("%", "%%")


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
