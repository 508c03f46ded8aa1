"""Loading a run's embeddings back into numpy, from Parquet or TFRecord.

    from pipeline.read_embeddings import load_embeddings
    emb = load_embeddings("out/news-*-of-*.parquet")
    emb.ids, emb.pooled_output.shape, emb.sequence_output[0].shape

The format is taken from the file suffix.  Rows come back sorted by id so
that two runs (or the two formats) compare row for row.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass
class Embeddings:
    """All rows of an embeddings dataset, as numpy arrays."""
    ids: list[str]
    num_tokens: np.ndarray  # int32 [n]
    truncated: np.ndarray  # bool [n]
    pooled_output: Optional[np.ndarray]  # float32 [n, hidden]
    sequence_output: Optional[list[np.ndarray]]  # n x float32 [tokens, hidden]
    # Chunked runs only (--long_text chunk):
    doc_ids: Optional[list[str]] = None
    chunk_index: Optional[np.ndarray] = None  # int32 [n]
    num_chunks: Optional[np.ndarray] = None  # int32 [n]

    def __len__(self) -> int:
        return len(self.ids)


def _match(pattern: str) -> list[str]:
    from apache_beam.io.filesystems import FileSystems
    files = sorted(m.path for m in FileSystems.match([pattern])[0]
                   .metadata_list)
    if not files:
        raise FileNotFoundError(f"no embedding files match {pattern}")
    return files


def _sorted(emb: Embeddings) -> Embeddings:
    """Rows by id, or by (doc_id, chunk_index) for chunked runs."""
    if emb.doc_ids is not None:
        key = lambda i: (emb.doc_ids[i], int(emb.chunk_index[i]))  # noqa
    else:
        key = emb.ids.__getitem__
    order = sorted(range(len(emb.ids)), key=key)

    def pick(values):
        if values is None:
            return None
        if isinstance(values, list):
            return [values[i] for i in order]
        return values[order]

    return Embeddings(**{field.name: pick(getattr(emb, field.name))
                         for field in dataclasses.fields(emb)})


def read_parquet(files: list[str]) -> Embeddings:
    """Reads Parquet files written with ``transforms.write.embedding_schema``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems
    tables = []
    for path in files:
        with FileSystems.open(path) as handle:
            tables.append(pq.read_table(handle))
    table = pa.concat_tables(tables)
    pooled = sequence = None
    if "pooled_output" in table.column_names:
        column = table.column("pooled_output").combine_chunks()
        pooled = column.flatten().to_numpy().reshape(len(column),
                                                     column.type.list_size)
    if "sequence_output" in table.column_names:
        column = table.column("sequence_output").combine_chunks()
        hidden = column.type.value_type.list_size
        offsets = column.offsets.to_numpy()
        flat = column.values.flatten().to_numpy().reshape(-1, hidden)
        sequence = [flat[offsets[i]:offsets[i + 1]]
                    for i in range(len(column))]
    chunked = "doc_id" in table.column_names
    return Embeddings(
        ids=table.column("id").to_pylist(),
        num_tokens=table.column("num_tokens").to_numpy().astype(np.int32),
        truncated=table.column("truncated").to_numpy(
            zero_copy_only=False).astype(bool),
        pooled_output=pooled, sequence_output=sequence,
        doc_ids=table.column("doc_id").to_pylist() if chunked else None,
        chunk_index=(table.column("chunk_index").to_numpy().astype(np.int32)
                     if chunked else None),
        num_chunks=(table.column("num_chunks").to_numpy().astype(np.int32)
                    if chunked else None))


def read_tfrecord(files: list[str]) -> Embeddings:
    """Reads TFRecord files of ``tf.train.Example`` embedding rows."""
    import tensorflow as tf
    ids, num_tokens, truncated, pooled, sequence = [], [], [], [], []
    doc_ids, chunk_index, num_chunks = [], [], []
    for record in tf.data.TFRecordDataset(files):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        ids.append(feature["id"].bytes_list.value[0].decode("utf-8"))
        num_tokens.append(feature["num_tokens"].int64_list.value[0])
        truncated.append(bool(feature["truncated"].int64_list.value[0]))
        if "doc_id" in feature:
            doc_ids.append(feature["doc_id"].bytes_list.value[0].decode())
            chunk_index.append(feature["chunk_index"].int64_list.value[0])
            num_chunks.append(feature["num_chunks"].int64_list.value[0])
        if "pooled_output" in feature:
            pooled.append(np.array(feature["pooled_output"].float_list.value,
                                   dtype=np.float32))
        if "sequence_output" in feature:
            shape = tuple(feature["sequence_shape"].int64_list.value)
            sequence.append(np.array(
                feature["sequence_output"].float_list.value,
                dtype=np.float32).reshape(shape))
    return Embeddings(
        ids=ids, num_tokens=np.array(num_tokens, dtype=np.int32),
        truncated=np.array(truncated, dtype=bool),
        pooled_output=np.stack(pooled) if pooled else None,
        sequence_output=sequence if sequence else None,
        doc_ids=doc_ids or None,
        chunk_index=np.array(chunk_index, np.int32) if doc_ids else None,
        num_chunks=np.array(num_chunks, np.int32) if doc_ids else None)


def load_embeddings(pattern: str) -> Embeddings:
    """Loads every file matching ``pattern`` (``.parquet`` or ``.tfrecord``)."""
    files = _match(pattern)
    if all(f.endswith(".parquet") for f in files):
        emb = read_parquet(files)
    elif all(f.endswith(".tfrecord") for f in files):
        emb = read_tfrecord(files)
    else:
        raise ValueError(f"{pattern} matches files that are not all .parquet "
                         f"or all .tfrecord: {files[:3]}")
    return _sorted(emb)
