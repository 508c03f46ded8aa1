"""Input formats: the bytes of one file in, ``RawRecord`` elements out.

One function per format turns an open file into records: plain text and
JSONL give one record per line, CSV/TSV one per row (named by the header
row), Parquet one per row (only the needed columns are read).  Compressed
files are decompressed here (``decompressed``, by suffix), so that a stream
that breaks off raises instead of ending early.  Text formats are decoded
with ``--input_encoding``; a byte-order mark at the start of a line is
dropped.  Nothing here raises for a bad record: a line with undecodable
bytes, NUL bytes or text that looks mis-decoded, a malformed CSV row or an
over-long line becomes a record with ``error`` set, so the reader can turn
it into a dead letter and go on.  What does raise is a fault of the whole
rest of the file: a broken compressed stream, an unusable CSV header, a file
that is not Parquet.
"""

from __future__ import annotations

import bz2
import codecs
import collections
import csv
import dataclasses
import gzip
import lzma
import zlib
from typing import (Any, BinaryIO, Callable, Iterator, NamedTuple, Optional,
                    Sequence)

from transforms.misdecoding import misdecoded

INPUT_FORMATS = ("auto", "text", "jsonl", "csv", "tsv", "parquet")
ENCODINGS = ("utf-8", "gb18030", "gbk", "big5", "utf-16")

# How error messages name each encoding.
_ENCODING_NAMES = {"utf-8": "UTF-8", "gb18030": "GB18030", "gbk": "GBK",
                   "big5": "Big5", "utf-16": "UTF-16"}
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
                   ".csv": "csv", ".tsv": "tsv", ".tab": "tsv",
                   ".parquet": "parquet", ".pq": "parquet"}
# The suffixes Beam decompresses by, plus ``.lzo``, which it does not (such
# a file is refused rather than read as text).
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".deflate", ".zst", ".zstd", ".xz",
                         ".lzma", ".lzo")
_TRUNCATED = ("Compressed file ended before the end-of-stream marker was "
              "reached")

_READ_CHUNK = 1 << 20
# Compressed bytes fed to a decompressor at a time: small, since highly
# compressible data grows a hundredfold.
_COMPRESSED_CHUNK = 1 << 16
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
    """Whether ``path`` is compressed, by its suffix (``decompressed``
    reads it)."""
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


