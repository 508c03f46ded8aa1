"""Loading a run's embeddings back into numpy, from Parquet or TFRecord.

    from pipeline.read_embeddings import load_embeddings, load_index
    emb = load_embeddings("out/news-*-of-*.parquet")   # one run's files
    emb = load_index("out/2024-05-02/news-manifest.json")  # current dataset
    emb.ids, emb.pooled_output.shape, emb.sequence_output[0].shape

The format is taken from the file suffix (``.parquet``, ``.tfrecord``,
``.tfrecord.gz``).  Rows come back sorted by id so that two runs (or the two
formats) compare row for row.  ``load_embeddings`` refuses a shard set with
missing shards (``-00001-of-00003`` without ``-00000-``...), the mark of an
unfinished copy; ``load_index`` follows a run manifest, so it reads only
complete runs, and after incremental runs it gathers the current rows of
every document from the runs that hold them.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Optional

import numpy as np

_SHARD = re.compile(r"^(.*)-(\d+)-of-(\d+)(\.[^/]*)$")


@dataclasses.dataclass
class Embeddings:
    """All rows of an embeddings dataset, as numpy arrays."""
    ids: list[str]
    num_tokens: np.ndarray  # int32 [n]
    truncated: np.ndarray  # bool [n]
    pooled_output: Optional[np.ndarray]  # float32 [n, hidden]
    # n x [tokens, hidden], float32 or float16 as written (--sequence_dtype)
    sequence_output: Optional[list[np.ndarray]]
    # Chunked runs only (--long_text chunk):
    doc_ids: Optional[list[str]] = None
    chunk_index: Optional[np.ndarray] = None  # int32 [n]
    num_chunks: Optional[np.ndarray] = None  # int32 [n]
    content_hash: Optional[list[str]] = None
    model_fingerprint: Optional[list[str]] = None
    text: Optional[list[Optional[str]]] = None  # --write_text only

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def document_ids(self) -> list[str]:
        """The document each row belongs to (chunks share it)."""
        return self.doc_ids if self.doc_ids is not None else self.ids


def check_complete(files: list[str]) -> None:
    """Raises ``ValueError`` when a ``-SSSSS-of-NNNNN`` shard set misses
    shards."""
    found: dict[tuple[str, int, str], set[int]] = collections.defaultdict(set)
    for path in files:
        match = _SHARD.match(path)
        if match:
            prefix, shard, count, suffix = match.groups()
            found[(prefix, int(count), suffix)].add(int(shard))
    for (prefix, count, suffix), shards in found.items():
        missing = sorted(set(range(count)) - shards)
        if missing:
            raise ValueError(f"incomplete dataset: {prefix}-*-of-{count:05d}"
                             f"{suffix} lacks shards {missing[:5]}")


def _match(pattern: str) -> list[str]:
    from apache_beam.io.filesystems import FileSystems
    files = sorted(m.path for m in FileSystems.match([pattern])[0]
                   .metadata_list)
    if not files:
        raise FileNotFoundError(f"no embedding files match {pattern}")
    return files


def _take(emb: Embeddings, order: list[int]) -> Embeddings:
    """The rows ``order`` of ``emb``, in that order."""
    def pick(values: Any) -> Any:
        if values is None:
            return None
        if isinstance(values, list):
            return [values[i] for i in order]
        return values[order]

    return Embeddings(**{field.name: pick(getattr(emb, field.name))
                         for field in dataclasses.fields(emb)})


def _sorted(emb: Embeddings) -> Embeddings:
    """Rows by id, or by (doc_id, chunk_index) for chunked runs."""
    if emb.doc_ids is not None:
        key = lambda i: (emb.doc_ids[i], int(emb.chunk_index[i]))  # noqa
    else:
        key = emb.ids.__getitem__
    return _take(emb, sorted(range(len(emb.ids)), key=key))


def _concat(parts: list[Embeddings]) -> Embeddings:
    """The rows of several datasets of one layout, one after the other."""
    def join(values: list[Any]) -> Any:
        if any(v is None for v in values):
            return None
        if isinstance(values[0], list):
            return [item for value in values for item in value]
        return np.concatenate(values)

    return Embeddings(**{
        field.name: join([getattr(p, field.name) for p in parts])
        for field in dataclasses.fields(Embeddings)})


def _strings(table: Any, name: str) -> Optional[list[Any]]:
    if name not in table.column_names:
        return None
    return table.column(name).to_pylist()


def read_parquet(files: list[str]) -> Embeddings:
    """Reads Parquet files of ``transforms.write.embedding_schema`` rows."""
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
                    if chunked else None),
        content_hash=_strings(table, "content_hash"),
        model_fingerprint=_strings(table, "model_fingerprint"),
        text=_strings(table, "text"))


def _bytes(feature: Any, name: str) -> Optional[str]:
    if name not in feature:
        return None
    return feature[name].bytes_list.value[0].decode("utf-8")


def _sequence(feature: Any) -> np.ndarray:
    """A row's sequence matrix: float list, or float16 bytes."""
    shape = tuple(feature["sequence_shape"].int64_list.value)
    if _bytes(feature, "sequence_dtype") == "float16":
        data = feature["sequence_output"].bytes_list.value[0]
        return np.frombuffer(data, dtype="<f2").astype(np.float16).reshape(
            shape)
    return np.array(feature["sequence_output"].float_list.value,
                    dtype=np.float32).reshape(shape)


