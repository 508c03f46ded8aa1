"""One run at a time per output: an exclusive lease file ``<output>.lock``.

Two runs at the same ``--output`` would destroy each other: the second's
start-up would remove the first's staging directory as unfinished, and each
publish removes the other's files.  So a run first creates
``<output>.lock`` -- atomically, only if it does not exist -- holding its
run id, pid, host and start time, and removes it on every way out
(``OutputLock`` is a context manager).  Creating it happens before the
model is loaded, so it also proves early that the output can be written.

A second run finds the lock and refuses, naming the holder, unless the
lock is **stale**: on the same host when the holder's process is gone (or
its pid now belongs to another process), on another host when its lease
ran out: the holder refreshes the lock every ``REFRESH_SECONDS`` and a lock
not refreshed for its ``lease_seconds`` (``LEASE_SECONDS``) is taken over,
with a log line.  Hosts are compared by name and leases by wall clock, so
hosts that share an output need distinct names and clocks that agree to
well within the lease.

"Create only if absent" depends on the file system:

* local paths: ``open(O_CREAT | O_EXCL)``; a takeover renames the stale
  lock aside (one rename wins) and checks that it moved the lock it judged;
* ``gs://`` with ``google-cloud-storage`` importable: an upload with
  generation precondition 0 (the object must not exist); refreshing,
  taking over and removing are conditional on the generation read;
* other file systems (Beam's ``FileSystems`` has no create-if-absent): the
  lock is written when absent, then read back after ``SETTLE_SECONDS``;
  two runs that start within that moment may still both proceed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any, Callable, Optional, Protocol

from transforms.embedding_files import LOCK_SUFFIX

_LOG = logging.getLogger("pipeline.lock")

LEASE_SECONDS = 600.0
REFRESH_SECONDS = 60.0
# A lock whose content cannot be read (its creator died between creating
# and writing it) is stale once it is this old.
UNREADABLE_GRACE_SECONDS = 30.0
SETTLE_SECONDS = 1.0  # the read-back delay of the fallback store


class OutputLocked(RuntimeError):
    """Another live run holds the output's lock."""


class OutputNotWritable(ValueError):
    """The output location cannot be written (the lock cannot be created)."""


class LockLost(RuntimeError):
    """This run's lock was taken over (its lease ran out) or removed."""


def lock_path(output: str) -> str:
    """``<output>.lock``."""
    return output + LOCK_SUFFIX


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (Linux ``/proc``), which tells a
    reused pid from the original process; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii",
                  errors="replace") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class LockOwner:
    """What a lock file says about the run that holds it."""
    run_id: str
    output: str
    pid: int
    host: str
    started_at: str
    refreshed_at: float  # epoch seconds
    lease_seconds: float = LEASE_SECONDS
    pid_start: Optional[str] = None

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=1).encode("utf-8")

    @classmethod
    def parse(cls, data: bytes) -> Optional["LockOwner"]:
        """The owner a lock file names, or None when it is unreadable."""
        try:
            record = json.loads(data.decode("utf-8"))
            return cls(**{f.name: record[f.name]
                          for f in dataclasses.fields(cls)
                          if f.name in record})
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def describe(self) -> str:
        """``run <id> (pid N on host H, started T)``."""
        return (f"run {self.run_id} (pid {self.pid} on host {self.host}, "
                f"started {self.started_at})")


def stale_reason(owner: Optional[LockOwner], modified: float, now: float,
                 host: str,
                 alive: Callable[[int], bool] = pid_alive,
                 start_of: Callable[[int], Optional[str]] = _process_start
                 ) -> Optional[str]:
    """Why a lock found at the output may be taken over, or None while its
    holder may still be running.

    ``modified`` is the lock file's modification time: a local holder
    refreshes that rather than the content.
    """
    if owner is None:
        age = now - modified
        if age > UNREADABLE_GRACE_SECONDS:
            return f"its content is unreadable and it is {age:.0f} s old"
        return None
    if owner.host == host:
        if not alive(owner.pid):
            return f"its process (pid {owner.pid}) is gone"
        start = start_of(owner.pid)
        if owner.pid_start and start and start != owner.pid_start:
            return f"pid {owner.pid} is now another process"
        return None
    age = now - max(owner.refreshed_at, modified)
    if age > owner.lease_seconds:
        return (f"host {owner.host} has not refreshed it for {age:.0f} s "
                f"(lease {owner.lease_seconds:.0f} s)")
    return None


