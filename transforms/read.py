"""Reading documents: file patterns in, ``Document`` elements out.

Each matched file is read through Beam's file systems (local paths,
``gs://`` paths; a directory stands for the files directly inside it),
decompressed by suffix and split into records by its format
(``transforms.sources``: plain text, JSONL, CSV/TSV, Parquet).  A record
becomes a ``Document`` with an id (``--id_field``, or one derived from the
file name and the content, see ``transforms.identity``) and a content hash.
A record that cannot be used (undecodable or mis-decoded bytes, malformed
JSON or CSV, a missing or non-string text field, an id that is neither a
string nor an integer, a text over ``--max_text_chars``) becomes a
``DeadLetter`` instead of failing the run; so does the rest of a file that
breaks off (a truncated or corrupt compressed stream).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
from typing import Any, Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems

from transforms.embedding_files import LOCK_SUFFIX, run_prefix_of_manifest
from transforms.identity import content_hash, derived_id
from transforms.misdecoding import MISDECODED
from transforms.records import (DEAD_LETTER_TAG, METRICS_NAMESPACE,
                                DeadLetter, Document, WithDeadLetters)
from transforms.sources import (ENCODINGS, INPUT_FORMATS, RawRecord,
                                compressed_fault, decompressed,
                                detect_format, is_compressed, iter_records)

__all__ = ["INPUT_FORMATS", "ENCODINGS", "ReadDocuments", "ReadSettings",
           "RecordParser", "check_patterns_match", "detect_format",
           "get_field", "match_input"]

_LOG = logging.getLogger("transforms.read")

# Longest text (in characters) embedded by default; longer ones are dead
# letters (--max_text_chars).
DEFAULT_MAX_TEXT_CHARS = 1_000_000


def max_line_bytes(max_text_chars: int) -> int:
    """Longest input line kept in memory: room for a JSONL line whose text is
    at the size cap with every character escaped (``\\uXXXX``), at least
    1 MiB."""
    return max(8 * max_text_chars, 1 << 20)


_GLOB_CHARS = "*?["


def _directory(pattern: str) -> Optional[str]:
    """The directory ``pattern`` names, or None when it names files.

    A pattern without glob characters is a directory when it ends with a
    slash, is a local directory, or (on object stores, which have no
    directories) matches no object of that name.
    """
    if any(char in pattern for char in _GLOB_CHARS):
        return None
    if pattern.endswith(("/", "\\")):
        return pattern.rstrip("/\\") or pattern
    if "://" not in pattern:
        return pattern if os.path.isdir(pattern) else None
    return None if FileSystems.match([pattern])[0].metadata_list else pattern


def _run_outputs(files: list[FileMetadata]) -> list[str]:
    """The name prefixes (``emb-``) of earlier runs' outputs among ``files``:
    each run that published there left ``<prefix>manifest.json``."""
    prefixes = []
    for meta in files:
        name = posixpath.basename(meta.path.replace("\\", "/"))
        prefix = run_prefix_of_manifest(name)
        if prefix is None:
            continue
        try:
            with FileSystems.open(meta.path) as handle:
                manifest = json.loads(handle.read(1 << 24).decode("utf-8"))
        except (OSError, ValueError):
            continue  # not ours: read it like any other file
        if isinstance(manifest, dict) and "manifest_version" in manifest \
                and "run_id" in manifest:
            prefixes.append(prefix)
    return prefixes


def _is_run_lock(meta: FileMetadata) -> bool:
    """Whether ``meta`` is a run's lease file (``pipeline.lock``): named
    ``*.lock`` and holding a JSON object with the owner's run id and pid."""
    if not meta.path.endswith(LOCK_SUFFIX) or meta.size_in_bytes > 1 << 16:
        return False
    try:
        with FileSystems.open(meta.path) as handle:
            owner = json.loads(handle.read().decode("utf-8"))
    except (OSError, ValueError):
        return False  # gone meanwhile, or not ours: read it like any other
    return isinstance(owner, dict) and "run_id" in owner and "pid" in owner


def match_input(pattern: str) -> list[FileMetadata]:
    """The files one ``--input`` pattern stands for.

    A file or glob matches as Beam matches it.  A directory stands for the
    files directly inside it (not those in subdirectories: ``dir/**`` reads
    those), less hidden ones (``.name``, ``_name``: ``.DS_Store``,
    ``_SUCCESS``), the outputs of runs published there (``<output>-*``
    next to a manifest) and the lease files of runs writing there
    (``<output>.lock``), so ``--input corpus/`` reads the corpus and
    nothing else.
    """
    directory = _directory(pattern)
    if directory is None:
        return FileSystems.match([pattern])[0].metadata_list
    listing = FileSystems.match(
        [FileSystems.join(directory, "*")])[0].metadata_list
    outputs = tuple(_run_outputs(listing))
    kept = []
    for meta in listing:
        name = posixpath.basename(meta.path.replace("\\", "/"))
        if name and not name.startswith((".", "_")) and not (
                outputs and name.startswith(outputs)) \
                and not _is_run_lock(meta):
            kept.append(meta)
    if len(kept) < len(listing):
        _LOG.info("%s: reading %d of its %d files (skipping hidden files "
                  "and earlier runs' outputs)", pattern, len(kept),
                  len(listing))
    return kept