def read_tfrecord(files: list[str]) -> Embeddings:
    """Reads TFRecord files (gzip for ``.gz``) of ``tf.train.Example`` rows."""
    import tensorflow as tf
    columns: dict[str, list[Any]] = collections.defaultdict(list)
    compression = "GZIP" if files[0].endswith(".gz") else ""
    for record in tf.data.TFRecordDataset(files,
                                          compression_type=compression):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        columns["ids"].append(_bytes(feature, "id"))
        columns["num_tokens"].append(feature["num_tokens"].int64_list.value[0])
        columns["truncated"].append(
            bool(feature["truncated"].int64_list.value[0]))
        for name in ("content_hash", "model_fingerprint", "text"):
            columns[name].append(_bytes(feature, name))
        if "doc_id" in feature:
            columns["doc_ids"].append(_bytes(feature, "doc_id"))
            columns["chunk_index"].append(
                feature["chunk_index"].int64_list.value[0])
            columns["num_chunks"].append(
                feature["num_chunks"].int64_list.value[0])
        if "pooled_output" in feature:
            columns["pooled"].append(np.array(
                feature["pooled_output"].float_list.value, dtype=np.float32))
        if "sequence_output" in feature:
            columns["sequence"].append(_sequence(feature))
    return _tfrecord_embeddings(columns)


def _tfrecord_embeddings(columns: dict[str, list[Any]]) -> Embeddings:
    chunked = bool(columns["doc_ids"])

    def optional(name: str) -> Optional[list[Any]]:
        values = columns[name]
        return values if any(v is not None for v in values) else None

    return Embeddings(
        ids=columns["ids"],
        num_tokens=np.array(columns["num_tokens"], dtype=np.int32),
        truncated=np.array(columns["truncated"], dtype=bool),
        pooled_output=(np.stack(columns["pooled"]) if columns["pooled"]
                       else None),
        sequence_output=columns["sequence"] or None,
        doc_ids=columns["doc_ids"] if chunked else None,
        chunk_index=(np.array(columns["chunk_index"], np.int32)
                     if chunked else None),
        num_chunks=(np.array(columns["num_chunks"], np.int32)
                    if chunked else None),
        content_hash=optional("content_hash"),
        model_fingerprint=optional("model_fingerprint"),
        text=optional("text"))


def read_files(files: list[str]) -> Embeddings:
    """Rows of ``files`` (all Parquet or all TFRecord), in file order."""
    if all(f.endswith(".parquet") for f in files):
        return read_parquet(files)
    if all(f.endswith((".tfrecord", ".tfrecord.gz")) for f in files):
        return read_tfrecord(files)
    raise ValueError(f"files that are not all .parquet or all .tfrecord"
                     f"[.gz]: {files[:3]}")


def load_embeddings(pattern: str) -> Embeddings:
    """Loads every file matching ``pattern`` (``.parquet`` or
    ``.tfrecord[.gz]``), sorted by id."""
    files = _match(pattern)
    check_complete(files)
    return _sorted(read_files(files))


class DatasetError(ValueError):
    """A manifest's index and the files it points at disagree: the files
    were replaced or rewritten since, or the index itself is corrupt."""


@dataclasses.dataclass(frozen=True)
class IndexEntries:
    """A manifest's index: run id -> {(document id, content hash): model
    fingerprint}."""
    by_run: dict[str, dict[tuple[str, str], str]]

    def of(self, run_id: str) -> dict[tuple[str, str], str]:
        return self.by_run.get(run_id, {})


