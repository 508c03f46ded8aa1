"""The output contract: ``DocumentEmbedding`` rows <-> Parquet and TFRecord
files, dead letters <-> JSON lines, and the names of a run's files.

Everything that writes or reads a run's output takes its names from here:
the column names, the Parquet schema and footer metadata, the
``tf.train.Example`` features (encoded by ``to_tf_example``, decoded by
``example_values``), the dead-letter line (``dead_letter_line``,
``dead_letter_of_line``) and the file layout of a run at output prefix ``P``:

* ``P-SSSSS-of-NNNNN.<ext>``: embedding rows (``ext``: ``file_suffix``);
* ``P-documents-SSSSS-of-NNNNN.<ext>``: document vectors;
* ``P-errors-SSSSS-of-NNNNN.jsonl``: dead letters;
* ``P-index/part-SSSSS-of-NNNNN.parquet``: the index (``INDEX_COLUMNS``);
* ``P-deleted-SSSSS-of-NNNNN.jsonl``: documents deleted since the previous
  index;
* ``P-summary.json``, ``P-manifest.json`` (last), ``P-schema.json``,
  ``P-duckdb.sql``, ``P-compact.json`` (a compaction's manifest);
* ``P.lock`` while a run holds the output, ``P.tmp-<run id>/`` while it
  stages its files.

Parquet rows follow ``embedding_schema``: fixed-size float lists for the
pooled vector and a list of fixed-size lists (one per real token) for the
sequence output, plus each row's ``content_hash`` and the run's
``model_fingerprint`` (and the text with ``--write_text``).  Vectors are
Arrow fixed-size lists (``fixed_size_list<float32>[H]``, which Polars reads
as ``Array(Float32, H)``), and every Parquet file says what it holds in its
footer: the key ``bert_zh_embed`` is a JSON description (model,
fingerprint, tokenizer settings, pooling, the meaning of each column;
``file_metadata``) and a few flat ``bert_zh_embed.*`` keys repeat the main
values for tools that list key-value metadata.  TFRecord rows are
``tf.train.Example`` protos with the same fields, the sequence flattened
and its shape stored beside it.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
from typing import Any, Collection, Optional, Sequence

import numpy as np
import pyarrow as pa

from transforms.records import DeadLetter, DocumentEmbedding, safe_excerpt

# --- Columns -----------------------------------------------------------------

ID = "id"
DOC_ID = "doc_id"
CHUNK_INDEX = "chunk_index"
NUM_CHUNKS = "num_chunks"
NUM_TOKENS = "num_tokens"
TRUNCATED = "truncated"
CONTENT_HASH = "content_hash"
MODEL_FINGERPRINT = "model_fingerprint"
TEXT = "text"
POOLED_OUTPUT = "pooled_output"
SEQUENCE_OUTPUT = "sequence_output"
# Which row holds an id's vectors: in the index, and a column of the
# compacted dataset (``pipeline.compact``).
EMBEDDED_AS = "embedded_as"
# The run whose files hold a document's rows (index files).
RUN_ID = "run_id"
# TFRecord only: the sequence's [num_tokens, hidden] shape, and
# ``float16`` when it is stored as bytes.
SEQUENCE_SHAPE = "sequence_shape"
SEQUENCE_DTYPE = "sequence_dtype"

# Columns that only chunked runs (--long_text chunk) write.
CHUNK_COLUMNS = (DOC_ID, CHUNK_INDEX, NUM_CHUNKS)
VECTOR_COLUMNS = (POOLED_OUTPUT, SEQUENCE_OUTPUT)
# Columns of the index files (``transforms.incremental``).
INDEX_COLUMNS = (ID, CONTENT_HASH, MODEL_FINGERPRINT, RUN_ID, EMBEDDED_AS)
INDEX_SCHEMA = pa.schema([pa.field(name, pa.string(), nullable=False)
                          for name in INDEX_COLUMNS])
INDEX_MEANINGS = {
    ID: "a document id of the current dataset (one entry per id)",
    CONTENT_HASH: "BLAKE2b-128 of its text",
    MODEL_FINGERPRINT: "the fingerprint of the vectors it resolves to",
    RUN_ID: "the run whose files hold those vectors",
    EMBEDDED_AS: ("the id of the row holding them: the id itself, or under "
                  "--dedup the document with the same text that was "
                  "embedded"),
}

# Self-description: the footer key, and the version of the layout it
# describes (outputs without the key predate version 1).
METADATA_KEY = "bert_zh_embed"
SCHEMA_VERSION = 1
# Kinds of embedding files: rows per document or chunk, or (with
# --document_vectors) one averaged row per document.
EMBEDDINGS = "embeddings"
DOCUMENTS = "documents"
KINDS = (EMBEDDINGS, DOCUMENTS)
# The other kinds of a run's shard files (``output_patterns``).
ERRORS = "errors"
INDEX = "index"
DELETED = "deleted"


def document_key(names: Collection[str]) -> str:
    """The column that names a row's document: ``doc_id`` in chunked files,
    else ``id``."""
    return DOC_ID if DOC_ID in names else ID


# --- File names --------------------------------------------------------------

PARQUET = "parquet"
TFRECORD = "tfrecord"
GZIP = "gzip"  # the one TFRecord compression
PARQUET_EXT = "." + PARQUET
TFRECORD_EXT = "." + TFRECORD
GZIP_EXT = ".gz"
JSONL_EXT = ".jsonl"

DOCUMENTS_SUFFIX = "-" + DOCUMENTS
ERRORS_SUFFIX = "-" + ERRORS
INDEX_SUFFIX = "-" + INDEX + "/part"
DELETED_SUFFIX = "-" + DELETED
SUMMARY_SUFFIX = "-summary.json"
MANIFEST_SUFFIX = "-manifest.json"
# What a run publishes besides: the description of its files (every format;
# TFRecord files have no footer to hold it) and, for Parquet, DuckDB views
# of its current dataset with the vectors typed FLOAT[H]
# (``pipeline.views``).  ``pipeline.compact`` writes a manifest of its own.
SCHEMA_SUFFIX = "-schema.json"
DUCKDB_SUFFIX = "-duckdb.sql"
COMPACT_SUFFIX = "-compact.json"
# A run's lease file ``<output>.lock`` (``pipeline.lock``), which exists
# from launch on, before any manifest.
LOCK_SUFFIX = ".lock"
# ``<output>.tmp-<run id>/``: where a run stages its files
# (``pipeline.publish``).
STAGING_MARK = ".tmp-"

# Shard numbers in file names: a glob that finds them, and the exact form
# Beam's default shard name template (``-SSSSS-of-NNNNN``) writes, at least
# five digits each.  The glob alone also matches other prefixes' files:
# ``emb-[0-9]*-of-[0-9]*.parquet`` matches ``emb-2024-05-02-00000-of-00001``.
SHARD_GLOB = "[0-9]*-of-[0-9]*"
SHARD_REGEX = r"\d{5,}-of-\d{5,}"
# Any shard file: (prefix, shard, count, extension).
_SHARD_PATH = re.compile(r"^(.*)-(\d+)-of-(\d+)(\.[^/]*)$")


def file_suffix(file_format: str, tfrecord_compression: str = "none") -> str:
    """``.parquet``, ``.tfrecord``, or ``.tfrecord.gz`` (gzip TFRecord)."""
    if file_format == TFRECORD and tfrecord_compression == GZIP:
        return TFRECORD_EXT + GZIP_EXT
    return "." + file_format


def file_format(path: str) -> Optional[str]:
    """``parquet`` or ``tfrecord`` by the suffix of an embeddings file
    (``.tfrecord.gz`` too), None for anything else."""
    if path.endswith(PARQUET_EXT):
        return PARQUET
    if path.endswith((TFRECORD_EXT, TFRECORD_EXT + GZIP_EXT)):
        return TFRECORD
    return None


def tf_compression(path: str) -> str:
    """The ``compression_type`` of ``tf.data.TFRecordDataset`` for a
    TFRecord file: ``GZIP`` for ``.gz``, else none."""
    return "GZIP" if path.endswith(GZIP_EXT) else ""


def shard_name(shard: int, count: int) -> str:
    """``-SSSSS-of-NNNNN``, as Beam's default shard name template writes
    it."""
    return f"-{shard:05d}-of-{count:05d}"


def parse_shard(path: str) -> Optional[tuple[str, int, int, str]]:
    """``(prefix, shard, count, extension)`` of a ``-SSSSS-of-NNNNN`` file
    name, None for another name."""
    match = _SHARD_PATH.match(path)
    if not match:
        return None
    prefix, shard, count, suffix = match.groups()
    return prefix, int(shard), int(count), suffix


def output_patterns(prefix: str, file_format: str,
                    tfrecord_compression: str = "none") -> dict[str, str]:
    """Glob patterns of the files a run with ``prefix`` writes (the summary
    and the manifest are single files, named by their suffixes).  Filter
    what they match with ``output_regex``: only that is this prefix's."""
    ext = file_suffix(file_format, tfrecord_compression)
    shards = SHARD_GLOB
    return {
        EMBEDDINGS: f"{prefix}-{shards}{ext}",
        DOCUMENTS: f"{prefix}{DOCUMENTS_SUFFIX}-{shards}{ext}",
        ERRORS: f"{prefix}{ERRORS_SUFFIX}-{shards}{JSONL_EXT}",
        INDEX: f"{prefix}{INDEX_SUFFIX}-{shards}{PARQUET_EXT}",
        DELETED: f"{prefix}{DELETED_SUFFIX}-{shards}{JSONL_EXT}",
    }


