"""Atomic output: a run writes under a staging prefix and publishes at the end.

The pipeline writes every file under ``<output>.tmp-<run_id>/``: Beam's
sinks finalize each output on their own, so a run that fails (or is killed)
between two of them would otherwise leave a half-written dataset under the
final names.  Only after the pipeline succeeded and its counts were checked
does the launcher rename the staged files to their final names, and it
writes the manifest (``<output>-manifest.json``) last: a manifest marks a
complete run.  Before renaming, the files of an earlier run at the same
output (and its manifest first) are removed, so a re-run replaces a
previous result instead of mixing shard sets.  Staging directories left by
killed runs are removed by the next run with the same output.
"""

from __future__ import annotations

import datetime
import glob
import json
import logging
import os
import posixpath
import secrets
from typing import Any

from apache_beam.io.filesystems import FileSystems

_LOG = logging.getLogger("pipeline.publish")

STAGING_MARK = ".tmp-"


def new_run_id(now: datetime.datetime | None = None) -> str:
    """``20240501T020000Z-1a2b3c``: UTC start time plus 6 random hex."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def staging_dir(output: str, run_id: str) -> str:
    """``<output>.tmp-<run_id>``: the directory a run writes into."""
    return f"{output}{STAGING_MARK}{run_id}"


def staging_prefix(output: str, run_id: str) -> str:
    """The output prefix inside the staging directory: files keep their
    final base names there."""
    return f"{staging_dir(output, run_id)}/{posixpath.basename(output)}"


def final_name(path: str, staged_prefix: str, output: str) -> str:
    """The published name of staged file ``path``."""
    if not path.startswith(staged_prefix):
        raise ValueError(f"{path} is not under {staged_prefix}")
    return output + path[len(staged_prefix):]


def clean_stale(output: str, keep_run_id: str = "") -> list[str]:
    """Removes staging directories of earlier runs at ``output``.

    Returns the directories removed.  A run killed before publishing leaves
    only such a directory behind, never files under the final names.
    """
    pattern = f"{output}{STAGING_MARK}*/**"
    files = FileSystems.match([pattern])[0].metadata_list
    start = len(output) + len(STAGING_MARK)
    found = {m.path[:m.path.index("/", start)] for m in files}
    if "://" not in output:  # local: a directory may hold no file yet
        found.update(p for p in glob.glob(glob.escape(output + STAGING_MARK)
                                          + "*") if os.path.isdir(p))
    stale = sorted(d for d in found if d != staging_dir(output, keep_run_id))
    if stale:
        _LOG.info("Removing staging directories of unfinished runs: %s",
                  ", ".join(stale))
    for directory in stale:
        discard(directory)
    return stale


def discard(directory: str) -> None:
    """Removes a staging directory and everything under it, if it exists.

    Files go first (object stores have no directories to remove); on a
    local file system the emptied directory tree goes after them.
    """
    files = [m.path for m in
             FileSystems.match([directory + "/**"])[0].metadata_list]
    if files:
        FileSystems.delete(files)
    if FileSystems.exists(directory):
        FileSystems.delete([directory])


def write_json(record: dict[str, Any], path: str) -> None:
    """Writes ``record`` as indented UTF-8 JSON to ``path``."""
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(record, indent=2,
                                ensure_ascii=False).encode("utf-8"))


def _ensure_parent(path: str) -> None:
    parent = FileSystems.split(path)[0]
    if parent and not FileSystems.exists(parent):
        try:
            FileSystems.mkdirs(parent)
        except IOError:  # created meanwhile, or a store without directories
            pass


def _remove_existing(final_patterns: list[str], manifest: str) -> None:
    """Removes an earlier complete run at the same output: its manifest
    first, so that it is never left describing files that are gone."""
    if FileSystems.exists(manifest):
        FileSystems.delete([manifest])
    old = [m.path for r in FileSystems.match(final_patterns)
           for m in r.metadata_list]
    if old:
        _LOG.info("Replacing %d files of an earlier run at this output",
                  len(old))
        FileSystems.delete(old)


def publish(staged: list[str], staged_prefix: str, output: str,
            final_patterns: list[str], manifest: str) -> list[str]:
    """Renames ``staged`` files to their final names; ``manifest`` (one of
    them) goes last.  Returns the final names in the order given."""
    final = [final_name(p, staged_prefix, output) for p in staged]
    final_manifest = final_name(manifest, staged_prefix, output)
    _remove_existing(final_patterns, final_manifest)
    pairs = [(s, f) for s, f in zip(staged, final) if s != manifest]
    for _, target in pairs:
        _ensure_parent(target)
    if pairs:
        FileSystems.rename([s for s, _ in pairs], [f for _, f in pairs])
    FileSystems.rename([manifest], [final_manifest])
    return final