class _StreamReader:
    """Reads a compressed stream through decompressor objects (``.deflate``,
    ``.zst``): streams written one after another are read in turn, and a
    stream that ends before its end marker raises ``EOFError`` (Beam's own
    reader returns what it got and stops, as if the file ended there)."""

    def __init__(self, raw: BinaryIO, new_decompressor: Callable[[], Any]):
        self._raw = raw
        self._new = new_decompressor
        self._decompressor = new_decompressor()
        self._started = False  # bytes went into the current decompressor
        self._truncated = False
        self._out = b""

    def _feed(self, data: bytes) -> None:
        if self._decompressor.eof:  # the next stream follows
            self._decompressor, self._started = self._new(), False
        self._out += self._decompressor.decompress(data)
        self._started = True

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` decompressed bytes (all that is left if < 0); at a
        break, what came before it first, then ``EOFError``."""
        while not self._truncated and (size < 0 or len(self._out) < size):
            if self._decompressor.eof and self._decompressor.unused_data:
                self._feed(self._decompressor.unused_data)
                continue
            data = self._raw.read(_COMPRESSED_CHUNK)
            if not data:
                self._truncated = self._started and \
                    not self._decompressor.eof
                break
            self._feed(data)
        if self._truncated and not self._out:
            raise EOFError(_TRUNCATED)
        cut = len(self._out) if size < 0 else size
        out, self._out = self._out[:cut], self._out[cut:]
        return out

    def close(self) -> None:
        """Closing is left to the owner of the raw file."""


def _zstd_decompressor() -> Any:
    import zstandard  # a dependency of Beam, imported only when needed
    # Beam's window limit: larger windows are refused, not held in memory.
    return zstandard.ZstdDecompressor(
        max_window_size=2**31).decompressobj()


def decompressed(raw: BinaryIO, path: str) -> BinaryIO:
    """``raw`` (the bytes of file ``path``) decompressed by the suffix of
    ``path``, or ``raw`` itself for other files.

    Unlike Beam's reader, a stream cut off before its end raises
    ``EOFError`` (Python's own ``gzip``, ``bz2`` and ``lzma`` readers do
    that, and read streams written one after another), and a corrupt one
    raises its decompressor's error; either way after the data before the
    break was returned.
    """
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore
    if name.endswith(".bz2"):
        return bz2.BZ2File(raw)  # type: ignore
    if name.endswith((".xz", ".lzma")):
        return lzma.LZMAFile(raw)  # type: ignore
    if name.endswith(".deflate"):
        return _StreamReader(raw, zlib.decompressobj)  # type: ignore
    if name.endswith((".zst", ".zstd")):
        return _StreamReader(raw, _zstd_decompressor)  # type: ignore
    if name.endswith(".lzo"):
        raise ValueError("LZO-compressed files are not supported")
    return raw


def compressed_fault(raw: BinaryIO, path: str) -> Optional[str]:
    """Why compressed file ``path`` is corrupt (its data fails the format's
    checks), reading it through once; None when it is intact or only cut
    off.

    A cut-off stream decompresses to an exact prefix of the data, so its
    records up to the break can be read.  A corrupt one cannot be trusted
    before the point where the decompressor noticed (a gzip CRC is checked
    only at the end), so the reader checks first and reads none of it.
    """
    stream = decompressed(raw, path)
    try:
        while stream.read(_READ_CHUNK):
            pass
    except EOFError:
        return None
    except Exception as err:  # each decompressor has its own error types
        kind = type(err).__name__
        if kind == "error":  # zlib.error
            kind = f"{type(err).__module__}.error"
        return f"{kind}: {err}"
    return None


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
    # ``read1`` returns what one read of the stream gave: the decompressed
    # data before a break comes back before the error does.
    read = getattr(handle, "read1", handle.read)
    pending, chunk = head, b"-"
    over_head: Optional[bytes] = None
    over_bytes = 0
    while chunk:
        chunk = read(_READ_CHUNK)
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


class _Line(NamedTuple):
    """One decoded line: its number, bytes, text without the newline, and
    why it is unusable (or None)."""
    number: int
    nbytes: int
    text: str
    error: Optional[str]


def _decode(raw: bytes, codec: str, encoding: str
            ) -> tuple[str, Optional[str]]:
    """(line text without its newline, error or None).

    A byte-order mark at the start of any line is dropped (files joined
    with ``cat`` keep theirs).  NUL bytes, and text that looks decoded with
    the wrong encoding (``transforms.misdecoding``), are errors: such a line
    would embed as garbage.
    """
    try:
        text, error = raw.decode(codec), None
    except UnicodeDecodeError as err:
        text = raw.decode(codec, errors="replace")
        error = (f"not valid {_ENCODING_NAMES[encoding]}: {err.reason} at "
                 f"byte {err.start}")
    text = text.rstrip("\r\n")
    if text.startswith("\ufeff"):
        text = text[1:]
    if error is None and "\x00" in text:
        error = ("line holds NUL bytes: binary data, or UTF-16 text (then "
                 "check --input_encoding)")
    if error is None:
        error = misdecoded(raw, text, codec)
    return text, error


def _lines(handle: BinaryIO, encoding: str, max_line_bytes: int
           ) -> Iterator[_Line]:
    """The lines of a text file, decoded."""
    head = handle.read(4)
    codec, newline, bom = _codec(encoding, head)
    lines = split_lines(handle, newline, max_line_bytes, head[bom:])
    for line_no, (raw, nbytes, oversized) in enumerate(lines, start=1):
        text, error = _decode(raw, codec, encoding)
        if oversized:
            limit = (f"line of {nbytes} bytes is over the {max_line_bytes}-"
                     "byte limit")
            # A whole file read in the wrong UTF-16 byte order is one line.
            hint = misdecoded(raw[:len(raw) - len(raw) % len(newline)],
                              text, codec)
            error = f"{hint} ({limit})" if hint else limit
        yield _Line(line_no, nbytes + (bom if line_no == 1 else 0), text,
                    error)


def text_records(handle: BinaryIO, encoding: str, max_line_bytes: int,
                 skip_blank: bool) -> Iterator[RawRecord]:
    """One record per line (plain text, JSONL); JSONL skips blank lines."""
    for line_no, nbytes, text, error in _lines(handle, encoding,
                                               max_line_bytes):
        if error:
            yield RawRecord(line_no, nbytes, error=error, excerpt=text)
        elif not (skip_blank and not text.strip()):
            yield RawRecord(line_no, nbytes, text=text)


class _RowTooLong(Exception):
    """The lines of one CSV row add up to more than the row limit."""


class _LineFeed:
    """Feeds decoded lines to ``csv.reader`` one at a time, keeps the lines
    of the row being read, and takes lines back to be read again."""

    def __init__(self, lines: Iterator[_Line], max_row_bytes: int):
        self._lines = lines
        self._again: collections.deque[_Line] = collections.deque()
        self._max_row_bytes = max_row_bytes
        self._row: list[_Line] = []
        self._row_bytes = 0

    def __iter__(self) -> "_LineFeed":
        return self

    def __next__(self) -> str:
        line = self._again.popleft() if self._again else next(self._lines)
        self._row.append(line)
        self._row_bytes += line.nbytes
        if len(self._row) > 1 and self._row_bytes > self._max_row_bytes:
            raise _RowTooLong  # a quoted field that does not close
        return line.text + "\n"

    def take(self) -> list[_Line]:
        """The lines of the row just read (or given up on); starts anew."""
        row, self._row, self._row_bytes = self._row, [], 0
        return row

    def read_again(self, lines: list[_Line]) -> None:
        """Puts ``lines`` back in front of the lines not yet read."""
        self._again.extendleft(reversed(lines))


def _broken_row(problem: str, lines: list[_Line], max_row_bytes: int
                ) -> str:
    """What is wrong with a row the csv parser gave up on (``problem``:
    its error, or ``too long``) that took ``lines``."""
    if problem == "too long":
        return (f"a quoted field in it is not closed within {max_row_bytes} "
                f"bytes (line {lines[-1].number})")
    if problem == "unexpected end of data":
        return "a quoted field in it is not closed before the end of the file"
    if len(lines) == 1:
        return problem
    return (f"a quoted field in it is not closed properly ({problem} on line "
            f"{lines[-1].number})")


def csv_records(handle: BinaryIO, encoding: str, max_line_bytes: int,
                delimiter: str) -> Iterator[RawRecord]:
    """One record per data row, fields named by the header row.

    A row with undecodable bytes, a csv parse error (strict quoting), or a
    number of fields that differs from the header's is an error record.
    Blank lines are skipped.  A quoted field that does not close (before the
    end of the file, within ``max_line_bytes``, or properly: a quote
    followed by more text) makes its row's first line an error record, and
    the lines it swallowed are read again as rows: a stray quote then costs
    one row, not the rest of the file.  A header that cannot be read raises
    ``ValueError``: without column names no row can be read.
    """
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    feed = _LineFeed(_lines(handle, encoding, max_line_bytes),
                     max_line_bytes)
    reader = csv.reader(feed, delimiter=delimiter, strict=True)
    header: Optional[list[str]] = None
    while True:
        problem: Optional[str] = None
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            problem = str(err)
        except _RowTooLong:
            problem = "too long"  # an unclosed quoted field
        lines = feed.take()
        first = lines[0]
        if problem is not None:
            problem = _broken_row(problem, lines, max_line_bytes)
            if header is None:
                raise ValueError(f"CSV header (line {first.number}): "
                                 f"{problem}")
            error = f"malformed CSV row: {problem}"
            if len(lines) > 1:  # a quoted field ran on: read those again
                error += "; the lines after this one are read again as rows"
                feed.read_again(lines[1:])
            yield RawRecord(first.number, first.nbytes, error=error,
                            excerpt=first.text)
            continue
        nbytes = sum(line.nbytes for line in lines)
        error = next((line.error for line in lines if line.error), None)
        if not row and error is None:
            continue  # a blank line
        if header is None:
            if error:
                raise ValueError(f"CSV header (line {first.number}): {error}")
            header = row
            continue
        if error is None and len(row) != len(header):
            error = (f"malformed CSV row: {len(row)} fields, the header has "
                     f"{len(header)}")
        if error:
            yield RawRecord(first.number, nbytes, error=error,
                            excerpt=delimiter.join(row))
        else:
            yield RawRecord(first.number, nbytes,
                            fields=dict(zip(header, row)))


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
