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

A run touches only its own names: ``<output>-SSSSS-of-NNNNN.<ext>`` with
Beam's exact shard digits, its ``-documents-``, ``-errors-``, ``-deleted-``
shards, ``<output>-index/part-*``, its summary and manifest, its lock
(``pipeline.lock``) and ``<output>.tmp-<run id>`` directories, matched
strictly (a run at ``out/emb`` never takes ``out/emb-2024-05-02-...`` or
``out/emb.tmp-foo-index/`` for its own).  ``check_output_prefix`` refuses
the prefixes whose names would still be ambiguous.
"""

from __future__ import annotations

import datetime
import glob
import json
import logging
import os
import posixpath
import re
import secrets
from typing import Any, Optional

from apache_beam.io.filesystems import FileSystems

from pipeline.lock import read_owner
from transforms.embedding_files import (DOCUMENTS_SUFFIX, INDEX_SUFFIX,
                                        STAGING_MARK, output_regex)

_LOG = logging.getLogger("pipeline.publish")

# What new_run_id makes: staging directories are recognised by it exactly.
RUN_ID_REGEX = r"\d{8}T\d{6}Z-[0-9a-f]{6}"
GLOB_CHARS = "*?[]"


def new_run_id(now: datetime.datetime | None = None) -> str:
    """``20240501T020000Z-1a2b3c``: UTC start time plus 6 random hex."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def check_output_prefix(output: str) -> None:
    """Raises ``ValueError`` (one line) for an ``--output`` that cannot be
    a prefix of this run's files alone.

    Glob characters would make the run's own clean-up patterns match other
    files; a trailing separator names a directory, so files would be called
    ``-00000-of-00001.parquet``; and two reserved endings make one run's
    names another's: ``P-documents`` writes ``P-documents-00000-of-...``,
    the document vectors of ``P``, and ``P-index/part`` writes ``P``'s
    index files.
    """
    found = sorted({c for c in output if c in GLOB_CHARS})
    if found:
        raise ValueError(f"--output {output}: an output prefix must not "
                         f"hold the glob characters {' '.join(found)}")
    base = posixpath.basename(output.replace(os.sep, "/"))
    if base in ("", ".", ".."):
        raise ValueError(f"--output {output}: give a file name prefix, "
                         "e.g. out/news/emb, not a directory")
    for reserved in (DOCUMENTS_SUFFIX, INDEX_SUFFIX):
        if output.replace(os.sep, "/").endswith(reserved):
            raise ValueError(f"--output {output}: a prefix ending in "
                             f"{reserved} names another run's files; choose "
                             "another name")


def final_name(path: str, staged_prefix: str, output: str) -> str:
    """The published name of staged file ``path``."""
    if not path.startswith(staged_prefix):
        raise ValueError(f"{path} is not under {staged_prefix}")
    return output + path[len(staged_prefix):]


def staging_run_id(output: str, directory: str) -> Optional[str]:
    """The run id of ``directory`` if it is a staging directory of a run at
    ``output`` (``<output>.tmp-<run id>`` exactly), else None."""
    match = re.fullmatch(re.escape(output + STAGING_MARK)
                         + f"({RUN_ID_REGEX})", directory.rstrip("/"))
    return match.group(1) if match else None


def clean_stale(output: str, keep_run_id: str = "") -> list[str]:
    """Removes staging directories of earlier runs at ``output``.

    Returns the directories removed.  A run killed before publishing leaves
    only such a directory behind, never files under the final names.  Only
    directories named exactly ``<output>.tmp-<run id>`` are taken, and
    never the one of the run holding the output's live lock.
    """
    pattern = f"{output}{STAGING_MARK}*/**"
    files = FileSystems.match([pattern])[0].metadata_list
    start = len(output) + len(STAGING_MARK)
    found = {m.path[:m.path.index("/", start)] for m in files
             if "/" in m.path[start:]}
    if "://" not in output:  # local: a directory may hold no file yet
        found.update(p for p in glob.glob(glob.escape(output + STAGING_MARK)
                                          + "*") if os.path.isdir(p))
    keep = {keep_run_id}
    owner, stale_why = read_owner(output)
    if owner is not None and stale_why is None:
        keep.add(owner.run_id)  # a live run's, whoever calls this
    stale = sorted(d for d in found
                   if staging_run_id(output, d) not in keep | {None})
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


def own_files(patterns: list[str]) -> list[str]:
    """The files ``patterns`` (``transforms.embedding_files.output_patterns``
    globs) match that are really theirs (``output_regex``), not a
    neighbouring prefix's."""
    return [m.path for pattern, result in zip(
                patterns, FileSystems.match(patterns))
            for m in result.metadata_list
            if output_regex(pattern).fullmatch(m.path)]


def _remove_existing(final_patterns: list[str], manifest: str) -> None:
    """Removes an earlier complete run at the same output: its manifest
    first, so that it is never left describing files that are gone."""
    if FileSystems.exists(manifest):
        FileSystems.delete([manifest])
    old = own_files(final_patterns)
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
