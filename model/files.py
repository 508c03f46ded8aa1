"""Hashes of a model's files (local or TensorFlow file-system paths):
the SavedModel's checkpoint files (``variables_files``), which key its
converted OpenVINO IR and enter the run's model fingerprint
(``pipeline.fingerprint``), and any file's content (``hash_files``,
``file_sha256``).  Hashes are cached per process by file paths, sizes and
modification times, and hashes of local files also on disk (``digests/``
in the project's cache directory), keyed as well by each file's inode and
change time, which every write moves: BERT-Base's 400 MB of variables
take about 0.5 s to hash, paid by the launcher and by each worker process
on every run otherwise."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import types
import uuid
from typing import Any, Optional

_CHUNK = 8 << 20
_CACHE: dict[tuple, str] = {}


class _LocalFiles:
    """The three ``tf.io.gfile`` calls this module makes, for local paths,
    without TensorFlow: an OpenVINO worker hashes its model without
    importing TensorFlow (about 660 MB of resident memory)."""
    GFile = staticmethod(open)
    glob = staticmethod(glob.glob)

    @staticmethod
    def stat(path: str) -> Any:
        found = os.stat(path)
        return types.SimpleNamespace(
            length=found.st_size, mtime_nsec=found.st_mtime_ns,
            local=(os.path.abspath(path), found.st_dev, found.st_ino,
                   found.st_ctime_ns))


def _gfile(path: str) -> Any:
    """What reads ``path``: ``tf.io.gfile`` for a file-system URL
    (``gs://...``), ``_LocalFiles`` for a local path."""
    if "://" not in path:
        return _LocalFiles
    import tensorflow as tf
    return tf.io.gfile


def _stamp(paths: list[str]) -> tuple:
    """(path, size, mtime) of each file: the cache key of their hash."""
    stamps = []
    for path in paths:
        stat = _gfile(path).stat(path)
        stamps.append((path, stat.length, stat.mtime_nsec)
                      + getattr(stat, "local", ()))
    return tuple(stamps)


def _memo_path(key: tuple) -> Optional[str]:
    """Where the on-disk hash of local files with stamps ``key`` is kept;
    None when a file is remote (a file-system URL, as ``_gfile`` tells
    them apart: only local stamps carry an inode and change time)."""
    stamps, _ = key
    if not stamps or any("://" in stamp[0] for stamp in stamps):
        return None
    from model.runtime import default_cache_dir
    name = hashlib.sha256(json.dumps(key).encode("utf-8")).hexdigest()
    return os.path.join(default_cache_dir(), "digests", name[:32])


def _read_memo(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    try:
        with open(path, encoding="ascii") as handle:
            value = handle.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value if len(value) == 32 else None


def write_whole(path: str, text: str) -> None:
    """Writes ``text`` to the local file ``path`` whole: to a private file
    beside it, then renamed over it, so a reader sees the old file or the
    new one."""
    partial = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(partial, path)


def write_cache_file(path: str, text: str) -> None:
    """Writes the cache file ``path`` whole (``write_whole``), making its
    directory; a cache that cannot be written costs the work it would
    have saved next time, nothing else."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_whole(path, text)
    except OSError:
        pass


def hash_files(paths: list[str], with_names: bool = True) -> str:
    """BLAKE2b-128 over the contents of files, in order, and their base
    names when ``with_names`` (a vocabulary counts by content alone)."""
    key = (_stamp(paths), with_names)
    if key in _CACHE:
        return _CACHE[key]
    memo = _memo_path(key)
    known = _read_memo(memo)
    if known is not None:
        _CACHE[key] = known
        return known
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        if with_names:
            digest.update(path.rsplit("/", 1)[-1].encode("utf-8") + b"\0")
        with _gfile(path).GFile(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    _CACHE[key] = digest.hexdigest()
    if memo is not None:
        write_cache_file(memo, _CACHE[key])
    return _CACHE[key]


def file_sha256(path: str) -> str:
    """SHA-256 of a file's content, hex (a vocabulary's, for the output's
    self-description: a hash anyone can recompute with ``sha256sum``)."""
    digest = hashlib.sha256()
    with _gfile(path).GFile(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_digest(model_dir: str) -> str:
    """32 hex digits over the SavedModel's graph and variables: the key of
    its converted IR, the source an int8 model records, and the key of
    what the launcher learned about it (``model.facts``)."""
    graph = model_dir.rstrip("/") + "/saved_model.pb"
    return hash_files([graph] + variables_files(model_dir))


def variables_files(model_dir: str) -> list[str]:
    """The SavedModel's checkpoint files, sorted; raises if there are none."""
    pattern = model_dir.rstrip("/") + "/variables/variables.*"
    files = sorted(_gfile(pattern).glob(pattern))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no variables/variables.* "
                                "files to fingerprint")
    return files