@dataclasses.dataclass(frozen=True)
class Found:
    """A lock file as read: content, modification time (epoch seconds) and
    a store-specific token (a GCS generation)."""
    data: bytes
    modified: float
    token: Any = None


class LockStore(Protocol):
    """Where a lock file lives: each operation as atomic as the file system
    allows (None: the lock exists already, or changed meanwhile)."""

    def create(self, data: bytes) -> Optional[Found]: ...

    def read(self) -> Optional[Found]: ...

    def take_over(self, stale: Found, data: bytes) -> Optional[Found]: ...

    def refresh(self, found: Found, data: bytes) -> Found: ...

    def remove(self, found: Found) -> None: ...


class LocalStore:
    """A lock file on a local (or mounted) file system."""

    def __init__(self, path: str):
        self.path = path
        self._made: list[str] = []  # directories made for the lock

    def create(self, data: bytes) -> Optional[Found]:
        """Creates the lock with ``data``; None if it exists already."""
        parent = os.path.dirname(self.path)
        missing = []
        while parent and not os.path.exists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(missing):
            try:
                os.mkdir(directory)
            except FileExistsError:
                if os.path.isdir(directory):
                    continue  # made by another process meanwhile
                raise
            self._made.append(directory)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o644)
        except FileExistsError:
            return None
        try:
            os.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)
        return Found(data, time.time())

    @staticmethod
    def _read(path: str) -> Optional[Found]:
        try:
            with open(path, "rb") as handle:
                return Found(handle.read(), os.fstat(handle.fileno()).st_mtime)
        except FileNotFoundError:
            return None

    def read(self) -> Optional[Found]:
        return self._read(self.path)

    def take_over(self, stale: Found, data: bytes) -> Optional[Found]:
        """Replaces the stale lock ``stale`` with ``data``; None when the
        lock changed meanwhile (another run took it over first)."""
        aside = f"{self.path}.stale-{secrets.token_hex(4)}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        moved = self._read(aside)
        if moved is None or moved.data != stale.data:
            try:  # another run's fresh lock: put it back
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return None
        os.unlink(aside)
        return self.create(data)

    def refresh(self, found: Found, data: bytes) -> Found:
        """Marks the lock as still held (its modification time)."""
        os.utime(self.path)
        return found

    def remove(self, found: Found) -> None:
        """Removes the lock, and the directories made for it if the run
        left them empty (a run refused at launch leaves nothing)."""
        os.unlink(self.path)
        for directory in reversed(self._made):
            try:
                os.rmdir(directory)
            except OSError:
                break


