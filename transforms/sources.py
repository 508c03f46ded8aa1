"""Input formats: the bytes of one file in, ``RawRecord`` elements out.

One function per format turns an open (already decompressed) file into
records: plain text and JSONL give one record per line, CSV/TSV one per row
(named by the header row), Parquet one per row (only the needed columns are
read).  Text formats are decoded with ``--input_encoding``; a byte-order
mark is dropped.  Nothing here raises for a bad record: a line with
undecodable bytes, a malformed CSV row or an over-long line becomes a record
with ``error`` set, so the reader can turn it into a dead letter and go on.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
from typing import Any, BinaryIO, Iterator, Optional, Sequence

INPUT_FORMATS = ("auto", "text", "jsonl", "csv", "tsv", "parquet")
ENCODINGS = ("utf-8", "gb18030", "gbk", "big5", "utf-16")

# How error messages name each encoding.
_ENCODING_NAMES = {"utf-8": "UTF-8", "gb18030": "GB18030", "gbk": "GBK",
                   "big5": "Big5", "utf-16": "UTF-16"}
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
                   ".csv": "csv", ".tsv": "tsv", ".tab": "tsv",
                   ".parquet": "parquet", ".pq": "parquet"}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".deflate", ".zst", ".lzo")

_READ_CHUNK = 1 << 20
# Bytes of an over-long line kept for its dead letter's excerpt.
_HEAD_BYTES = 1024
# Parquet rows converted to Python at a time.
_PARQUET_BATCH_ROWS = 1024
# csv's own per-field limit (128 KiB) would reject long texts before
# --max_text_chars can; the reader enforces the size cap instead.
_CSV_FIELD_LIMIT = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class RawRecord:
    """One record of a file, before it becomes a document.

    ``line`` is the line number (text, JSONL), the first line of the row
    (CSV/TSV, the header being line 1) or the row number (Parquet).  Exactly
    one of ``text`` (text, JSONL), ``fields`` (CSV/TSV/Parquet) and
    ``error`` is set.
    """
    line: int
    nbytes: int
    text: Optional[str] = None
    fields: Optional[dict[str, Any]] = None
    error: Optional[str] = None
    excerpt: str = ""


def strip_compression_suffix(path: str) -> str:
    """``path`` lower-cased, without a compression suffix (``.gz``...)."""
    name = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_compressed(path: str) -> bool:
    """Whether Beam decompresses ``path`` on reading (by its suffix)."""
    return strip_compression_suffix(path) != path.lower()


def detect_format(path: str, input_format: str) -> str:
    """The concrete format of ``path``; ``auto`` looks at the file name
    (ignoring a compression suffix) and falls back to ``text``."""
    if input_format != "auto":
        return input_format
    name = strip_compression_suffix(path)
    for suffix, fmt in _SUFFIX_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    return "text"


def _codec(encoding: str, head: bytes) -> tuple[str, bytes, int]:
    """(codec for one line, newline bytes, BOM bytes to skip).

    UTF-16 takes its byte order from the BOM (little-endian without one);
    its newline is a two-byte unit.  The UTF-8 BOM is skipped here; other
    encodings' BOMs decode to U+FEFF, which ``_decode`` drops.
    """
    if encoding == "utf-16":
        if head.startswith(codecs.BOM_UTF16_BE):
            return "utf-16-be", b"\x00\n", 2
        return "utf-16-le", b"\n\x00", 2 if head.startswith(
            codecs.BOM_UTF16_LE) else 0
    if encoding not in _ENCODING_NAMES:
        raise ValueError(f"input encoding must be one of {ENCODINGS}, "
                         f"not {encoding!r}")
    bom = 3 if encoding == "utf-8" and head.startswith(codecs.BOM_UTF8) else 0
    return encoding, b"\n", bom


def _find_newline(data: bytes, newline: bytes, start: int) -> int:
    """Index of the next newline unit at or after ``start``, aligned to the
    unit size (so a UTF-16 ``0A`` byte inside a character is not a line
    break), or -1."""
    unit = len(newline)
    index = data.find(newline, start)
    while index >= 0 and (index - start) % unit:
        index = data.find(newline, index + 1)
    return index


def split_lines(handle: BinaryIO, newline: bytes, max_line_bytes: int,
                head: bytes = b"") -> Iterator[tuple[bytes, int, bool]]:
    """``(raw line, bytes, oversized)`` for each line of ``handle``.

    Lines keep their newline.  A line longer than ``max_line_bytes`` is not
    held in memory: it comes back as its first bytes with ``oversized``
    set and its full length, and reading goes on after it.
    """
    unit = len(newline)
    pending, chunk = head, b"-"
    over_head: Optional[bytes] = None
    over_bytes = 0
    while chunk:
        chunk = handle.read(_READ_CHUNK)
        data = pending + chunk
        start = 0
        end = _find_newline(data, newline, start)
        while end >= 0:
            stop = end + unit
            if over_head is not None:
                yield over_head, over_bytes + stop - start, True
                over_head, over_bytes = None, 0
            elif stop - start > max_line_bytes:
                cut = min(stop, start + _HEAD_BYTES)
                yield data[start:cut], stop - start, True
            else:
                yield data[start:stop], stop - start, False
            start = stop
            end = _find_newline(data, newline, start)
        pending = data[start:]
        if len(pending) > max_line_bytes:
            dropped = len(pending) - len(pending) % unit
            if over_head is None:
                over_head = pending[:_HEAD_BYTES]
            over_bytes += dropped
            pending = pending[dropped:]
    if over_head is not None:
        yield over_head, over_bytes + len(pending), True
    elif pending:
        yield pending, len(pending), False


def _decode(raw: bytes, codec: str, encoding: str, first: bool
            ) -> tuple[str, Optional[str]]:
    """(line text without its newline, error or None)."""
    try:
        text, error = raw.decode(codec), None
    except UnicodeDecodeError as err:
        text = raw.decode(codec, errors="replace")
        error = (f"not valid {_ENCODING_NAMES[encoding]}: {err.reason} at "
                 f"byte {err.start}")
    if first and text.startswith("\ufeff"):
        text = text[1:]
    return text.rstrip("\r\n"), error


def _lines(handle: BinaryIO, encoding: str, max_line_bytes: int
           ) -> Iterator[tuple[int, int, str, Optional[str]]]:
    """``(line number, bytes, text, error)`` for each line of a text file."""
    head = handle.read(4)
    codec, newline, bom = _codec(encoding, head)
    lines = split_lines(handle, newline, max_line_bytes, head[bom:])
    for line_no, (raw, nbytes, oversized) in enumerate(lines, start=1):
        text, error = _decode(raw, codec, encoding, line_no == 1)
        if oversized:
            error = (f"line of {nbytes} bytes is over the {max_line_bytes}-"
                     "byte limit")
        yield line_no, nbytes + (bom if line_no == 1 else 0), text, error


def text_records(handle: BinaryIO, encoding: str, max_line_bytes: int,
                 skip_blank: bool) -> Iterator[RawRecord]:
    """One record per line (plain text, JSONL); JSONL skips blank lines."""
    for line_no, nbytes, text, error in _lines(handle, encoding,
                                               max_line_bytes):
        if error:
            yield RawRecord(line_no, nbytes, error=error, excerpt=text)
        elif not (skip_blank and not text.strip()):
            yield RawRecord(line_no, nbytes, text=text)


class _LineFeed:
    """Feeds decoded lines to ``csv.reader`` and remembers, per row, the
    bytes consumed and the first decoding error among its lines."""

    def __init__(self, lines: Iterator[tuple[int, int, str, Optional[str]]]):
        self._lines = lines
        self.nbytes = 0
        self.error: Optional[str] = None

    def __iter__(self) -> Iterator[str]:
        for _, nbytes, text, error in self._lines:
            self.nbytes += nbytes
            self.error = self.error or error
            yield text + "\n"

    def take(self) -> tuple[int, Optional[str]]:
        """Bytes and error of the row just read; resets both."""
        taken = self.nbytes, self.error
        self.nbytes, self.error = 0, None
        return taken


def csv_records(handle: BinaryIO, encoding: str, max_line_bytes: int,
                delimiter: str) -> Iterator[RawRecord]:
    """One record per data row, fields named by the header row.

    A row with undecodable bytes, a csv parse error, or a number of fields
    that differs from the header's is an error record.  Blank lines are
    skipped.
    """
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    feed = _LineFeed(_lines(handle, encoding, max_line_bytes))
    reader = csv.reader(iter(feed), delimiter=delimiter)
    header: Optional[list[str]] = None
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            nbytes, _ = feed.take()
            yield RawRecord(start, nbytes, error=f"malformed CSV row: {err}")
            continue
        nbytes, error = feed.take()
        if header is None:
            header = row
            continue
        if not row:
            continue
        if error is None and len(row) != len(header):
            error = (f"malformed CSV row: {len(row)} fields, the header has "
                     f"{len(header)}")
        if error:
            yield RawRecord(start, nbytes, error=error,
                            excerpt=delimiter.join(row))
        else:
            yield RawRecord(start, nbytes, fields=dict(zip(header, row)))


def parquet_records(handle: BinaryIO, size: int, fields: Sequence[str]
                    ) -> Iterator[RawRecord]:
    """One record per row, reading only the columns ``fields`` need.

    A dotted field (``meta.id``) reads its top-level column.  Each row is
    credited with an equal share of the file's bytes.
    """
    import pyarrow.parquet as pq
    parquet = pq.ParquetFile(handle)
    names = set(parquet.schema_arrow.names)
    wanted = {f for f in fields if f in names}
    wanted |= {f.split(".")[0] for f in fields if f.split(".")[0] in names}
    rows = parquet.metadata.num_rows
    share = size // rows if rows else 0
    if not wanted:  # no column to read: every row lacks its text
        for row in range(1, rows + 1):
            yield RawRecord(row, share, fields={})
        return
    row = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS,
                                      columns=sorted(wanted)):
        for record in batch.to_pylist():
            row += 1
            yield RawRecord(row, share, fields=record)


def iter_records(handle: BinaryIO, fmt: str, encoding: str,
                 max_line_bytes: int, size: int,
                 fields: Sequence[str]) -> Iterator[RawRecord]:
    """The records of one open file in format ``fmt`` (not ``auto``)."""
    if fmt in ("text", "jsonl"):
        return text_records(handle, encoding, max_line_bytes,
                            skip_blank=fmt == "jsonl")
    if fmt in ("csv", "tsv"):
        return csv_records(handle, encoding, max_line_bytes,
                           "," if fmt == "csv" else "\t")
    if fmt == "parquet":
        return parquet_records(handle, size, fields)
    raise ValueError(f"unknown input format {fmt!r}")