def output_regex(pattern: str) -> re.Pattern[str]:
    """The exact form of an ``output_patterns`` glob: its prefix literally
    and Beam's shard digits where the glob has ``SHARD_GLOB``, so that
    ``fullmatch`` accepts only the files of that very prefix."""
    head, found, tail = pattern.partition(SHARD_GLOB)
    if not found:
        return re.compile(re.escape(pattern))
    return re.compile(re.escape(head) + SHARD_REGEX + re.escape(tail))


def manifest_of(index: str) -> str:
    """The manifest an ``--index`` names: a ``*.json`` path as given, else
    the manifest of that output prefix."""
    return index if index.endswith(".json") else index + MANIFEST_SUFFIX


def run_prefix_of_manifest(name: str) -> Optional[str]:
    """``emb-`` for the manifest file name ``emb-manifest.json`` (what the
    run's other files start with), None for another name."""
    if not name.endswith(MANIFEST_SUFFIX):
        return None
    return name[:-len(MANIFEST_SUFFIX) + 1]


def staging_dir(output: str, run_id: str) -> str:
    """``<output>.tmp-<run_id>``: the directory a run writes into."""
    return f"{output}{STAGING_MARK}{run_id}"


def staging_prefix(output: str, run_id: str) -> str:
    """The output prefix inside the staging directory: files keep their
    final base names there."""
    return f"{staging_dir(output, run_id)}/{posixpath.basename(output)}"