class GcsStore:
    """A lock object on GCS, created and changed under generation
    preconditions."""

    def __init__(self, path: str, client: Any = None):
        from google.api_core import exceptions
        self._errors = exceptions
        bucket, _, name = path[len("gs://"):].partition("/")
        if client is None:
            from google.cloud import storage
            client = storage.Client()
        self._bucket = client.bucket(bucket)
        self._name = name

    def create(self, data: bytes) -> Optional[Found]:
        blob = self._bucket.blob(self._name)
        try:
            blob.upload_from_string(data, content_type="application/json",
                                    if_generation_match=0)
        except self._errors.PreconditionFailed:
            return None
        return Found(data, time.time(), blob.generation)

    def read(self) -> Optional[Found]:
        blob = self._bucket.get_blob(self._name)
        if blob is None:
            return None
        try:
            data = blob.download_as_bytes(if_generation_match=blob.generation)
        except (self._errors.NotFound, self._errors.PreconditionFailed):
            return self.read()  # replaced or removed meanwhile
        return Found(data, blob.updated.timestamp(), blob.generation)

    def take_over(self, stale: Found, data: bytes) -> Optional[Found]:
        try:
            self._bucket.blob(self._name).delete(
                if_generation_match=stale.token)
        except (self._errors.NotFound, self._errors.PreconditionFailed):
            return None
        return self.create(data)

    def refresh(self, found: Found, data: bytes) -> Found:
        blob = self._bucket.blob(self._name)
        try:
            blob.upload_from_string(data, content_type="application/json",
                                    if_generation_match=found.token)
        except self._errors.PreconditionFailed as err:
            raise LockLost("the lock was replaced") from err
        return Found(data, time.time(), blob.generation)

    def remove(self, found: Found) -> None:
        try:
            self._bucket.blob(self._name).delete(
                if_generation_match=found.token)
        except (self._errors.NotFound, self._errors.PreconditionFailed):
            pass


class BeamStore:
    """A lock file on any Beam file system: written when absent, then read
    back (see the module docstring for the race that remains)."""

    def __init__(self, path: str, settle_seconds: float = SETTLE_SECONDS):
        self.path = path
        self._settle = settle_seconds

    def _write(self, data: bytes) -> None:
        from apache_beam.io.filesystems import FileSystems
        with FileSystems.create(self.path) as handle:
            handle.write(data)

    def create(self, data: bytes) -> Optional[Found]:
        from apache_beam.io.filesystems import FileSystems
        if FileSystems.exists(self.path):
            return None
        self._write(data)
        time.sleep(self._settle)
        found = self.read()
        return found if found is not None and found.data == data else None

    def read(self) -> Optional[Found]:
        from apache_beam.io.filesystems import FileSystems
        matched = FileSystems.match([self.path])[0].metadata_list
        if not matched:
            return None
        try:
            with FileSystems.open(self.path) as handle:
                data = handle.read()
        except (OSError, IOError):
            return None
        return Found(data, matched[0].last_updated_in_seconds)

    def take_over(self, stale: Found, data: bytes) -> Optional[Found]:
        from apache_beam.io.filesystems import FileSystems
        found = self.read()
        if found is None or found.data != stale.data:
            return None
        FileSystems.delete([self.path])
        return self.create(data)

    def refresh(self, found: Found, data: bytes) -> Found:
        self._write(data)
        return Found(data, time.time())

    def remove(self, found: Found) -> None:
        from apache_beam.io.filesystems import FileSystems
        FileSystems.delete([self.path])


def store_for(path: str) -> LockStore:
    """The store that creates ``path`` as atomically as its file system
    allows."""
    if "://" not in path:
        return LocalStore(path)
    if path.startswith("gs://"):
        try:
            return GcsStore(path)
        except ImportError:
            _LOG.warning("google-cloud-storage is not installed: the lock "
                         "%s is created without a precondition", path)
    return BeamStore(path)


def read_owner(output: str) -> tuple[Optional[LockOwner], Optional[str]]:
    """(the run holding ``output``'s lock, or None; why it is stale, or
    None while it may be live).  (None, None): no lock."""
    try:
        found = store_for(lock_path(output)).read()
    except Exception:  # pylint: disable=broad-except
        return None, None
    if found is None:
        return None, None
    owner = LockOwner.parse(found.data)
    return owner, stale_reason(owner, found.modified, time.time(),
                               socket.gethostname())


