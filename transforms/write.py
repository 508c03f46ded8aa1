"""Writing embeddings to Parquet or TFRecord, and dead letters to JSONL.

Parquet rows follow ``embedding_schema``: fixed-size float lists for the
pooled vector and a list of fixed-size lists (one per real token) for the
sequence output, plus each row's ``content_hash`` and the run's
``model_fingerprint`` (and the text with ``--write_text``).  Rows are turned
into Arrow record batches column-wise with numpy (no per-float Python work)
and written by Beam's ``WriteToParquetBatched``; each table handed to it is
one Parquet row group.  TFRecord rows are ``tf.train.Example`` protos with
the same fields, the sequence flattened and its shape stored beside it.

Vectors are Arrow fixed-size lists (``fixed_size_list<float32>[H]``, which
Polars reads as ``Array(Float32, H)``), and every Parquet file says what it
holds in its footer: the key ``bert_zh_embed`` is a JSON description (model,
fingerprint, tokenizer settings, pooling, the meaning of each column;
``file_metadata``) and a few flat ``bert_zh_embed.*`` keys repeat the main
values for tools that list key-value metadata.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.transforms.window import GlobalWindows

from transforms.records import DeadLetter, DocumentEmbedding

FORMATS = ("parquet", "tfrecord")
SEQUENCE_DTYPES = ("float32", "float16")
PARQUET_CODECS = ("none", "snappy", "zstd", "gzip")
TFRECORD_COMPRESSIONS = ("none", "gzip")

# Rows buffered before they become one Arrow record batch (at most this
# many rows, at most about this many bytes of vectors), and bytes buffered
# before the batches are handed to the Parquet writer (one row group) when
# --parquet_row_group_rows does not fix the row count.  The byte limits keep
# a worker's memory bounded whatever the row size: one 512-token float32
# sequence row is 1.5 MiB, so 256 such rows would be 384 MiB.
_ROWS_PER_RECORD_BATCH = 256
_BYTES_PER_RECORD_BATCH = 8 * 1024 * 1024
_BYTES_PER_TABLE = 32 * 1024 * 1024


# Columns that only chunked runs (--long_text chunk) write.
CHUNK_COLUMNS = ("doc_id", "chunk_index", "num_chunks")

# Self-description: the footer key, and the version of the layout it
# describes (outputs without the key predate version 1).
METADATA_KEY = "bert_zh_embed"
SCHEMA_VERSION = 1
# Kinds of embedding files: rows per document or chunk, or (with
# --document_vectors) one averaged row per document.
KINDS = ("embeddings", "documents")
# Which row holds an id's vectors: in the index, and a column of the
# compacted dataset (``pipeline.compact``).
EMBEDDED_AS = "embedded_as"


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
    kind: str = "embeddings"

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


def file_suffix(file_format: str, tfrecord_compression: str = "none") -> str:
    """``.parquet``, ``.tfrecord``, or ``.tfrecord.gz`` (gzip TFRecord)."""
    if file_format == "tfrecord" and tfrecord_compression == "gzip":
        return ".tfrecord.gz"
    return "." + file_format


def embedding_schema(hidden_size: int, pooled: bool = True,
                     sequence: bool = True, chunked: bool = False,
                     write_text: bool = False,
                     sequence_dtype: str = "float32") -> pa.Schema:
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
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("model_fingerprint", pa.string(), nullable=False),
    ]
    if write_text:  # null on chunk rows after the first
        fields.append(pa.field("text", pa.string(), nullable=True))
    if pooled:
        fields.append(pa.field("pooled_output", vector, nullable=False))
    if sequence:
        token = pa.list_(pa.float16() if sequence_dtype == "float16"
                         else pa.float32(), hidden_size)
        fields.append(pa.field("sequence_output", pa.list_(token),
                               nullable=False))
    return pa.schema(fields)


def pooled_meaning(pooling: str = "cls", normalize: bool = False,
                   kind: str = "embeddings") -> str:
    """What ``pooled_output`` holds, in words."""
    if kind == "documents":
        what = "the mean of the document's chunks' pooled_output"
    elif pooling == "cls":
        what = "BERT's pooled output: tanh(dense(final [CLS] vector))"
    else:
        what = f"the vector pooled from the token vectors by '{pooling}'"
    return what + (", L2-normalized" if normalize else "")


def column_meanings(names: Sequence[str], pooling: str = "cls",
                    normalize: bool = False,
                    kind: str = "embeddings") -> dict[str, str]:
    """One line per column of ``names``: what its values are."""
    meanings = {
        "id": ("document id" if kind == "documents" else
               "document id; <doc_id>#<chunk_index> for chunk rows"),
        EMBEDDED_AS: ("the id whose row the vectors were embedded as: "
                      "another id with the same text under --dedup, "
                      "else this row's own document id"),
        "doc_id": "the document's id (chunked runs)",
        "chunk_index": "the chunk's number in its document, from 0",
        "num_chunks": "how many chunks the document has",
        "num_tokens": ("real tokens over all chunks" if kind == "documents"
                       else "real tokens, [CLS] and [SEP] included"),
        "truncated": "the text was cut to max_seq_length",
        "content_hash": "BLAKE2b-128 of the document text (UTF-8), hex",
        "model_fingerprint": ("model, vocabulary and tokenizer settings "
                              "that made the vectors, hashed"),
        "text": "the document text (on a chunked document's first chunk)",
        "pooled_output": pooled_meaning(pooling, normalize, kind),
        "sequence_output": ("one final-layer vector per real token, "
                            "num_tokens rows, no padding rows"),
    }
    return {name: meanings[name] for name in names if name in meanings}


def file_metadata(description: dict[str, Any], schema: pa.Schema,
                  kind: str = "embeddings") -> dict[str, str]:
    """The footer key-value metadata of an embeddings file of ``schema``:
    ``bert_zh_embed`` (JSON: ``description`` plus the kind of file and its
    columns' meanings) and flat ``bert_zh_embed.*`` copies of the main
    values."""
    record = dict(description)
    record["kind"] = kind
    record["columns"] = column_meanings(
        schema.names, record.get("pooling", "cls"),
        bool(record.get("normalize", False)), kind)
    model = record.get("model", {})
    flat = {"schema_version": record.get("schema_version", SCHEMA_VERSION),
            "kind": kind, "run_id": record.get("run_id", ""),
            "model_fingerprint": model.get("fingerprint", ""),
            "hidden_size": model.get("hidden_size", ""),
            "pooling": record.get("pooling", "cls"),
            "normalize": record.get("normalize", False)}
    metadata = {METADATA_KEY: json.dumps(record, ensure_ascii=False,
                                         sort_keys=True)}
    metadata.update({f"{METADATA_KEY}.{key}": json.dumps(value)
                     if isinstance(value, bool) else str(value)
                     for key, value in flat.items()})
    return metadata


def read_file_metadata(metadata: Optional[dict[bytes, bytes]]
                       ) -> Optional[dict[str, Any]]:
    """The ``bert_zh_embed`` description in a Parquet footer's key-value
    metadata, or None (a file written before version 1)."""
    raw = (metadata or {}).get(METADATA_KEY.encode())
    return json.loads(raw.decode("utf-8")) if raw else None


def _vectors(rows: np.ndarray, hidden_size: int,
             dtype: Any = np.float32) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(rows, dtype=dtype).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, hidden_size)


def to_record_batch(rows: Sequence[DocumentEmbedding], schema: pa.Schema,
                    model_fingerprint: str = "") -> pa.RecordBatch:
    """Column-wise conversion of embedding rows into one Arrow batch."""
    hidden = vector_width(schema)
    columns: dict[str, pa.Array] = {
        "id": pa.array([r.id for r in rows], pa.string()),
        "num_tokens": pa.array([r.num_tokens for r in rows], pa.int32()),
        "truncated": pa.array([r.truncated for r in rows], pa.bool_()),
        "content_hash": pa.array([r.content_hash for r in rows],
                                 pa.string()),
        "model_fingerprint": pa.array([model_fingerprint] * len(rows),
                                      pa.string()),
    }
    if "doc_id" in schema.names:
        columns["doc_id"] = pa.array([r.doc_id for r in rows], pa.string())
        columns["chunk_index"] = pa.array([r.chunk_index for r in rows],
                                          pa.int32())
        columns["num_chunks"] = pa.array([r.num_chunks for r in rows],
                                         pa.int32())
    if "text" in schema.names:
        columns["text"] = pa.array([r.text for r in rows], pa.string())
    if "pooled_output" in schema.names:
        columns["pooled_output"] = _vectors(
            np.stack([r.pooled_output for r in rows]), hidden)
    if "sequence_output" in schema.names:
        dtype = schema.field("sequence_output").type.value_type.value_type
        lengths = np.array([r.sequence_output.shape[0] for r in rows])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        tokens = _vectors(np.concatenate([r.sequence_output for r in rows]),
                          hidden, dtype.to_pandas_dtype())
        columns["sequence_output"] = pa.ListArray.from_arrays(
            pa.array(offsets), tokens)
    return pa.RecordBatch.from_arrays(
        [columns[name] for name in schema.names], schema=schema)


def vector_width(schema: pa.Schema) -> int:
    """The vector width (hidden size) of an embeddings schema."""
    for name in ("pooled_output", "sequence_output"):
        if name in schema.names:
            vector_type = schema.field(name).type
            if name == "sequence_output":
                vector_type = vector_type.value_type
            return vector_type.list_size
    raise ValueError("schema has no embedding column")


def _vector_bytes(row: DocumentEmbedding) -> int:
    """Bytes of the row's vectors (what dominates a buffered row's size)."""
    return sum(v.nbytes for v in (row.pooled_output, row.sequence_output)
               if v is not None)


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


def to_tf_example(row: DocumentEmbedding, chunked: bool = False,
                  model_fingerprint: str = "",
                  sequence_dtype: str = "float32",
                  write_text: bool = False) -> bytes:
    """A serialized ``tf.train.Example`` with the Parquet schema's fields.

    ``sequence_output`` is stored flat with ``sequence_shape`` =
    ``[num_tokens, hidden]`` so that a reader can restore the matrix.  A
    float32 sequence is a float list; a float16 one (TFRecord has no 16-bit
    float list) is one bytes value of little-endian float16, with
    ``sequence_dtype`` = ``float16`` beside it.
    """
    import tensorflow as tf
    feature = tf.train.Feature

    def ints(*values: int) -> tf.train.Feature:
        return feature(int64_list=tf.train.Int64List(value=values))

    def text(value: str) -> tf.train.Feature:
        return feature(bytes_list=tf.train.BytesList(
            value=[value.encode("utf-8")]))

    features = {"id": text(row.id), "num_tokens": ints(row.num_tokens),
                "truncated": ints(int(row.truncated)),
                "content_hash": text(row.content_hash),
                "model_fingerprint": text(model_fingerprint)}
    if chunked:
        features.update(doc_id=text(row.doc_id),
                        chunk_index=ints(row.chunk_index),
                        num_chunks=ints(row.num_chunks))
    if write_text and row.text is not None:
        features["text"] = text(row.text)
    if row.pooled_output is not None:
        features["pooled_output"] = feature(float_list=tf.train.FloatList(
            value=row.pooled_output))
    if row.sequence_output is not None:
        features.update(_sequence_features(row.sequence_output,
                                           sequence_dtype))
    example = tf.train.Example(features=tf.train.Features(feature=features))
    return example.SerializeToString()


def _sequence_features(sequence: np.ndarray, dtype: str) -> dict[str, Any]:
    import tensorflow as tf
    feature = tf.train.Feature
    shape = feature(int64_list=tf.train.Int64List(value=sequence.shape))
    if dtype == "float16":
        data = np.ascontiguousarray(sequence, dtype="<f2").tobytes()
        return {"sequence_output": feature(bytes_list=tf.train.BytesList(
                    value=[data])),
                "sequence_dtype": feature(bytes_list=tf.train.BytesList(
                    value=[b"float16"])),
                "sequence_shape": shape}
    return {"sequence_output": feature(float_list=tf.train.FloatList(
                value=sequence.reshape(-1))),
            "sequence_shape": shape}


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
        if self._format == "parquet":
            return (rows
                    | "ToArrow" >> beam.ParDo(_ToArrowTables(
                        self._schema, s.model_fingerprint, s.row_group_rows))
                    | "WriteParquet" >> beam.io.WriteToParquetBatched(
                        self._prefix, self._schema,
                        codec=s.parquet_compression, file_name_suffix=suffix,
                        num_shards=self._num_shards))
        compression = (CompressionTypes.GZIP
                       if s.tfrecord_compression == "gzip"
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
        self._prefix = output_prefix + "-errors"

    def expand(self, dead: beam.PCollection) -> Any:
        return (dead
                | "ToJson" >> beam.Map(DeadLetter.to_json)
                | "WriteJsonl" >> beam.io.WriteToText(
                    self._prefix, file_name_suffix=".jsonl"))


DOCUMENTS_SUFFIX = "-documents"
INDEX_SUFFIX = "-index/part"
DELETED_SUFFIX = "-deleted"
SUMMARY_SUFFIX = "-summary.json"
MANIFEST_SUFFIX = "-manifest.json"
# What a run publishes besides: the description of its files (every format;
# TFRecord files have no footer to hold it) and, for Parquet, DuckDB views
# of its current dataset with the vectors typed FLOAT[H]
# (``pipeline.views``).  ``pipeline.compact`` writes a manifest of its own.
SCHEMA_SUFFIX = "-schema.json"
DUCKDB_SUFFIX = "-duckdb.sql"
COMPACT_SUFFIX = "-compact.json"


# Shard numbers in file names: a glob that finds them, and the exact form
# Beam's default shard name template (``-SSSSS-of-NNNNN``) writes, at least
# five digits each.  The glob alone also matches other prefixes' files:
# ``emb-[0-9]*-of-[0-9]*.parquet`` matches ``emb-2024-05-02-00000-of-00001``.
SHARD_GLOB = "[0-9]*-of-[0-9]*"
SHARD_REGEX = r"\d{5,}-of-\d{5,}"


def output_patterns(prefix: str, file_format: str,
                    tfrecord_compression: str = "none") -> dict[str, str]:
    """Glob patterns of the files a run with ``prefix`` writes (the summary
    and the manifest are single files, named by their suffixes).  Filter
    what they match with ``output_regex``: only that is this prefix's."""
    ext = file_suffix(file_format, tfrecord_compression)
    shards = SHARD_GLOB
    return {
        "embeddings": f"{prefix}-{shards}{ext}",
        "documents": f"{prefix}{DOCUMENTS_SUFFIX}-{shards}{ext}",
        "errors": f"{prefix}-errors-{shards}.jsonl",
        "index": f"{prefix}{INDEX_SUFFIX}-{shards}.parquet",
        "deleted": f"{prefix}{DELETED_SUFFIX}-{shards}.jsonl",
    }


def output_regex(pattern: str) -> re.Pattern[str]:
    """The exact form of an ``output_patterns`` glob: its prefix literally
    and Beam's shard digits where the glob has ``SHARD_GLOB``, so that
    ``fullmatch`` accepts only the files of that very prefix."""
    head, found, tail = pattern.partition(SHARD_GLOB)
    if not found:
        return re.compile(re.escape(pattern))
    return re.compile(re.escape(head) + SHARD_REGEX + re.escape(tail))
