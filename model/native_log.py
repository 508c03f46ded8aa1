"""TensorFlow's native start-up lines, kept off a quiet console.

Importing TensorFlow loads its C++ libraries, which log before TensorFlow
reads ``TF_CPP_MIN_LOG_LEVEL``: absl's "All log messages before
absl::InitializeLog() ..." notice, the oneDNN banner, the CPU-instruction
note and, on machines without a GPU, CUDA probe messages.  They go straight
to file descriptor 2, past Python's logging.  ``quiet_tensorflow_import``
makes the process's first ``import tensorflow`` (wherever it happens) run
with descriptor 2 sent through a filter process, which writes the text out
without the lines ``is_native_noise`` knows once the import is done.
Nothing else is dropped; if the import fails, or the process dies during
it, everything is written out.

Only the standard library is imported here: launchers call this before
their slow imports, and local worker processes through ``model``'s package
import (``QUIET_ENV``).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import subprocess
import sys
import threading
import uuid
from typing import Any, BinaryIO, Iterator, Optional, Sequence

# Set by a quiet launcher for the local worker processes it starts: they
# hide the same start-up lines (see ``install_from_environment``).
QUIET_ENV = "BERT_ZH_EMBED_QUIET"

# A native log line: severity and date, time, thread, file:line].
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} \S+\s+\d+ (\S+?):\d+\] ")
_NOISE_LINES = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) "
               r"is called are written to STDERR$"),
    # cpu_feature_guard's second line.
    re.compile(r"^To enable the following instructions: .*rebuild "
               r"TensorFlow with the appropriate compiler flags\.$"),
)
# Errors a CPU-only machine logs while TensorFlow looks for a GPU.
_CUDA_PROBE = re.compile(
    r"cuda|cuInit|cuDNN|cuFFT|cuBLAS|TensorRT|TF-TRT", re.IGNORECASE)

_lock = threading.Lock()
# The filter process's program (see native_stderr_filtered).
_FILTER_MAIN = ("import sys; from model.native_log import filter_stream; "
                "filter_stream(sys.argv[1], sys.stdin.buffer, "
                "sys.stdout.buffer)")


def is_native_noise(line: str) -> bool:
    """Whether ``line`` is start-up chatter of TensorFlow's C++ libraries:
    an INFO or WARNING native log line, a CUDA probe error, absl's
    pre-initialisation notice or the CPU-instruction note.  Python output,
    tracebacks and other native errors are not."""
    line = line.rstrip("\r\n")
    if any(pattern.match(line) for pattern in _NOISE_LINES):
        return True
    native = _ABSL_LINE.match(line)
    if native is None:
        return False
    return native.group(1) in "IW" or bool(_CUDA_PROBE.search(line))


def drop_native_noise(text: str) -> str:
    """``text`` without its ``is_native_noise`` lines."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if not is_native_noise(line))


@contextlib.contextmanager
def native_stderr_filtered() -> Iterator[None]:
    """Sends descriptor 2 through a filter process while the block runs.

    The filter (``filter_stream`` in a child process, in its own session so
    that Ctrl-C does not stop it) holds what it reads until the stream
    ends: if the block succeeded, the stream ends with TOKEN and the text
    is written out without native noise; if it raised, or the process
    died (a crash, ``os._exit`` on Ctrl-C), the text is written out whole,
    so nothing about a failure is hidden.  Where no filter process can be
    started the block runs unfiltered.
    """
    with _lock:
        token = f"native-log-end-{uuid.uuid4().hex}"
        try:
            saved = os.dup(2)
        except OSError:  # no descriptor 2 (a daemon): nothing to filter
            yield
            return
        try:
            read_end, write_end = os.pipe()
            child = subprocess.Popen(
                [sys.executable, "-c", _FILTER_MAIN, token],
                stdin=read_end, stdout=saved, stderr=saved,
                env=_filter_env(), start_new_session=True)
        except OSError:
            os.close(saved)
            yield
            return
        os.close(read_end)
        _flush_std_streams()
        os.dup2(write_end, 2)
        succeeded = False
        try:
            yield
            succeeded = True
        finally:
            _flush_std_streams()
            if succeeded:
                os.write(2, f"\n{token}\n".encode())
            os.dup2(saved, 2)
            os.close(saved)
            os.close(write_end)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


def _filter_env() -> dict[str, str]:
    """The filter process's environment: this project importable."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def filter_stream(token: str, source: BinaryIO, sink: BinaryIO) -> None:
    """What the filter process does: reads ``source`` to its end; if that
    is ``token`` (the block succeeded) writes the text before it without
    native noise, else everything."""
    data = source.read()
    marker = f"\n{token}\n".encode()
    if data.endswith(marker):
        text = drop_native_noise(data[:-len(marker)].decode(
            "utf-8", errors="replace"))
        data = text.encode("utf-8")
    sink.write(data)
    sink.flush()


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass


class _FilteredLoader(importlib.abc.Loader):
    """Runs a module's ``exec_module`` under ``native_stderr_filtered``;
    everything else is the real loader's."""

    def __init__(self, loader: Any):
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        with native_stderr_filtered():
            self._loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _FirstImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the first import of ``name`` it removes
    itself from ``sys.meta_path`` and wraps the real spec's loader."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname: str, path: Optional[Sequence[str]],
                  target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != self.name:
            return None
        _remove_finder(self.name)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _FilteredLoader(spec.loader)
                return spec
        return None


def _remove_finder(name: str) -> None:
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not (isinstance(f, _FirstImportFinder)
                                and f.name == name)]


def quiet_tensorflow_import(quiet: bool = True) -> None:
    """With ``quiet``, the process's first ``import tensorflow`` drops the
    native start-up lines (nothing happens if TensorFlow is already
    imported); without, any earlier request is withdrawn."""
    _remove_finder("tensorflow")
    if quiet and "tensorflow" not in sys.modules:
        sys.meta_path.insert(0, _FirstImportFinder("tensorflow"))


def install_from_environment() -> None:
    """``quiet_tensorflow_import`` in a process whose launcher asked for it
    through ``QUIET_ENV`` (a local worker process of a quiet run)."""
    if os.environ.get(QUIET_ENV) == "1":
        quiet_tensorflow_import()
