"""Writing embeddings to Parquet or TFRecord, and dead letters to JSONL.

Parquet rows follow ``embedding_schema``: fixed-size float32 lists for the
pooled vector and a list of fixed-size lists (one per real token) for the
sequence output.  Rows are turned into Arrow record batches column-wise with
numpy (no per-float Python work) and written by Beam's
``WriteToParquetBatched``.  TFRecord rows are ``tf.train.Example`` protos with
the same fields, the sequence flattened and its shape stored beside it.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.transforms.window import GlobalWindows

from transforms.records import DeadLetter, DocumentEmbedding

FORMATS = ("parquet", "tfrecord")

# Rows buffered before they become one Arrow record batch, and bytes
# buffered before the batches are handed to the Parquet writer.
_ROWS_PER_RECORD_BATCH = 256
_BYTES_PER_TABLE = 32 * 1024 * 1024


# Columns that only chunked runs (--long_text chunk) write.
CHUNK_COLUMNS = ("doc_id", "chunk_index", "num_chunks")


def embedding_schema(hidden_size: int, pooled: bool = True,
                     sequence: bool = True,
                     chunked: bool = False) -> pa.Schema:
    """The Parquet schema of an embeddings file."""
    vector = pa.list_(pa.float32(), hidden_size)
    fields = [pa.field("id", pa.string(), nullable=False)]
    if chunked:
        fields += [pa.field("doc_id", pa.string(), nullable=False),
                   pa.field("chunk_index", pa.int32(), nullable=False),
                   pa.field("num_chunks", pa.int32(), nullable=False)]
    fields += [
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
    ]
    if pooled:
        fields.append(pa.field("pooled_output", vector, nullable=False))
    if sequence:
        fields.append(pa.field("sequence_output", pa.list_(vector),
                               nullable=False))
    return pa.schema(fields)


def _vectors(rows: np.ndarray, hidden_size: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(rows, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, hidden_size)


def to_record_batch(rows: Sequence[DocumentEmbedding],
                    schema: pa.Schema) -> pa.RecordBatch:
    """Column-wise conversion of embedding rows into one Arrow batch."""
    hidden = _hidden_size(schema)
    columns: dict[str, pa.Array] = {
        "id": pa.array([r.id for r in rows], pa.string()),
        "num_tokens": pa.array([r.num_tokens for r in rows], pa.int32()),
        "truncated": pa.array([r.truncated for r in rows], pa.bool_()),
    }
    if "doc_id" in schema.names:
        columns["doc_id"] = pa.array([r.doc_id for r in rows], pa.string())
        columns["chunk_index"] = pa.array([r.chunk_index for r in rows],
                                          pa.int32())
        columns["num_chunks"] = pa.array([r.num_chunks for r in rows],
                                         pa.int32())
    if "pooled_output" in schema.names:
        columns["pooled_output"] = _vectors(
            np.stack([r.pooled_output for r in rows]), hidden)
    if "sequence_output" in schema.names:
        lengths = np.array([r.sequence_output.shape[0] for r in rows])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        tokens = _vectors(np.concatenate([r.sequence_output for r in rows]),
                          hidden)
        columns["sequence_output"] = pa.ListArray.from_arrays(
            pa.array(offsets), tokens)
    return pa.RecordBatch.from_arrays(
        [columns[name] for name in schema.names], schema=schema)


def _hidden_size(schema: pa.Schema) -> int:
    for name in ("pooled_output", "sequence_output"):
        if name in schema.names:
            vector_type = schema.field(name).type
            if name == "sequence_output":
                vector_type = vector_type.value_type
            return vector_type.list_size
    raise ValueError("schema has no embedding column")


class _ToArrowTables(beam.DoFn):
    """Buffers embedding rows into bounded Arrow tables for the writer."""

    def __init__(self, schema: pa.Schema):
        self._schema = schema
        self._rows: list[DocumentEmbedding] = []
        self._batches: list[pa.RecordBatch] = []
        self._bytes = 0

    def start_bundle(self) -> None:
        self._rows, self._batches, self._bytes = [], [], 0

    def process(self, row: DocumentEmbedding) -> Iterator[pa.Table]:
        self._rows.append(row)
        if len(self._rows) >= _ROWS_PER_RECORD_BATCH:
            self._flush_rows()
        if self._bytes >= _BYTES_PER_TABLE:
            yield self._take_table()

    def finish_bundle(self) -> Iterator[Any]:
        self._flush_rows()
        if self._batches:
            yield GlobalWindows.windowed_value(self._take_table())

    def _flush_rows(self) -> None:
        if self._rows:
            batch = to_record_batch(self._rows, self._schema)
            self._batches.append(batch)
            self._bytes += batch.nbytes
            self._rows = []

    def _take_table(self) -> pa.Table:
        table = pa.Table.from_batches(self._batches, schema=self._schema)
        self._batches, self._bytes = [], 0
        return table


def to_tf_example(row: DocumentEmbedding, chunked: bool = False) -> bytes:
    """A serialized ``tf.train.Example`` with the Parquet schema's fields.

    ``sequence_output`` is stored flat with ``sequence_shape`` =
    ``[num_tokens, hidden]`` so that a reader can restore the matrix.
    """
    import tensorflow as tf
    feature = tf.train.Feature

    def ints(*values: int) -> tf.train.Feature:
        return feature(int64_list=tf.train.Int64List(value=values))

    def text(value: str) -> tf.train.Feature:
        return feature(bytes_list=tf.train.BytesList(
            value=[value.encode("utf-8")]))

    features = {"id": text(row.id), "num_tokens": ints(row.num_tokens),
                "truncated": ints(int(row.truncated))}
    if chunked:
        features.update(doc_id=text(row.doc_id),
                        chunk_index=ints(row.chunk_index),
                        num_chunks=ints(row.num_chunks))
    if row.pooled_output is not None:
        features["pooled_output"] = feature(float_list=tf.train.FloatList(
            value=row.pooled_output))
    if row.sequence_output is not None:
        features["sequence_output"] = feature(float_list=tf.train.FloatList(
            value=row.sequence_output.reshape(-1)))
        features["sequence_shape"] = ints(*row.sequence_output.shape)
    example = tf.train.Example(features=tf.train.Features(feature=features))
    return example.SerializeToString()


class WriteEmbeddings(beam.PTransform):
    """Writes ``DocumentEmbedding`` rows as ``<prefix>-SSSSS-of-NNNNN.<fmt>``.

    Returns the PCollection of written file names.
    """

    def __init__(self, output_prefix: str, file_format: str,
                 hidden_size: int, outputs: Sequence[str],
                 num_shards: int = 0, chunked: bool = False):
        super().__init__()
        if file_format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, "
                             f"not {file_format!r}")
        self._prefix = output_prefix
        self._format = file_format
        self._schema = embedding_schema(hidden_size, "pooled" in outputs,
                                        "sequence" in outputs, chunked)
        self._num_shards = num_shards
        self._chunked = chunked

    def expand(self, rows: beam.PCollection) -> Any:
        suffix = "." + self._format
        if self._format == "parquet":
            return (rows
                    | "ToArrow" >> beam.ParDo(_ToArrowTables(self._schema))
                    | "WriteParquet" >> beam.io.WriteToParquetBatched(
                        self._prefix, self._schema, file_name_suffix=suffix,
                        num_shards=self._num_shards))
        return (rows
                | "ToExample" >> beam.Map(to_tf_example, self._chunked)
                | "WriteTFRecord" >> beam.io.WriteToTFRecord(
                    self._prefix, file_name_suffix=suffix,
                    num_shards=self._num_shards))


class WriteDeadLetters(beam.PTransform):
    """Writes ``DeadLetter`` records to ``<prefix>-errors-*.jsonl``."""

    def __init__(self, output_prefix: str):
        super().__init__()
        self._prefix = output_prefix + "-errors"

    def expand(self, dead: beam.PCollection) -> Any:
        return (dead
                | "ToJson" >> beam.Map(DeadLetter.to_json)
                | "WriteJsonl" >> beam.io.WriteToText(
                    self._prefix, file_name_suffix=".jsonl"))


DOCUMENTS_SUFFIX = "-documents"


def output_patterns(prefix: str, file_format: str) -> dict[str, str]:
    """Glob patterns of the files a run with ``prefix`` writes."""
    return {
        "embeddings": f"{prefix}-[0-9]*-of-[0-9]*.{file_format}",
        "documents": f"{prefix}{DOCUMENTS_SUFFIX}-*-of-*.{file_format}",
        "errors": f"{prefix}-errors-*.jsonl",
    }

