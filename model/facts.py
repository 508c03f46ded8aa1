"""What the launcher learns from a SavedModel with TensorFlow, kept by the
model's content, so that a later launch of the same model needs neither
TensorFlow nor the model restored.

Before any worker starts, the launcher reads the embedding tables' shapes
and the ``do_lower_case`` variable from the checkpoint, the vocab asset's
name from ``saved_model.pb``, and restores the model to call it once
(``pipeline.preflight.resolve_model``).  On BERT-Base that is about 10 s
of every launch (importing TensorFlow about 6 s, restoring and calling
the model about 3 s) for answers that only change with the model's files.

Each answer is kept in ``facts/<digest>-tf<version>.json`` under the
project's cache directory: the digest covers ``saved_model.pb`` and the
variables (``model.files.model_digest``, itself kept by file stamps), and
the TensorFlow version is the one that read the answers, so a changed
model or another TensorFlow reads them again.  Only answers are kept,
never errors: a model that failed a check fails it again, with the same
message.  Only local models are kept (a remote model's digest would mean
reading all of it), and a cache that cannot be read or written costs the
reading, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")

FACTS_SUBDIR = "facts"
# Version of what the answers mean: a new one reads every model again.
FACTS_VERSION = 1


def _tensorflow_version() -> str:
    try:
        return metadata.version("tensorflow")
    except metadata.PackageNotFoundError:
        return "none"


def facts_file(model_dir: str) -> Optional[str]:
    """Where the answers about the local SavedModel at ``model_dir`` are
    kept; None for a remote path or a directory that is not a readable
    SavedModel (its checks then run, and fail, as without a cache)."""
    from model.files import model_digest
    from model.runtime import default_cache_dir
    if "://" in model_dir:
        return None
    try:
        digest = model_digest(model_dir)
    except OSError:  # no saved_model.pb or variables, or unreadable files
        return None
    name = hashlib.sha256(
        f"{digest} {FACTS_VERSION}".encode("ascii")).hexdigest()[:32]
    return os.path.join(default_cache_dir(), FACTS_SUBDIR,
                        f"{name}-tf{_tensorflow_version()}.json")


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            known = json.load(handle)
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _keep(path: str, name: str, value: Any) -> None:
    """Adds ``name: value`` to the answers at ``path`` (whole-file writes:
    a concurrent launch may drop another's new answer, never garble it)."""
    from model.files import write_cache_file
    known = _read(path)
    known[name] = value
    try:
        text = json.dumps(known, sort_keys=True)
    except (TypeError, ValueError):
        return  # not kept: read again next time
    write_cache_file(path, text)


def remembered(model_dir: str, name: str, read: Callable[[], T],
               encode: Callable[[T], Any] = lambda value: value,
               decode: Callable[[Any], T] = lambda value: value) -> T:
    """The answer ``name`` about the SavedModel at ``model_dir``: kept from
    an earlier ``read()`` of this model's files, else ``read()`` now (an
    error propagates, and is not kept).  ``encode``/``decode`` turn the
    answer into JSON values and back."""
    path = facts_file(model_dir)
    if path is not None:
        known = _read(path)
        if name in known:
            try:
                return decode(known[name])
            except (TypeError, ValueError, KeyError):
                pass  # an answer of another shape: read it again
    value = read()
    if path is not None:
        _keep(path, name, encode(value))
    return value