def check_patterns_match(patterns: Sequence[str]) -> list[FileMetadata]:
    """The files ``patterns`` stand for (``match_input``); fails fast,
    before any worker starts, when a pattern stands for none."""
    matched = [(pattern, match_input(pattern)) for pattern in patterns]
    empty = [pattern for pattern, files in matched if not files]
    if empty:
        raise FileNotFoundError(
            "--input matched no files: " + ", ".join(empty))
    return [meta for _, files in matched for meta in files]


def get_field(record: dict, dotted: str) -> Any:
    """``record[dotted]`` if that key exists (CSV columns may contain dots),
    else ``record['a']['b']`` for ``dotted='a.b'``; ``KeyError`` if absent."""
    if dotted in record:
        return record[dotted]
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


# Floats up to this size hold every integer exactly.
_EXACT_FLOAT_INT = 2**53


def id_text(value: Any) -> Optional[str]:
    """The document id a field value gives: a string as it is, an integer
    (or a float with an integral value, as pandas writes integer columns
    with gaps) as its decimal digits, None for null or "" (the id is then
    derived).  ``TypeError`` (saying what the value is) for anything else:
    booleans, objects, arrays, fractions, dates..., whose text form would
    be an id nobody can look up."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer() \
            and abs(value) <= _EXACT_FLOAT_INT:
        return str(int(value))
    kind = {bool: "a boolean", dict: "an object", list: "an array",
            float: "a number with a fraction or out of range"}.get(
                type(value), type(value).__name__)
    shown = json.dumps(value, ensure_ascii=False, default=str)
    if len(shown) > 40:
        shown = shown[:40] + "…"
    raise TypeError(f"is {kind} ({shown}), not a string or an integer")


def _has_surrogates(text: str) -> bool:
    """Whether ``text`` holds unpaired surrogates (``"\\udc80"`` in JSON),
    which no output format can store."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class RecordParser:
    """Turns a ``RawRecord`` into a ``Document`` or a ``DeadLetter``.

    Plain Python, so every bad-input rule is testable without a pipeline.
    """

    def __init__(self, id_field: str = "id", text_field: str = "text",
                 max_text_chars: int = DEFAULT_MAX_TEXT_CHARS):
        self.id_field = id_field
        self.text_field = text_field
        self.max_text_chars = max_text_chars

    def parse(self, path: str, fmt: str,
              record: RawRecord) -> Document | DeadLetter:
        """The record as a document, or a dead letter saying why not."""
        if record.error:
            return DeadLetter("read", record.error, path, record.line, "",
                              record.excerpt)
        if fmt == "text":
            return self._document(path, record, None, record.text)
        fields = record.fields
        if fields is None:
            try:
                fields = json.loads(record.text)
            except ValueError as err:
                return self._dead(path, record, f"malformed JSON: {err}")
            if not isinstance(fields, dict):
                return self._dead(path, record, "JSON line is not an object")
        return self._from_fields(path, record, fields)

    def _from_fields(self, path: str, record: RawRecord,
                     fields: dict) -> Document | DeadLetter:
        try:
            doc_id = id_text(get_field(fields, self.id_field))
        except KeyError:
            doc_id = None
        except TypeError as err:
            return self._dead(path, record,
                              f"id field '{self.id_field}' {err}")
        try:
            body = get_field(fields, self.text_field)
        except KeyError:
            return self._dead(path, record, f"missing text field "
                              f"'{self.text_field}'", doc_id)
        if not isinstance(body, str):
            return self._dead(path, record, f"text field '{self.text_field}' "
                              f"is {type(body).__name__}, not a string",
                              doc_id)
        return self._document(path, record, doc_id, body)

    def _document(self, path: str, record: RawRecord, doc_id: str | None,
                  text: str) -> Document | DeadLetter:
        if len(text) > self.max_text_chars:
            return self._dead(path, record, f"text of {len(text)} characters "
                              f"is over --max_text_chars "
                              f"{self.max_text_chars}", doc_id, text)
        if _has_surrogates(text) or (doc_id and _has_surrogates(doc_id)):
            return self._dead(path, record, "text or id holds unpaired "
                              "surrogate escapes", "", text)
        digest = content_hash(text)
        return Document(doc_id or derived_id(path, digest), text, path,
                        record.line, digest, record.nbytes)

    @staticmethod
    def _dead(path: str, record: RawRecord, reason: str,
              doc_id: str | None = None, excerpt: str = "") -> DeadLetter:
        if not excerpt:
            excerpt = record.text if record.text is not None else json.dumps(
                record.fields, ensure_ascii=False, default=str)
        return DeadLetter("read", reason, path, record.line, doc_id or "",
                          excerpt)