# --- Parquet: schema and footer ----------------------------------------------


def embedding_schema(hidden_size: int, pooled: bool = True,
                     sequence: bool = True, chunked: bool = False,
                     write_text: bool = False,
                     sequence_dtype: str = "float32") -> pa.Schema:
    """The Parquet schema of an embeddings file."""
    vector = pa.list_(pa.float32(), hidden_size)
    fields = [pa.field(ID, pa.string(), nullable=False)]
    if chunked:
        fields += [pa.field(DOC_ID, pa.string(), nullable=False),
                   pa.field(CHUNK_INDEX, pa.int32(), nullable=False),
                   pa.field(NUM_CHUNKS, pa.int32(), nullable=False)]
    fields += [
        pa.field(NUM_TOKENS, pa.int32(), nullable=False),
        pa.field(TRUNCATED, pa.bool_(), nullable=False),
        pa.field(CONTENT_HASH, pa.string(), nullable=False),
        pa.field(MODEL_FINGERPRINT, pa.string(), nullable=False),
    ]
    if write_text:  # null on chunk rows after the first
        fields.append(pa.field(TEXT, pa.string(), nullable=True))
    if pooled:
        fields.append(pa.field(POOLED_OUTPUT, vector, nullable=False))
    if sequence:
        token = pa.list_(pa.float16() if sequence_dtype == "float16"
                         else pa.float32(), hidden_size)
        fields.append(pa.field(SEQUENCE_OUTPUT, pa.list_(token),
                               nullable=False))
    return pa.schema(fields)


