"""Writing embeddings to Parquet or TFRecord, and dead letters to JSONL.

Rows become what ``transforms.embedding_files`` (the output contract:
columns, schema, footer, features, file names) says: Parquet rows are
turned into Arrow record batches column-wise with numpy (no per-float
Python work) and written through Beam's file sink (``beam.io.Write`` of a
``FileBasedSink``, as ``WriteToParquetBatched`` does, with the writer
settings of ``parquet_writer_options``); each table handed to it is one
Parquet row group.  TFRecord rows are
``tf.train.Example`` protos written by ``WriteToTFRecord``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator, Optional, Sequence

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filebasedsink import FileBasedSink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.transforms.window import GlobalWindows

from transforms.embedding_files import (
    EMBEDDINGS, ERRORS_SUFFIX, GZIP, JSONL_EXT, KINDS, PARQUET, TFRECORD,
    dead_letter_line, embedding_schema, file_metadata, file_suffix,
    parquet_writer_options, to_record_batch, to_tf_example)
from transforms.records import DocumentEmbedding

FORMATS = (PARQUET, TFRECORD)
SEQUENCE_DTYPES = ("float32", "float16")
PARQUET_CODECS = ("none", "snappy", "zstd", "gzip")
TFRECORD_COMPRESSIONS = ("none", GZIP)

# Rows buffered before they become one Arrow record batch (at most this
# many rows, at most about this many bytes of vectors), and bytes buffered
# before the batches are handed to the Parquet writer (one row group) when
# --parquet_row_group_rows does not fix the row count.  The byte limits keep
# a worker's memory bounded whatever the row size: one 512-token float32
# sequence row is 1.5 MiB, so 256 such rows would be 384 MiB.
_ROWS_PER_RECORD_BATCH = 256
_BYTES_PER_RECORD_BATCH = 8 * 1024 * 1024
_BYTES_PER_TABLE = 32 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class WriteSettings:
    """How rows are stored (the output controls of the job)."""
    model_fingerprint: str = ""
    sequence_dtype: str = "float32"
    write_text: bool = False
    parquet_compression: str = "none"
    row_group_rows: int = 0  # 0: row groups of about 32 MiB
    tfrecord_compression: str = "none"
    # What produced the rows (JSON, ``pipeline.manifest.dataset_description``)
    # and which kind of file this is: it goes into each Parquet footer.
    description: str = ""
    kind: str = EMBEDDINGS

    def __post_init__(self) -> None:
        for value, allowed in (
                (self.sequence_dtype, SEQUENCE_DTYPES),
                (self.parquet_compression, PARQUET_CODECS),
                (self.tfrecord_compression, TFRECORD_COMPRESSIONS)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")
        if self.row_group_rows < 0:
            raise ValueError("row_group_rows must be >= 0")
        if self.kind not in KINDS:
            raise ValueError(f"{self.kind!r} is not one of {KINDS}")


def _vector_bytes(row: DocumentEmbedding) -> int:
    """Bytes of the row's vectors (what dominates a buffered row's size)."""
    return sum(v.nbytes for v in (row.pooled_output, row.sequence_output)
               if v is not None)


class ArrowTableCoder(beam.coders.Coder):
    """Beam coder for ``pyarrow.Table`` elements: the Arrow IPC stream
    (schema and its metadata included), and a size estimate from the
    table's buffers.

    Beam estimates each PCollection's size by encoding a sample of its
    elements, and a stage's first elements are always sampled.  A row
    group's table is tens of MiB, so the default (pickling it) cost about
    as much as a third of writing it; the estimate here encodes nothing.
    """

    def encode(self, value: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, value.schema) as writer:
            writer.write_table(value)
        return sink.getvalue().to_pybytes()

    def decode(self, encoded: bytes) -> pa.Table:
        return pa.ipc.open_stream(encoded).read_all()

    def estimate_size(self, value: pa.Table) -> int:
        return int(value.nbytes)

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self) -> Any:
        return pa.Table


beam.coders.registry.register_coder(pa.Table, ArrowTableCoder)


class _ToArrowTables(beam.DoFn):
    """Buffers embedding rows into Arrow tables, one per Parquet row group.

    A table holds ``row_group_rows`` rows when that is set, else about
    32 MiB; the last table of a bundle may be smaller.
    """

    def __init__(self, schema: pa.Schema, model_fingerprint: str = "",
                 row_group_rows: int = 0):
        self._schema = schema
        self._fingerprint = model_fingerprint
        self._group_rows = row_group_rows
        self._batch_rows = (min(row_group_rows, _ROWS_PER_RECORD_BATCH)
                            if row_group_rows else _ROWS_PER_RECORD_BATCH)
        self.start_bundle()

    def start_bundle(self) -> None:
        # Rows not yet in a record batch, and the bytes of their vectors.
        self._rows: list[DocumentEmbedding] = []
        self._row_bytes = 0
        # Record batches not yet handed over, their bytes, and the rows
        # buffered in all (batches and pending rows).
        self._batches: list[pa.RecordBatch] = []
        self._bytes = 0
        self._buffered = 0

    def process(self, row: DocumentEmbedding) -> Iterator[pa.Table]:
        self._rows.append(row)
        self._row_bytes += _vector_bytes(row)
        self._buffered += 1
        if (len(self._rows) >= self._batch_rows
                or self._row_bytes >= _BYTES_PER_RECORD_BATCH):
            self._flush_rows()
        if self._table_full():
            yield self._take_table()

    def _table_full(self) -> bool:
        if self._group_rows:
            return self._buffered >= self._group_rows
        return self._bytes + self._row_bytes >= _BYTES_PER_TABLE

    def finish_bundle(self) -> Iterator[Any]:
        self._flush_rows()
        if self._batches:
            yield GlobalWindows.windowed_value(self._take_table())

    def _flush_rows(self) -> None:
        if self._rows:
            batch = to_record_batch(self._rows, self._schema,
                                    self._fingerprint)
            self._batches.append(batch)
            self._bytes += batch.nbytes
            self._rows, self._row_bytes = [], 0

    def _take_table(self) -> pa.Table:
        self._flush_rows()
        table = pa.Table.from_batches(self._batches, schema=self._schema)
        self._batches, self._bytes, self._buffered = [], 0, 0
        return table


class _ParquetTableSink(FileBasedSink):
    """Beam's file sink for Arrow tables: each shard is one
    ``pyarrow.parquet.ParquetWriter`` with ``parquet_writer_options``
    (Beam's own Parquet sink cannot take them), each table one row group.
    """

    def __init__(self, file_path_prefix: str, schema: pa.Schema, codec: str,
                 file_name_suffix: str, num_shards: int):
        super().__init__(file_path_prefix, coder=None,
                         file_name_suffix=file_name_suffix,
                         num_shards=num_shards,
                         mime_type="application/x-parquet",
                         compression_type=CompressionTypes.UNCOMPRESSED)
        self._schema = schema
        self._codec = codec

    def open(self, temp_path: str) -> Any:
        import pyarrow.parquet as pq
        handle = super().open(temp_path)
        # List items named "item", as Beam's Parquet sink writes them.
        return _OpenParquet(handle, pq.ParquetWriter(
            handle, self._schema, compression=self._codec,
            use_compliant_nested_type=False,
            **parquet_writer_options(self._schema)))

    def write_record(self, file_handle: Any, value: pa.Table) -> None:
        file_handle.writer.write_table(value)

    def close(self, file_handle: Any) -> None:
        file_handle.writer.close()
        file_handle.handle.close()


@dataclasses.dataclass(frozen=True)
class _OpenParquet:
    """One shard being written: its file and its Parquet writer."""
    handle: Any
    writer: Any


class WriteEmbeddings(beam.PTransform):
    """Writes ``DocumentEmbedding`` rows as ``<prefix>-SSSSS-of-NNNNN.<fmt>``.

    Returns the PCollection of written file names.
    """

    def __init__(self, output_prefix: str, file_format: str,
                 hidden_size: int, outputs: Sequence[str],
                 num_shards: int = 0, chunked: bool = False,
                 settings: Optional[WriteSettings] = None):
        super().__init__()
        if file_format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, "
                             f"not {file_format!r}")
        self._settings = settings or WriteSettings()
        self._prefix = output_prefix
        self._format = file_format
        self._schema = embedding_schema(
            hidden_size, "pooled" in outputs, "sequence" in outputs, chunked,
            self._settings.write_text, self._settings.sequence_dtype)
        if self._settings.description:
            self._schema = self._schema.with_metadata(file_metadata(
                json.loads(self._settings.description), self._schema,
                self._settings.kind))
        self._num_shards = num_shards
        self._chunked = chunked

    def expand(self, rows: beam.PCollection) -> Any:
        s = self._settings
        suffix = file_suffix(self._format, s.tfrecord_compression)
        if self._format == PARQUET:
            return (rows
                    | "ToArrow" >> beam.ParDo(_ToArrowTables(
                        self._schema, s.model_fingerprint, s.row_group_rows)
                    ).with_output_types(pa.Table)
                    | "WriteParquet" >> beam.io.Write(_ParquetTableSink(
                        self._prefix, self._schema, s.parquet_compression,
                        suffix, self._num_shards)))
        compression = (CompressionTypes.GZIP
                       if s.tfrecord_compression == GZIP
                       else CompressionTypes.UNCOMPRESSED)
        return (rows
                | "ToExample" >> beam.Map(
                    to_tf_example, self._chunked, s.model_fingerprint,
                    s.sequence_dtype, s.write_text)
                | "WriteTFRecord" >> beam.io.WriteToTFRecord(
                    self._prefix, file_name_suffix=suffix,
                    num_shards=self._num_shards,
                    compression_type=compression))


class WriteDeadLetters(beam.PTransform):
    """Writes ``DeadLetter`` records to ``<prefix>-errors-*.jsonl``."""

    def __init__(self, output_prefix: str):
        super().__init__()
        self._prefix = output_prefix + ERRORS_SUFFIX

    def expand(self, dead: beam.PCollection) -> Any:
        return (dead
                | "ToJson" >> beam.Map(dead_letter_line)
                | "WriteJsonl" >> beam.io.WriteToText(
                    self._prefix, file_name_suffix=JSONL_EXT))