class _ParseFile(beam.DoFn):
    """Turns one matched file into ``Document`` and ``DeadLetter`` elements."""

    def __init__(self, input_format: str, parser: RecordParser,
                 encoding: str):
        self._input_format = input_format
        self._parser = parser
        self._encoding = encoding
        counter = beam.metrics.Metrics.counter
        self._read = counter(METRICS_NAMESPACE, "documents_read")
        self._failed = counter(METRICS_NAMESPACE, "documents_failed")
        self._bytes = counter(METRICS_NAMESPACE, "bytes_read")

    def process(self, readable: fileio.ReadableFile) -> Iterator[Any]:
        path = readable.metadata.path
        fmt = detect_format(path, self._input_format)
        fields = (self._parser.id_field, self._parser.text_field)
        line = records = misdecoded = 0
        try:
            fault = is_compressed(path) and self._corrupt(readable)
            if fault:
                yield self._emit(DeadLetter(
                    "read", f"file unreadable after record 0: {fault} "
                    "(corrupt compressed data: none of the file is read)",
                    path, 1), 0)
                return
            # Raw bytes: ``decompressed`` notices a stream that breaks off.
            with self._open(readable) as raw:
                for record in iter_records(
                        decompressed(raw, path), fmt, self._encoding,
                        max_line_bytes(self._parser.max_text_chars),
                        readable.metadata.size_in_bytes, fields):
                    line = record.line
                    records += 1
                    misdecoded += bool(record.error) and \
                        record.error.startswith(MISDECODED)
                    yield self._emit(self._parser.parse(path, fmt, record),
                                     record.nbytes)
        except Exception as err:  # a broken file must not stop the run
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            yield self._emit(DeadLetter(
                "read", f"file unreadable after record {line}: {reason}",
                path, line + 1), 0)
        if misdecoded:
            _LOG.warning("%s: %d of %d records look mis-decoded as %s: "
                         "check --input_encoding", path, misdecoded, records,
                         self._encoding)

    @staticmethod
    def _open(readable: fileio.ReadableFile) -> Any:
        """The file's bytes as stored (``transforms.sources`` decompresses)."""
        return readable.open(compression_type=CompressionTypes.UNCOMPRESSED)

    def _corrupt(self, readable: fileio.ReadableFile) -> Optional[str]:
        """Why a compressed file is corrupt (a first pass through it), as
        one bounded line; None when it is intact or only cut off."""
        with self._open(readable) as raw:
            fault = compressed_fault(raw, readable.metadata.path)
        return " ".join(fault.split())[:300] if fault else None

    def _emit(self, item: Document | DeadLetter, nbytes: int) -> Any:
        self._read.inc()
        self._bytes.inc(nbytes)
        if isinstance(item, DeadLetter):
            self._failed.inc()
            return beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, item)
        return item


@dataclasses.dataclass(frozen=True)
class ReadSettings:
    """How input records become documents (the read stage's flags:
    ``--input_format``, ``--id_field``, ``--text_field``,
    ``--input_encoding``, ``--max_text_chars``); checked once, here."""
    input_format: str = "auto"
    id_field: str = "id"
    text_field: str = "text"
    input_encoding: str = "utf-8"
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS

    def __post_init__(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, "
                             f"not {self.input_format!r}")
        if self.input_encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, "
                             f"not {self.input_encoding!r}")
        if self.max_text_chars < 1:
            raise ValueError("max_text_chars must be positive")


class ReadDocuments(beam.PTransform):
    """Reads documents from file patterns.

    Returns ``(documents, dead_letters)``: ``Document`` elements, and
    ``DeadLetter`` elements for records that could not be used.  Documents
    are reshuffled after reading so that the expensive stages spread over
    all workers even when the corpus is one big file.
    """

    def __init__(self, patterns: Sequence[str],
                 settings: ReadSettings = ReadSettings()):
        super().__init__()
        self._patterns = list(patterns)
        self._parse = _ParseFile(
            settings.input_format,
            RecordParser(settings.id_field, settings.text_field,
                         settings.max_text_chars),
            settings.input_encoding)

    def expand(self, pbegin: beam.pvalue.PBegin) -> Any:
        parsed = (
            pbegin
            | "Patterns" >> beam.Create(self._patterns)
            | "Match" >> beam.FlatMap(match_input)
            | "Open" >> fileio.ReadMatches(
                compression=CompressionTypes.UNCOMPRESSED)
            | "Parse" >> WithDeadLetters(self._parse))
        documents, dead_letters = parsed
        documents = documents | "Spread" >> beam.Reshuffle()
        return documents, dead_letters