def index_entries(manifest: dict[str, Any]) -> IndexEntries:
    """The entries of a manifest's index; ``DatasetError`` when an id is
    listed more than once (one id is one document of the dataset)."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems
    live: dict[str, dict[tuple[str, str], str]] = \
        collections.defaultdict(dict)
    seen: set[str] = set()
    repeated: dict[str, int] = collections.Counter()
    for path in manifest["index"]["keys"]:
        with FileSystems.open(path) as handle:
            table = pq.read_table(handle, columns=[
                "id", "content_hash", "model_fingerprint", "run_id"])
        for doc_id, digest, fingerprint, run_id in zip(
                *(column.to_pylist() for column in table.columns)):
            if doc_id in seen:
                repeated[path] += 1
            seen.add(doc_id)
            live[run_id][(doc_id, digest)] = fingerprint
    if repeated:
        path, count = repeated.most_common(1)[0]
        raise DatasetError(f"{path}: {sum(repeated.values())} index entries "
                           f"repeat an id ({count} in this file): the index "
                           "is corrupt or from an older version; re-run")
    return IndexEntries(dict(live))


def _segment_rows(segment: dict[str, Any], kind: str,
                  wanted: dict[tuple[str, str], str]) -> Embeddings:
    """The rows of one segment that the index points at, checked: each has
    the fingerprint the index gives it, none repeats, and none is missing.
    Raises ``DatasetError`` naming the file and the count otherwise."""
    parts, found = [], collections.Counter()
    for path in segment[kind]:
        try:
            emb = read_files([path])
        except (OSError, ValueError) as err:
            raise DatasetError(
                f"{path}: a file of run {segment['run_id']} cannot be read "
                f"({type(err).__name__}): it was removed or replaced since"
            ) from err
        keep, wrong = [], 0
        for i, pair in enumerate(zip(emb.document_ids, emb.content_hash)):
            if pair not in wanted:
                continue
            if emb.model_fingerprint is None or \
                    emb.model_fingerprint[i] != wanted[pair]:
                wrong += 1
                continue
            keep.append(i)
        if wrong:
            raise DatasetError(
                f"{path}: {wrong} rows have another model fingerprint than "
                f"the index gives them (run {segment['run_id']}'s files were "
                "rewritten since, e.g. by a re-run with another model)")
        part = _take(emb, keep)
        for key in _row_keys(part):
            found[key] += 1
        parts.append(part)
    repeated = sum(n - 1 for n in found.values() if n > 1)
    if repeated:
        raise DatasetError(
            f"{', '.join(segment[kind][:3])}: {repeated} rows repeat a "
            f"document (run {segment['run_id']}) that the index lists once")
    missing = len(set(doc for doc, _ in wanted)
                  - {key[0] for key in found})
    if missing:
        raise DatasetError(
            f"{', '.join(segment[kind][:3])}: {missing} documents the index "
            f"puts in run {segment['run_id']} are not in its files")
    return _concat(parts)


def _row_keys(emb: Embeddings) -> list[tuple[str, int]]:
    """(document id, chunk index) of each row: what is unique in a run."""
    chunks = (emb.chunk_index if emb.chunk_index is not None
              else [0] * len(emb))
    return [(doc, int(i)) for doc, i in zip(emb.document_ids, chunks)]


def _check_segment_run(segment: dict[str, Any], own_output: str) -> None:
    """An earlier run's rows are read only while its output still holds
    that run: a re-run there replaced them.  Raises ``DatasetError``."""
    from pipeline.manifest import ManifestError, manifest_path, read_manifest
    if segment["output"] == own_output:
        return
    path = manifest_path(segment["output"])
    try:
        manifest = read_manifest(path)
    except ManifestError as err:
        raise DatasetError(
            f"{path}: the run {segment['run_id']} whose files this index "
            f"reads has no readable manifest any more ({err})") from err
    if manifest.get("run_id") != segment["run_id"]:
        raise DatasetError(
            f"{path}: now run {manifest.get('run_id')}, not run "
            f"{segment['run_id']} whose rows this index reads: that output "
            "was re-run, so this index no longer describes its files")


def load_index(manifest_path: str, kind: str = "embeddings") -> Embeddings:
    """The current dataset a run's manifest describes, sorted by id.

    ``kind`` is ``embeddings`` or ``documents`` (document vectors).  Each
    segment's rows are kept when the index points at that segment's run
    for the row's document and content, so rows that later runs replaced
    or deleted are left out.  Raises ``DatasetError`` when the files do not
    hold exactly the indexed rows: a row with another model fingerprint
    than its entry, a document twice or missing, a segment whose output
    now holds another run.
    """
    from pipeline.manifest import SUCCEEDED, read_manifest
    manifest = read_manifest(manifest_path)
    if manifest.get("status") != SUCCEEDED or not manifest.get("index"):
        raise ValueError(f"{manifest_path}: the run did not succeed "
                         f"({manifest.get('failure')})")
    live = index_entries(manifest)
    parts = []
    for segment in manifest["index"]["segments"]:
        if not segment[kind]:
            continue
        rows = _segment_rows(segment, kind, live.of(segment["run_id"]))
        _check_segment_run(segment, manifest["output"])
        parts.append(rows)
    if not parts:
        raise FileNotFoundError(f"{manifest_path}: the index holds no "
                                f"{kind} rows")
    return _sorted(_concat(parts))