def vector_width(schema: pa.Schema) -> int:
    """The vector width (hidden size) of an embeddings schema."""
    for name in VECTOR_COLUMNS:
        if name in schema.names:
            vector_type = schema.field(name).type
            if name == SEQUENCE_OUTPUT:
                vector_type = vector_type.value_type
            return vector_type.list_size
    raise ValueError("schema has no embedding column")


def parquet_writer_options(schema: pa.Schema) -> dict[str, Any]:
    """``pyarrow.parquet.ParquetWriter`` settings for a file of ``schema``:
    dictionary pages and min/max statistics for the scalar columns only.

    Float vectors never repeat enough for a dictionary (Arrow tries one on
    each column chunk, then gives it up) and their min/max filter nothing,
    yet both cost time on every row group: on BERT-Base rows the writer
    takes ~0.6x as long without them (``bench/RESULTS.md``).  Files read
    the same either way.
    """
    scalars = [field.name for field in schema
               if not pa.types.is_list(field.type)
               and not pa.types.is_fixed_size_list(field.type)]
    return {"use_dictionary": scalars, "write_statistics": scalars}


def pooled_meaning(pooling: str = "cls", normalize: bool = False,
                   kind: str = EMBEDDINGS) -> str:
    """What ``pooled_output`` holds, in words."""
    if kind == DOCUMENTS:
        what = "the mean of the document's chunks' pooled_output"
    elif pooling == "cls":
        what = "BERT's pooled output: tanh(dense(final [CLS] vector))"
    else:
        what = f"the vector pooled from the token vectors by '{pooling}'"
    return what + (", L2-normalized" if normalize else "")


def column_meanings(names: Sequence[str], pooling: str = "cls",
                    normalize: bool = False,
                    kind: str = EMBEDDINGS) -> dict[str, str]:
    """One line per column of ``names``: what its values are."""
    meanings = {
        ID: ("document id" if kind == DOCUMENTS else
             "document id; <doc_id>#<chunk_index> for chunk rows"),
        EMBEDDED_AS: ("the id whose row the vectors were embedded as: "
                      "another id with the same text under --dedup, "
                      "else this row's own document id"),
        DOC_ID: "the document's id (chunked runs)",
        CHUNK_INDEX: "the chunk's number in its document, from 0",
        NUM_CHUNKS: "how many chunks the document has",
        NUM_TOKENS: ("real tokens over all chunks" if kind == DOCUMENTS
                     else "real tokens, [CLS] and [SEP] included"),
        TRUNCATED: "the text was cut to max_seq_length",
        CONTENT_HASH: "BLAKE2b-128 of the document text (UTF-8), hex",
        MODEL_FINGERPRINT: ("model, vocabulary and tokenizer settings "
                            "that made the vectors, hashed"),
        TEXT: "the document text (on a chunked document's first chunk)",
        POOLED_OUTPUT: pooled_meaning(pooling, normalize, kind),
        SEQUENCE_OUTPUT: ("one final-layer vector per real token, "
                          "num_tokens rows, no padding rows"),
    }
    return {name: meanings[name] for name in names if name in meanings}


