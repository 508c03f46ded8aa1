"""Where a model is: local directories, TensorFlow file-system paths
(``gs://...``) and TF Hub / Kaggle handles, resolved to a SavedModel
directory (``resolve_model_path``), and joining paths of either kind
(``join_path``).

TF Hub handles need the optional ``tensorflow_hub`` package; a pre-filled
``TFHUB_CACHE_DIR`` makes them work offline.
"""

from __future__ import annotations

import logging
import os

from model.errors import ModelFormatError, one_line

_LOG = logging.getLogger(__name__)

# Handle prefixes that only tensorflow_hub can turn into a local directory.
_HUB_URL_PREFIXES = ("http://", "https://")
_HUB_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def join_path(base: str, *parts: str) -> str:
    """Join path parts for local paths and URL-like paths (``gs://``,
    ``ram://``) alike; URL paths always use ``/``."""
    if "://" in base:
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def is_hub_handle(handle: str) -> bool:
    """Whether ``handle`` needs ``tensorflow_hub`` to become a directory:
    an http(s) URL (tfhub.dev, Kaggle model URLs, mirrors) or a ``gs://``
    tarball."""
    if handle.startswith(_HUB_URL_PREFIXES):
        return True
    return handle.startswith("gs://") and handle.endswith(_HUB_ARCHIVE_SUFFIXES)


def resolve_model_path(handle: str) -> str:
    """The SavedModel directory that ``handle`` names.

    Local paths and TensorFlow file-system paths (``gs://bucket/model``) are
    returned unchanged.  TF Hub handles (``https://tfhub.dev/...``, Kaggle
    model URLs ``https://www.kaggle.com/models/...``) go through
    ``tensorflow_hub.resolve``, which downloads into ``TFHUB_CACHE_DIR`` or
    reuses what is already cached there (so a pre-filled cache works
    offline).

    Raises:
      ModelFormatError: a hub handle without ``tensorflow_hub`` installed, or
        one that cannot be resolved (network, unknown model).
    """
    if not is_hub_handle(handle):
        return handle
    try:
        import tensorflow_hub as hub
    except ImportError as err:
        raise ModelFormatError(
            f"{handle} is a TF Hub handle but tensorflow_hub is not "
            "installed: pip install tensorflow_hub, or download the model "
            "and pass its directory") from err
    try:
        path = hub.resolve(handle)
    except Exception as err:  # network, HTTP, tar and file-system errors
        raise ModelFormatError(
            f"cannot resolve TF Hub handle {handle}: "
            f"{type(err).__name__}: {one_line(err)}") from err
    _LOG.info("Resolved %s to %s", handle, path)
    return path
