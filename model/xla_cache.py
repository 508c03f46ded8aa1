"""A cache of XLA-compiled model executables that later runs reuse.

XLA compiles the model once per batch shape: about a second per shape for
BERT-Base on a CPU, 16 to 32 shapes per worker process.  TensorFlow can
save each executable to a directory and load it in a later process instead
of compiling again (``TF_XLA_FLAGS=--tf_xla_persistent_cache_directory``),
which is what a scheduled re-index wants.  Used bare, that directory has
two faults this module works around:

* TensorFlow writes an entry in place and fails the compile of any shape
  whose entry it cannot parse.  A process that reads an entry while another
  writes it (workers start together and compile the same shapes), or a
  worker killed mid-write, would break that shape for every later run.
  Here each process points TensorFlow at a private staging directory,
  seeded with the shared entries, and publishes its new entries to the
  shared directory whole: a hard link, or a copy renamed into place.
* Entries are keyed by the compiled program, not by the machine, yet an
  executable built for one CPU's instruction set may crash another.  The
  shared directory is therefore split by a key of the TensorFlow version,
  the CPU's model and feature flags and any NVIDIA GPU models.

TensorFlow reads its XLA flags once per process, when its runtime starts,
so ``process_cache`` must run before the process's first TensorFlow
operation; later it returns None and the run compiles as usual.
"""

from __future__ import annotations

import atexit
import glob
import hashlib
import logging
import os
import platform
import re
import shutil
import tempfile
import threading
import uuid
from importlib import metadata
from typing import Optional

from model.runtime import cpu_flags, cpu_model_name

_LOG = logging.getLogger(__name__)

AUTO = "auto"
OFF = "none"
_FLAG = "--tf_xla_persistent_cache_directory"
_ENTRY_SUFFIX = ".pb"

_lock = threading.Lock()
_process_cache: list[Optional["CompileCache"]] = []  # set once per process


def resolve_root(value: str) -> Optional[str]:
    """The cache's root for an ``--xla_cache_dir`` value: ``auto`` is
    ``xla`` under this process's cache directory (``$BERT_ZH_EMBED_CACHE``
    or ``~/.cache/bert_zh_embed``), ``none`` (or empty) turns it off, any
    other value is a local or TensorFlow file-system path."""
    if not value or value.lower() == OFF:
        return None
    if value.lower() == AUTO:
        from model.demo import default_cache_dir
        return os.path.join(default_cache_dir(), "xla")
    return value


def _gpu_models() -> list[str]:
    """NVIDIA GPU model names from the driver's /proc files (none if no
    driver), read without starting TensorFlow."""
    models = []
    for path in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        try:
            with open(path, encoding="utf-8") as handle:
                models += [line.split(":", 1)[1].strip() for line in handle
                           if line.startswith("Model:")]
        except OSError:
            continue
    return models


def gpu_models() -> list[str]:
    """The NVIDIA GPU models this machine's driver lists (empty without a
    driver); engine selection reads them without starting TensorFlow."""
    return _gpu_models()


def is_warm(value: str) -> bool:
    """Whether the compile cache that ``--xla_cache_dir value`` names holds
    executables from earlier runs on this machine kind (so a run with XLA
    loads them instead of compiling); False when off or unreadable."""
    root = resolve_root(value)
    if root is None:
        return False
    try:
        return bool(_entries(f"{root.rstrip('/')}/{machine_key()}"))
    except Exception:  # pylint: disable=broad-except
        return False  # an unreadable cache is a cold one


def machine_key() -> str:
    """The shared directory's sub-directory for this machine kind: the
    TensorFlow version plus a digest of the CPU model, CPU flags and GPU
    models, e.g. ``tf2.21.0-x86_64-3f9c0a1b2c3d4e5f``."""
    try:
        version = metadata.version("tensorflow")
    except metadata.PackageNotFoundError:
        version = "unknown"
    machine = platform.machine() or "unknown"
    text = "\n".join([version, machine, cpu_model_name(),
                      " ".join(sorted(cpu_flags()))] + _gpu_models())
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return f"tf{version}-{machine}-{digest}"


def _is_local(path: str) -> bool:
    return "://" not in path


def _entries(directory: str) -> list[str]:
    """Names of the complete entries in ``directory`` (temporary copies are
    hidden files and are left out)."""
    import tensorflow as tf
    if not tf.io.gfile.isdir(directory):
        return []
    return sorted(name for name in tf.io.gfile.listdir(directory)
                  if name.endswith(_ENTRY_SUFFIX) and not name.startswith("."))


def _place(source: str, target: str, link: bool) -> bool:
    """Puts a copy of the complete file ``source`` at ``target`` so that
    readers of ``target`` never see part of it; False if ``target`` already
    exists (another process got there first).  ``link`` allows a hard link
    where both are local: only for files nobody writes again."""
    import tensorflow as tf
    if tf.io.gfile.exists(target):
        return False
    if link and _is_local(source) and _is_local(target):
        try:
            os.link(source, target)
            return True
        except FileExistsError:
            return False
        except OSError:
            pass  # another file system, or no hard links: copy instead
    directory, name = os.path.split(target)
    partial = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
    tf.io.gfile.copy(source, partial, overwrite=True)
    tf.io.gfile.rename(partial, target, overwrite=True)
    return True