def file_metadata(description: dict[str, Any], schema: pa.Schema,
                  kind: str = EMBEDDINGS) -> dict[str, str]:
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
            "kind": kind, RUN_ID: record.get(RUN_ID, ""),
            MODEL_FINGERPRINT: model.get("fingerprint", ""),
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


# --- Parquet: rows <-> Arrow -------------------------------------------------


def vector_array(matrix: np.ndarray, dtype: Any = np.float32,
                 width: Optional[int] = None) -> pa.FixedSizeListArray:
    """A fixed-size list array, one ``matrix`` row per element (rows of
    ``width``, by default the matrix's)."""
    flat = pa.array(np.ascontiguousarray(matrix, dtype=dtype).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(
        flat, matrix.shape[1] if width is None else width)


def sequence_array(matrices: Sequence[np.ndarray], dtype: Any = np.float32,
                   width: Optional[int] = None) -> pa.ListArray:
    """A list-of-vectors array, one ``[tokens, hidden]`` matrix per
    element."""
    lengths = np.array([m.shape[0] for m in matrices])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(
        pa.array(offsets),
        vector_array(np.concatenate(matrices), dtype, width))


def to_record_batch(rows: Sequence[DocumentEmbedding], schema: pa.Schema,
                    model_fingerprint: str = "") -> pa.RecordBatch:
    """Column-wise conversion of embedding rows into one Arrow batch."""
    hidden = vector_width(schema)
    columns: dict[str, pa.Array] = {
        ID: pa.array([r.id for r in rows], pa.string()),
        NUM_TOKENS: pa.array([r.num_tokens for r in rows], pa.int32()),
        TRUNCATED: pa.array([r.truncated for r in rows], pa.bool_()),
        CONTENT_HASH: pa.array([r.content_hash for r in rows], pa.string()),
        MODEL_FINGERPRINT: pa.array([model_fingerprint] * len(rows),
                                    pa.string()),
    }
    if DOC_ID in schema.names:
        columns[DOC_ID] = pa.array([r.doc_id for r in rows], pa.string())
        columns[CHUNK_INDEX] = pa.array([r.chunk_index for r in rows],
                                        pa.int32())
        columns[NUM_CHUNKS] = pa.array([r.num_chunks for r in rows],
                                       pa.int32())
    if TEXT in schema.names:
        columns[TEXT] = pa.array([r.text for r in rows], pa.string())
    if POOLED_OUTPUT in schema.names:
        columns[POOLED_OUTPUT] = vector_array(
            np.stack([r.pooled_output for r in rows]), width=hidden)
    if SEQUENCE_OUTPUT in schema.names:
        dtype = schema.field(SEQUENCE_OUTPUT).type.value_type.value_type
        columns[SEQUENCE_OUTPUT] = sequence_array(
            [r.sequence_output for r in rows], dtype.to_pandas_dtype(),
            hidden)
    return pa.RecordBatch.from_arrays(
        [columns[name] for name in schema.names], schema=schema)


def _combined(column: Any) -> Any:
    """One Arrow array from a (chunked) column."""
    return column.combine_chunks() if hasattr(column, "combine_chunks") \
        else column


def vector_matrix(column: Any, name: str) -> np.ndarray:
    """``[rows, width]`` numpy from a column of equally long vectors: Arrow
    fixed-size lists, or plain lists (outputs written before vectors were
    fixed-size, or by other tools)."""
    import pyarrow.compute as pc
    array = _combined(column)
    values = array.flatten().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(array.type):
        return values.reshape(len(array), array.type.list_size)
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    if len(set(lengths.tolist())) > 1:
        raise ValueError(f"{name}: vectors of different lengths "
                         f"({sorted(set(lengths.tolist()))[:3]})")
    width = int(lengths[0]) if len(lengths) else 0
    return values.reshape(len(array), width)


def sequence_matrices(column: Any) -> list[np.ndarray]:
    """Each row's ``[tokens, width]`` matrix from a list-of-vectors
    column."""
    import pyarrow.compute as pc
    array = _combined(column)
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    flat = vector_matrix(array.flatten(), SEQUENCE_OUTPUT)
    ends = np.cumsum(lengths)
    return [flat[end - n:end] for n, end in zip(lengths, ends)]


def table_columns(table: pa.Table) -> dict[str, Any]:
    """The columns of an Arrow table of embedding rows, decoded:
    ``pooled_output`` a ``[rows, hidden]`` matrix, ``sequence_output`` one
    ``[tokens, hidden]`` matrix per row, integer and boolean columns numpy
    arrays, the others Python lists.  The inverse of ``to_record_batch``."""
    columns: dict[str, Any] = {}
    for name in table.column_names:
        column = table.column(name)
        if name == POOLED_OUTPUT:
            columns[name] = vector_matrix(column, name)
        elif name == SEQUENCE_OUTPUT:
            columns[name] = sequence_matrices(column)
        elif pa.types.is_integer(column.type) or \
                pa.types.is_boolean(column.type):
            columns[name] = column.to_numpy(zero_copy_only=False)
        else:
            columns[name] = column.to_pylist()
    return columns


def fixed_vectors(table: pa.Table) -> pa.Table:
    """``table`` with its vector columns as fixed-size lists (plain lists
    of older outputs converted; already fixed ones kept) and no schema
    metadata."""
    table = table.replace_schema_metadata()
    for name in VECTOR_COLUMNS:
        if name not in table.column_names:
            continue
        column = table.column(name)
        fixed = (column.type if name == POOLED_OUTPUT
                 else column.type.value_type)
        if pa.types.is_fixed_size_list(fixed):
            continue
        if name == POOLED_OUTPUT:
            array = vector_array(vector_matrix(column, name))
        else:
            import pyarrow.compute as pc
            array = _combined(column)
            tokens = vector_matrix(array.flatten(), name)
            lengths = pc.list_value_length(array).to_numpy(
                zero_copy_only=False)
            array = pa.ListArray.from_arrays(
                pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(
                    np.int32)), vector_array(tokens, tokens.dtype))
        table = table.set_column(table.column_names.index(name), name, array)
    return table