class OutputLock:
    """``with OutputLock(output, run_id):`` -- this run alone writes under
    ``output`` until the block ends, however it ends.

    Raises ``OutputLocked`` when another live run holds the lock and
    ``OutputNotWritable`` when the lock cannot be created there.
    """

    def __init__(self, output: str, run_id: str,
                 lease_seconds: float = LEASE_SECONDS,
                 refresh_seconds: float = REFRESH_SECONDS,
                 store: Optional[LockStore] = None):
        self.output = output
        self.run_id = run_id
        self.path = lock_path(output)
        self._lease = lease_seconds
        self._refresh_every = refresh_seconds
        self._store = store
        self._found: Optional[Found] = None
        self._lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._started_at = datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds")

    def _record(self) -> LockOwner:
        pid = os.getpid()
        return LockOwner(self.run_id, self.output, pid, socket.gethostname(),
                         self._started_at, round(time.time(), 3),
                         self._lease, _process_start(pid))

    def _unwritable(self, err: BaseException) -> OutputNotWritable:
        return OutputNotWritable(
            f"--output {self.output}: cannot write there ({self.path}: "
            f"{' '.join(f'{type(err).__name__}: {err}'.split())[:300]})")

    def acquire(self) -> "OutputLock":
        """Creates the lock, taking over a stale one."""
        try:
            if self._store is None:
                self._store = store_for(self.path)
            for _ in range(3):
                created = self._store.create(self._record().to_bytes())
                if created is not None:
                    self._held(created)
                    return self
                found = self._store.read()
                if found is None:
                    continue  # released meanwhile
                owner = LockOwner.parse(found.data)
                why = stale_reason(owner, found.modified, time.time(),
                                   socket.gethostname())
                holder = (owner.describe() if owner else
                          f"an unreadable lock {self.path}")
                if why is None:
                    raise OutputLocked(
                        f"--output {self.output} is in use by {holder}; "
                        f"wait for it to finish (if it is gone, remove "
                        f"{self.path})")
                _LOG.warning("Taking over the lock %s of %s: %s", self.path,
                             holder, why)
                taken = self._store.take_over(found,
                                              self._record().to_bytes())
                if taken is not None:
                    self._held(taken)
                    return self
        except (OutputLocked, OutputNotWritable):
            raise
        except Exception as err:  # pylint: disable=broad-except
            raise self._unwritable(err) from err
        raise OutputLocked(f"--output {self.output}: other runs keep taking "
                           f"the lock {self.path}; try again")

    def _held(self, found: Found) -> None:
        """Keeps the lock's lease fresh until ``release``."""
        self._found = found
        self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                        name=f"lock {self.path}")
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self._refresh_every):
            try:
                self.refresh()
            except LockLost as err:
                self._lost = str(err)
                _LOG.error("Lost the lock %s: %s", self.path, err)
                return
            except Exception as err:  # pylint: disable=broad-except
                _LOG.warning("Could not refresh the lock %s (%s: %s)",
                             self.path, type(err).__name__, err)

    def _owner_now(self) -> Optional[LockOwner]:
        found = self._store.read()
        return LockOwner.parse(found.data) if found else None

    def refresh(self) -> None:
        """Renews the lease; ``LockLost`` when another run holds it now."""
        owner = self._owner_now()
        if owner is None or owner.run_id != self.run_id:
            raise LockLost(f"it is now held by "
                           f"{owner.describe() if owner else 'no run'}")
        self._found = self._store.refresh(self._found,
                                          self._record().to_bytes())

    def check_held(self) -> None:
        """Raises ``LockLost`` unless this run still holds the lock (called
        before anything is removed or published)."""
        if self._lost:
            raise LockLost(f"{self.path}: {self._lost}")
        owner = self._owner_now()
        if owner is None or owner.run_id != self.run_id:
            raise LockLost(f"{self.path} is now held by "
                           f"{owner.describe() if owner else 'no run'}")

    def release(self) -> None:
        """Stops refreshing and removes the lock if it is still this run's;
        never raises (it runs while another error may be propagating)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._found is None:
            return
        try:
            found = self._store.read()
            owner = LockOwner.parse(found.data) if found else None
            if owner is not None and owner.run_id == self.run_id:
                self._store.remove(found)
        except Exception as err:  # pylint: disable=broad-except
            _LOG.warning("Could not remove the lock %s (%s: %s)", self.path,
                         type(err).__name__, err)
        self._found = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()