class CompileCache:
    """One process's view of the shared executable cache.

    ``directory`` is the shared directory for this machine kind,
    ``staging`` the local directory TensorFlow reads and writes.
    """

    def __init__(self, directory: str, staging: str) -> None:
        self.directory = directory
        self.staging = staging
        self._known: set[str] = set()  # in both directories
        self._loaded = False
        self._failed = False

    def load_entries(self) -> int:
        """Copies the shared entries into staging, once; returns how many.
        An unreadable cache is logged and left unused."""
        if self._loaded:
            return 0
        self._loaded = True
        count = 0
        try:
            for name in _entries(self.directory):
                if name not in self._known:
                    # A copy: TensorFlow may rewrite a staging file it
                    # cannot load, and must not do so through a link.
                    _place(f"{self.directory}/{name}",
                           os.path.join(self.staging, name), link=False)
                    self._known.add(name)
                    count += 1
        except Exception as err:  # pylint: disable=broad-except
            # A cache must never fail a run: compile instead.
            self._warn_once(f"cannot read the XLA compile cache "
                            f"{self.directory} ({err}); compiling instead")
        _LOG.info("XLA compile cache %s: %d executables from earlier runs",
                  self.directory, count)
        return count

    def staging_state(self) -> dict[str, int]:
        """The entries in staging and their modification times: compare
        with ``written_since`` after a compile."""
        state = {}
        for name in _entries(self.staging):
            try:
                state[name] = os.stat(os.path.join(self.staging,
                                                   name)).st_mtime_ns
            except OSError:
                continue
        return state

    def written_since(self, state: dict[str, int]) -> int:
        """How many staging entries TensorFlow wrote or rewrote since
        ``staging_state`` returned ``state``: 0 after a call that XLA served
        from the cache, at least 1 after one it compiled."""
        now = self.staging_state()
        return sum(1 for name, stamp in now.items()
                   if state.get(name) != stamp)

    def publish(self) -> int:
        """Publishes the entries TensorFlow wrote to staging since the last
        call; returns how many.  Call it only while no compile is running
        (``BertSavedModel`` serialises compiles), so every file is whole."""
        if self._failed:
            return 0
        count = 0
        try:
            import tensorflow as tf
            tf.io.gfile.makedirs(self.directory)
            for name in _entries(self.staging):
                if name in self._known:
                    continue
                self._known.add(name)
                # TensorFlow writes each entry once, so a link is safe.
                if _place(os.path.join(self.staging, name),
                          f"{self.directory}/{name}", link=True):
                    count += 1
        except Exception as err:  # pylint: disable=broad-except
            self._warn_once(f"cannot write the XLA compile cache "
                            f"{self.directory} ({err}); later runs will "
                            "compile again")
        return count

    def _warn_once(self, message: str) -> None:
        if not self._failed:
            self._failed = True
            _LOG.warning(message)


def _tensorflow_started() -> bool:
    """Whether this process's TensorFlow runtime (and so its XLA flags) is
    already set up."""
    from tensorflow.python.eager import context
    return context.context()._context_handle is not None  # pylint: disable=protected-access


def _point_tensorflow_at(staging: str) -> None:
    """Makes TensorFlow's XLA flags name ``staging`` as its cache, then
    restores ``TF_XLA_FLAGS`` so child processes do not inherit it."""
    from tensorflow.python import pywrap_tfe
    before = os.environ.get("TF_XLA_FLAGS")
    os.environ["TF_XLA_FLAGS"] = f"{before or ''} {_FLAG}={staging}".strip()
    # Any getter of an XLA flag parses them all from the environment, once.
    parse_now = getattr(pywrap_tfe, "TF_GetXlaConstantFoldingDisabled", None)
    if parse_now is None:
        return  # left set: TensorFlow parses it when its runtime starts
    try:
        parse_now()
    finally:
        if before is None:
            del os.environ["TF_XLA_FLAGS"]
        else:
            os.environ["TF_XLA_FLAGS"] = before


def process_cache(value: str) -> Optional[CompileCache]:
    """This process's ``CompileCache`` for an ``--xla_cache_dir`` value,
    set up on the first call (later calls return the same one).

    None when the value turns the cache off, when ``TF_XLA_FLAGS`` already
    names a cache (the user's own setting wins), when TensorFlow has
    already started in this process (too late to set its flags), or when no
    staging directory can be made.
    """
    with _lock:
        if _process_cache:
            cache = _process_cache[0]
            root = resolve_root(value)
            if cache is not None and root is not None and \
                    not cache.directory.startswith(root.rstrip("/")):
                _LOG.warning("XLA compile cache already set to %s in this "
                             "process; %s is not used", cache.directory, root)
            return cache
        cache = _new_cache(value)
        _process_cache.append(cache)
        return cache


def user_cache_flag() -> bool:
    """Whether ``TF_XLA_FLAGS`` names a persistent cache of its own (it
    then wins over ``--xla_cache_dir``)."""
    return bool(re.search(re.escape(_FLAG) + r"=\S",
                          os.environ.get("TF_XLA_FLAGS", "")))


def _new_cache(value: str) -> Optional[CompileCache]:
    root = resolve_root(value)
    if root is None:
        return None
    if user_cache_flag():
        _LOG.info("TF_XLA_FLAGS sets %s; --xla_cache_dir is not used", _FLAG)
        return None
    if _tensorflow_started():
        _LOG.info("TensorFlow already started in this process; the XLA "
                  "compile cache %s is not used by it", root)
        return None
    try:
        staging = tempfile.mkdtemp(prefix="xla-cache-staging-")
    except OSError as err:
        _LOG.warning("no XLA compile cache: cannot make a staging "
                     "directory (%s)", err)
        return None
    atexit.register(shutil.rmtree, staging, ignore_errors=True)
    _point_tensorflow_at(staging)
    directory = f"{root.rstrip('/')}/{machine_key()}"
    return CompileCache(directory, staging)


def reset_for_tests() -> None:
    """Forgets this process's cache (tests only: TensorFlow keeps its
    flags)."""
    with _lock:
        _process_cache.clear()