# --- TFRecord: rows <-> tf.train.Example -------------------------------------


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

    features = {ID: text(row.id), NUM_TOKENS: ints(row.num_tokens),
                TRUNCATED: ints(int(row.truncated)),
                CONTENT_HASH: text(row.content_hash),
                MODEL_FINGERPRINT: text(model_fingerprint)}
    if chunked:
        features.update({DOC_ID: text(row.doc_id),
                         CHUNK_INDEX: ints(row.chunk_index),
                         NUM_CHUNKS: ints(row.num_chunks)})
    if write_text and row.text is not None:
        features[TEXT] = text(row.text)
    if row.pooled_output is not None:
        features[POOLED_OUTPUT] = feature(float_list=tf.train.FloatList(
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
        return {SEQUENCE_OUTPUT: feature(bytes_list=tf.train.BytesList(
                    value=[data])),
                SEQUENCE_DTYPE: feature(bytes_list=tf.train.BytesList(
                    value=[b"float16"])),
                SEQUENCE_SHAPE: shape}
    return {SEQUENCE_OUTPUT: feature(float_list=tf.train.FloatList(
                value=sequence.reshape(-1))),
            SEQUENCE_SHAPE: shape}


_TEXT_FEATURES = (ID, DOC_ID, CONTENT_HASH, MODEL_FINGERPRINT, TEXT)
_INT_FEATURES = (NUM_TOKENS, CHUNK_INDEX, NUM_CHUNKS)


def example_values(record: bytes, names: Optional[Collection[str]] = None
                   ) -> dict[str, Any]:
    """The columns of one serialized ``tf.train.Example`` that it holds
    (only ``names`` when given): strings, ints, ``truncated`` a bool,
    ``pooled_output`` float32 ``[hidden]``, ``sequence_output`` its
    ``[num_tokens, hidden]`` matrix as written (float32 or float16).  The
    inverse of ``to_tf_example``."""
    import tensorflow as tf
    feature = tf.train.Example.FromString(record).features.feature
    wanted = [name for name in feature
              if names is None or name in names]
    values: dict[str, Any] = {}
    for name in wanted:
        if name in _TEXT_FEATURES:
            values[name] = feature[name].bytes_list.value[0].decode("utf-8")
        elif name in _INT_FEATURES:
            values[name] = feature[name].int64_list.value[0]
        elif name == TRUNCATED:
            values[name] = bool(feature[name].int64_list.value[0])
        elif name == POOLED_OUTPUT:
            values[name] = np.array(feature[name].float_list.value,
                                    dtype=np.float32)
        elif name == SEQUENCE_OUTPUT:
            values[name] = _sequence(feature)
    return values


def _sequence(feature: Any) -> np.ndarray:
    """A row's sequence matrix: float list, or float16 bytes."""
    shape = tuple(feature[SEQUENCE_SHAPE].int64_list.value)
    dtype = (feature[SEQUENCE_DTYPE].bytes_list.value[0].decode("utf-8")
             if SEQUENCE_DTYPE in feature else "float32")
    if dtype == "float16":
        data = feature[SEQUENCE_OUTPUT].bytes_list.value[0]
        return np.frombuffer(data, dtype="<f2").astype(np.float16).reshape(
            shape)
    return np.array(feature[SEQUENCE_OUTPUT].float_list.value,
                    dtype=np.float32).reshape(shape)


def tfrecord_features(schema: pa.Schema, sequence_dtype: str
                      ) -> dict[str, str]:
    """The ``tf.train.Example`` features of a TFRecord file whose rows have
    ``schema``'s columns (``to_tf_example``), in words."""
    hidden = 0
    for name in VECTOR_COLUMNS:
        if name in schema.names:
            vector = schema.field(name).type
            hidden = (vector.value_type if name == SEQUENCE_OUTPUT
                      else vector).list_size
    kinds = {ID: "bytes", DOC_ID: "bytes", CONTENT_HASH: "bytes",
             MODEL_FINGERPRINT: "bytes", TEXT: "bytes",
             NUM_TOKENS: "int64", TRUNCATED: "int64 (0 or 1)",
             CHUNK_INDEX: "int64", NUM_CHUNKS: "int64",
             POOLED_OUTPUT: f"float list of {hidden}"}
    features = {name: kinds[name] for name in schema.names if name in kinds}
    if SEQUENCE_OUTPUT in schema.names:
        features[SEQUENCE_SHAPE] = f"int64 [num_tokens, {hidden}]"
        if sequence_dtype == "float16":
            features[SEQUENCE_OUTPUT] = ("bytes: little-endian float16, "
                                         "num_tokens x hidden, row-major")
            features[SEQUENCE_DTYPE] = "bytes: float16"
        else:
            features[SEQUENCE_OUTPUT] = ("float list of num_tokens x "
                                         "hidden, row-major")
    return features


# --- Dead letters <-> JSON lines ---------------------------------------------


def dead_letter_line(letter: DeadLetter) -> str:
    """One JSON line; non-ASCII kept readable, the excerpt cut to a safe
    size."""
    record: dict[str, Any] = dataclasses.asdict(letter)
    record["excerpt"] = safe_excerpt(letter.excerpt)
    return json.dumps(record, ensure_ascii=False)


def dead_letter_of_line(line: str) -> DeadLetter:
    """The ``DeadLetter`` of one line of an errors file (its excerpt as
    written, i.e. cut and escaped)."""
    return DeadLetter(**json.loads(line))
