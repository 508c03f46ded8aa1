"""Reading documents: file patterns in, ``Document`` elements out.

Each matched file is read line by line (plain text: one document per line;
JSONL: one JSON object per line), through Beam's file systems, so local
paths, ``gs://`` paths and gzip/bzip2 files all work.  A line that cannot be
decoded or parsed becomes a ``DeadLetter`` instead of failing the run.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Sequence

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.records import METRICS_NAMESPACE, DeadLetter, Document

INPUT_FORMATS = ("auto", "text", "jsonl")

DEAD_LETTER_TAG = "dead_letter"

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_UTF8_BOM = "\ufeff"


def detect_format(path: str, input_format: str) -> str:
    """The concrete format of ``path``: ``text`` or ``jsonl``.

    ``auto`` looks at the file name, ignoring a compression suffix.
    """
    if input_format != "auto":
        return input_format
    name = path.lower()
    for suffix in (".gz", ".bz2", ".deflate", ".zst", ".lzo"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return "jsonl" if name.endswith(_JSONL_SUFFIXES) else "text"


def check_patterns_match(patterns: Sequence[str]) -> None:
    """Fails fast, before any worker starts, when a pattern matches no file."""
    results = FileSystems.match(list(patterns))
    empty = [r.pattern for r in results if not r.metadata_list]
    if empty:
        raise FileNotFoundError(
            "--input matched no files: " + ", ".join(empty))


def get_field(record: dict, dotted: str) -> Any:
    """``record['a']['b']`` for ``dotted='a.b'``; ``KeyError`` if absent."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


class _ParseFile(beam.DoFn):
    """Turns one matched file into ``Document`` and ``DeadLetter`` elements."""

    def __init__(self, input_format: str, id_field: str, text_field: str):
        self._input_format = input_format
        self._id_field = id_field
        self._text_field = text_field
        self._read = beam.metrics.Metrics.counter(
            METRICS_NAMESPACE, "documents_read")
        self._failed = beam.metrics.Metrics.counter(
            METRICS_NAMESPACE, "documents_failed")

    def process(self, readable: fileio.ReadableFile) -> Iterator[Any]:
        path = readable.metadata.path
        fmt = detect_format(path, self._input_format)
        with readable.open() as handle:
            for line_no, raw in enumerate(handle, start=1):
                if fmt == "jsonl" and not raw.strip():
                    continue  # blank separator lines are not JSONL records
                self._read.inc()
                item = self._parse_line(path, line_no, raw, fmt)
                if isinstance(item, DeadLetter):
                    self._failed.inc()
                    yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, item)
                else:
                    yield item

    def _parse_line(self, path: str, line_no: int, raw: bytes,
                    fmt: str) -> Document | DeadLetter:
        """A ``Document``, or a ``DeadLetter`` saying why the line is bad."""
        excerpt = raw[:400].decode("utf-8", errors="replace")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return DeadLetter("read", f"not valid UTF-8: {err.reason} at "
                              f"byte {err.start}", path, line_no, "", excerpt)
        if line_no == 1 and text.startswith(_UTF8_BOM):
            text = text[1:]
        text = text.rstrip("\r\n")
        default_id = f"{os.path.basename(path)}:{line_no}"
        if fmt == "text":
            return Document(default_id, text, path, line_no)
        return self._parse_json(path, line_no, text, default_id)

    def _parse_json(self, path: str, line_no: int, text: str,
                    default_id: str) -> Document | DeadLetter:
        try:
            record = json.loads(text)
        except ValueError as err:
            return DeadLetter("read", f"malformed JSON: {err}", path, line_no,
                              "", text)
        if not isinstance(record, dict):
            return DeadLetter("read", "JSON line is not an object", path,
                              line_no, "", text)
        doc_id = default_id
        try:
            raw_id = get_field(record, self._id_field)
            if raw_id is not None:
                doc_id = str(raw_id)
        except KeyError:
            pass
        try:
            body = get_field(record, self._text_field)
        except KeyError:
            return DeadLetter("read", f"missing text field "
                              f"'{self._text_field}'", path, line_no, doc_id,
                              text)
        if not isinstance(body, str):
            return DeadLetter("read", f"text field '{self._text_field}' is "
                              f"{type(body).__name__}, not a string", path,
                              line_no, doc_id, text)
        return Document(doc_id, body, path, line_no)


class ReadDocuments(beam.PTransform):
    """Reads documents from file patterns.

    Returns a ``DoOutputsTuple`` whose main output holds ``Document`` elements
    and whose ``dead_letter`` output holds ``DeadLetter`` elements for lines
    that could not be decoded or parsed.  Documents are reshuffled after
    reading so that the expensive stages spread over all workers even when
    the corpus is one big file.
    """

    def __init__(self, patterns: Sequence[str], input_format: str = "auto",
                 id_field: str = "id", text_field: str = "text"):
        super().__init__()
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, "
                             f"not {input_format!r}")
        self._patterns = list(patterns)
        self._parse = _ParseFile(input_format, id_field, text_field)

    def expand(self, pbegin: beam.pvalue.PBegin) -> Any:
        parsed = (
            pbegin
            | "Patterns" >> beam.Create(self._patterns)
            | "Match" >> fileio.MatchAll()
            | "Open" >> fileio.ReadMatches(
                compression=CompressionTypes.AUTO)
            | "Parse" >> beam.ParDo(self._parse).with_outputs(
                DEAD_LETTER_TAG, main="documents"))
        documents = parsed.documents | "Spread" >> beam.Reshuffle()
        return documents, parsed[DEAD_LETTER_TAG]

