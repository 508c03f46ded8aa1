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
every document from the runs that hold them.  ``current_tables`` is the
same walk as a stream of Arrow tables, a Parquet row group at a time, for
``pipeline.compact``.

Vector columns come back as numpy matrices whether a Parquet file stores
them as Arrow fixed-size lists (what this project writes) or as plain lists
(older outputs, other writers): every vector of a column must then have
the same length.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterator, Optional

import numpy as np

from transforms.embedding_files import (
    CHUNK_COLUMNS, CHUNK_INDEX, CONTENT_HASH, DOC_ID, EMBEDDED_AS,
    EMBEDDINGS, ID, INDEX_COLUMNS, INDEX_SCHEMA, MODEL_FINGERPRINT,
    NUM_CHUNKS, NUM_TOKENS, PARQUET, POOLED_OUTPUT, RUN_ID, SEQUENCE_OUTPUT,
    TEXT, TFRECORD, TRUNCATED, document_key, example_values, file_format,
    fixed_vectors, parse_shard, sequence_array, table_columns,
    tf_compression, vector_array)


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
    # load_index(..., expand_duplicates=True): the id whose row each row's
    # vectors are (another id under --dedup, else the row's own document).
    embedded_as: Optional[list[str]] = None

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
        shard = parse_shard(path)
        if shard:
            prefix, number, count, suffix = shard
            found[(prefix, count, suffix)].add(number)
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


def table_embeddings(table: Any) -> Embeddings:
    """``Embeddings`` from an Arrow table of embedding rows (file order)."""
    values = table_columns(table)
    chunked = DOC_ID in values
    return Embeddings(
        ids=values[ID],
        num_tokens=values[NUM_TOKENS].astype(np.int32),
        truncated=values[TRUNCATED].astype(bool),
        pooled_output=values.get(POOLED_OUTPUT),
        sequence_output=values.get(SEQUENCE_OUTPUT),
        doc_ids=values.get(DOC_ID),
        chunk_index=(values[CHUNK_INDEX].astype(np.int32)
                     if chunked else None),
        num_chunks=(values[NUM_CHUNKS].astype(np.int32)
                    if chunked else None),
        content_hash=values.get(CONTENT_HASH),
        model_fingerprint=values.get(MODEL_FINGERPRINT),
        text=values.get(TEXT),
        embedded_as=values.get(EMBEDDED_AS))


def read_parquet(files: list[str]) -> Embeddings:
    """Reads Parquet files of ``embedding_files.embedding_schema`` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems
    tables = []
    for path in files:
        with FileSystems.open(path) as handle:
            tables.append(pq.read_table(handle).replace_schema_metadata())
    return table_embeddings(pa.concat_tables(tables,
                                             promote_options="default"))


def _add_example(columns: dict[str, list[Any]], record: bytes) -> None:
    """Appends one serialized ``tf.train.Example``'s columns to ``columns``
    (None for an absent optional one)."""
    values = example_values(record)
    columns[ID].append(values.get(ID))
    columns[NUM_TOKENS].append(values[NUM_TOKENS])
    columns[TRUNCATED].append(values[TRUNCATED])
    for name in (CONTENT_HASH, MODEL_FINGERPRINT, TEXT):
        columns[name].append(values.get(name))
    if DOC_ID in values:
        for name in CHUNK_COLUMNS:
            columns[name].append(values[name])
    for name in (POOLED_OUTPUT, SEQUENCE_OUTPUT):
        if name in values:
            columns[name].append(values[name])


def _tfrecord_chunks(files: list[str], rows: int = 0
                     ) -> Iterator[Embeddings]:
    """The rows of TFRecord files (gzip for ``.gz``), ``rows`` at a time
    (0: all at once); at least one, possibly empty, chunk."""
    import tensorflow as tf
    columns: dict[str, list[Any]] = collections.defaultdict(list)
    yielded = False
    for record in tf.data.TFRecordDataset(
            files, compression_type=tf_compression(files[0])):
        _add_example(columns, record.numpy())
        if rows and len(columns[ID]) >= rows:
            yield _tfrecord_embeddings(columns)
            columns, yielded = collections.defaultdict(list), True
    if columns[ID] or not yielded:
        yield _tfrecord_embeddings(columns)


def read_tfrecord(files: list[str]) -> Embeddings:
    """Reads TFRecord files (gzip for ``.gz``) of ``tf.train.Example`` rows."""
    return next(_tfrecord_chunks(files))


def _tfrecord_embeddings(columns: dict[str, list[Any]]) -> Embeddings:
    chunked = bool(columns[DOC_ID])

    def optional(name: str) -> Optional[list[Any]]:
        values = columns[name]
        return values if any(v is not None for v in values) else None

    return Embeddings(
        ids=columns[ID],
        num_tokens=np.array(columns[NUM_TOKENS], dtype=np.int32),
        truncated=np.array(columns[TRUNCATED], dtype=bool),
        pooled_output=(np.stack(columns[POOLED_OUTPUT])
                       if columns[POOLED_OUTPUT] else None),
        sequence_output=columns[SEQUENCE_OUTPUT] or None,
        doc_ids=columns[DOC_ID] if chunked else None,
        chunk_index=(np.array(columns[CHUNK_INDEX], np.int32)
                     if chunked else None),
        num_chunks=(np.array(columns[NUM_CHUNKS], np.int32)
                    if chunked else None),
        content_hash=optional(CONTENT_HASH),
        model_fingerprint=optional(MODEL_FINGERPRINT),
        text=optional(TEXT))


def read_files(files: list[str]) -> Embeddings:
    """Rows of ``files`` (all Parquet or all TFRecord), in file order."""
    if all(file_format(f) == PARQUET for f in files):
        return read_parquet(files)
    if all(file_format(f) == TFRECORD for f in files):
        return read_tfrecord(files)
    raise ValueError(f"files that are not all .parquet or all .tfrecord"
                     f"[.gz]: {files[:3]}")


def load_embeddings(pattern: str) -> Embeddings:
    """Loads every file matching ``pattern`` (``.parquet`` or
    ``.tfrecord[.gz]``), sorted by id."""
    files = _match(pattern)
    check_complete(files)
    return _sorted(read_files(files))


# --- Arrow tables of embedding rows, a bounded part of a file at a time ----

_TFRECORD_ROWS = 1024  # TFRecord rows per table


def embeddings_table(emb: Embeddings) -> Any:
    """An Arrow table of ``emb``'s rows, with the columns (in the order and
    types) of ``transforms.embedding_files.embedding_schema``."""
    import pyarrow as pa
    columns: dict[str, Any] = {ID: pa.array(emb.ids, pa.string())}
    if emb.doc_ids is not None:
        columns[DOC_ID] = pa.array(emb.doc_ids, pa.string())
        columns[CHUNK_INDEX] = pa.array(emb.chunk_index, pa.int32())
        columns[NUM_CHUNKS] = pa.array(emb.num_chunks, pa.int32())
    columns[NUM_TOKENS] = pa.array(emb.num_tokens, pa.int32())
    columns[TRUNCATED] = pa.array(emb.truncated, pa.bool_())
    for name in (CONTENT_HASH, MODEL_FINGERPRINT, TEXT):
        if getattr(emb, name) is not None:
            columns[name] = pa.array(getattr(emb, name), pa.string())
    if emb.pooled_output is not None:
        columns[POOLED_OUTPUT] = vector_array(emb.pooled_output)
    if emb.sequence_output is not None:
        columns[SEQUENCE_OUTPUT] = sequence_array(
            emb.sequence_output, emb.sequence_output[0].dtype)
    return pa.table(columns)


def file_tables(path: str) -> Iterator[Any]:
    """The rows of one embeddings file as Arrow tables (fixed-size vectors):
    a Parquet row group, or ``_TFRECORD_ROWS`` TFRecord rows, at a time;
    at least one table, possibly empty."""
    kind = file_format(path)
    if kind == PARQUET:
        import pyarrow.parquet as pq
        from apache_beam.io.filesystems import FileSystems
        with FileSystems.open(path) as handle:
            reader = pq.ParquetFile(handle)
            if not reader.num_row_groups:
                yield fixed_vectors(reader.schema_arrow.empty_table())
            for group in range(reader.num_row_groups):
                yield fixed_vectors(reader.read_row_group(group))
    elif kind == TFRECORD:
        for chunk in _tfrecord_chunks([path], _TFRECORD_ROWS):
            yield embeddings_table(chunk)
    else:
        raise ValueError(f"{path}: not a .parquet or .tfrecord[.gz] file")


# --- The current dataset of a manifest --------------------------------------

class DatasetError(ValueError):
    """A manifest's index and the files it points at disagree: the files
    were replaced or rewritten since, or the index itself is corrupt."""


def succeeded_manifest(manifest_path: str) -> dict[str, Any]:
    """The manifest of a run that succeeded; ``ManifestError`` when it is
    missing or unreadable, ``ValueError`` when that run failed."""
    from pipeline.manifest import SUCCEEDED, read_manifest
    manifest = read_manifest(manifest_path)
    if manifest.get("status") != SUCCEEDED or not manifest.get("index"):
        raise ValueError(f"{manifest_path}: the run did not succeed "
                         f"({manifest.get('failure')})")
    return manifest


def index_table(manifest: dict[str, Any]) -> Any:
    """A manifest's index as one Arrow table (``INDEX_COLUMNS``; index
    files written before ``embedded_as`` existed get it equal to ``id``);
    ``DatasetError`` when an id is listed more than once (one id is one
    document of the dataset)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems
    tables = []
    for number, path in enumerate(manifest["index"]["keys"]):
        with FileSystems.open(path) as handle:
            table = pq.read_table(handle)
        if EMBEDDED_AS not in table.column_names:
            table = table.append_column(EMBEDDED_AS, table.column(ID))
        table = table.select(list(INDEX_COLUMNS)).replace_schema_metadata()
        tables.append(table.append_column(
            "_file", pa.array(np.full(table.num_rows, number, np.int32))))
    if not tables:
        return INDEX_SCHEMA.empty_table()
    index = pa.concat_tables(tables)
    index = index.append_column("_pos", pa.array(
        np.arange(index.num_rows, dtype=np.int64)))
    first = index.group_by(ID, use_threads=False).aggregate(
        [("_pos", "min")]).column("_pos_min")
    if len(first) != index.num_rows:
        repeated = index.filter(pc.invert(pc.is_in(index.column("_pos"),
                                                   first)))
        per_file = collections.Counter(repeated.column("_file").to_pylist())
        number, count = per_file.most_common(1)[0]
        raise DatasetError(
            f"{manifest['index']['keys'][number]}: {repeated.num_rows} "
            f"index entries repeat an id ({count} in this file): the index "
            "is corrupt or from an older version; re-run")
    return index.drop_columns(["_file", "_pos"])


def _unlisted_runs(manifest: dict[str, Any], index: Any) -> None:
    """Raises ``DatasetError`` when index entries point at runs that no
    segment of the manifest lists (their rows could not be found)."""
    import pyarrow.compute as pc
    listed = {s["run_id"] for s in manifest["index"]["segments"]}
    unlisted = set(pc.unique(index.column(RUN_ID)).to_pylist()) - listed
    if unlisted:
        raise DatasetError(
            f"{manifest['index']['keys'][0]}: index entries point at runs "
            f"no segment of the manifest lists ({sorted(unlisted)[0]}): "
            "the manifest or its index was changed")


def _file_tables_checked(path: str, run_id: str) -> Iterator[Any]:
    """``file_tables(path)``; a file that cannot be read is a
    ``DatasetError``."""
    tables = file_tables(path)
    while True:
        try:
            table = next(tables)
        except StopIteration:
            return
        except (OSError, ValueError) as err:
            raise DatasetError(
                f"{path}: a file of run {run_id} cannot be read "
                f"({type(err).__name__}): it was removed or replaced since"
            ) from err
        yield table


@dataclasses.dataclass
class _SegmentMatch:
    """The index entries of one segment's run and what was found of them."""
    entries: Any  # Arrow: id, content_hash, model_fingerprint, embedded_as
    hits: np.ndarray  # rows found per entry
    own: np.ndarray  # bool per entry: the id has rows of its own
    chunks_seen: set[tuple[int, int]]  # (entry, chunk index), chunked rows
    repeated: int = 0  # rows that repeat (document, chunk)

    @classmethod
    def of(cls, entries: Any) -> "_SegmentMatch":
        import pyarrow.compute as pc
        own = pc.equal(entries.column(ID), entries.column(EMBEDDED_AS))
        return cls(entries, np.zeros(entries.num_rows, np.int64),
                   own.to_numpy(zero_copy_only=False).astype(bool), set())

    def match(self, table: Any, expand: bool) -> tuple[Any, int]:
        """(the rows of ``table`` the entries point at, with their entries'
        ids (and ``embedded_as`` when ``expand``: one row per entry, mapped
        ids included), the number of rows whose model fingerprint is not
        their entry's)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        chunked = DOC_ID in table.column_names
        keys = pa.table({
            "_key": table.column(document_key(table.column_names)),
            CONTENT_HASH: table.column(CONTENT_HASH),
            "_row": pa.array(np.arange(table.num_rows, dtype=np.int64))})
        entries = pa.table({
            "_key": self.entries.column(EMBEDDED_AS),
            CONTENT_HASH: self.entries.column(CONTENT_HASH),
            "_entry": pa.array(np.arange(self.entries.num_rows,
                                         dtype=np.int64))})
        joined = keys.join(entries, keys=["_key", CONTENT_HASH],
                           join_type="inner", use_threads=False)
        rows = joined.column("_row").to_numpy()
        entry = joined.column("_entry").to_numpy()
        if MODEL_FINGERPRINT in table.column_names:
            found = table.column(MODEL_FINGERPRINT).take(rows)
            good = pc.equal(found, self.entries.column(
                MODEL_FINGERPRINT).take(entry)).fill_null(False)
            good = good.to_numpy(zero_copy_only=False).astype(bool)
        else:
            good = np.zeros(len(rows), bool)
        own = self.own[entry]
        wrong = int(np.sum(own & ~good))
        rows, entry, own = rows[good], entry[good], own[good]
        np.add.at(self.hits, entry, 1)
        if chunked:
            chunk = table.column(CHUNK_INDEX).to_numpy()[rows]
            for key in zip(entry[own].tolist(), chunk[own].tolist()):
                if key in self.chunks_seen:
                    self.repeated += 1
                self.chunks_seen.add(key)
        keep = own | expand
        order = np.lexsort((entry[keep], rows[keep]))
        rows, entry, own = rows[keep][order], entry[keep][order], \
            own[keep][order]
        return self._relabel(table.take(rows), entry, own, expand), wrong

    def _relabel(self, rows: Any, entry: np.ndarray, own: np.ndarray,
                 expand: bool) -> Any:
        """``rows`` under their entries' ids (a mapped id's copy of its
        document's rows gets the mapped id), plus ``embedded_as``."""
        import pyarrow as pa
        import pyarrow.compute as pc
        if not expand:
            return rows
        ids = self.entries.column(ID).take(pa.array(entry))
        own_mask = pa.array(own)
        if DOC_ID in rows.column_names:
            doc = rows.column(DOC_ID)
            chunk_ids = pc.binary_join_element_wise(
                ids, pc.cast(rows.column(CHUNK_INDEX), pa.string()), "#")
            rows = rows.set_column(
                rows.column_names.index(ID), ID,
                pc.if_else(own_mask, rows.column(ID), chunk_ids))
            rows = rows.set_column(rows.column_names.index(DOC_ID),
                                   DOC_ID, pc.if_else(own_mask, doc, ids))
            embedded_as = doc
        else:
            embedded_as = rows.column(ID)
            rows = rows.set_column(rows.column_names.index(ID), ID, ids)
        return rows.append_column(EMBEDDED_AS, embedded_as)

    def check(self, segment: dict[str, Any], kind: str) -> None:
        """Raises ``DatasetError`` when rows repeat a document or chunk, or
        entries found no rows."""
        files = (", ".join(segment[kind][:3])
                 or f"{segment['output']} (no {kind} files)")
        repeated = self.repeated if self.chunks_seen else int(
            np.sum(np.maximum(self.hits[self.own] - 1, 0)))
        if repeated:
            raise DatasetError(
                f"{files}: {repeated} rows repeat a document (run "
                f"{segment['run_id']}) that the index lists once")
        missing = int(np.sum(self.hits[self.own] == 0))
        if missing:
            raise DatasetError(
                f"{files}: {missing} documents the index puts in run "
                f"{segment['run_id']} are not in its files")
        unmapped = int(np.sum(self.hits[~self.own] == 0))
        if unmapped:
            raise DatasetError(
                f"{files}: {unmapped} ids the index maps to another "
                f"document's rows (run {segment['run_id']}) find none")


def _segment_tables(segment: dict[str, Any], kind: str, entries: Any,
                    expand: bool) -> Iterator[Any]:
    """The rows of one segment that the index points at, checked: each has
    the fingerprint the index gives it, none repeats, and none is missing.
    Raises ``DatasetError`` naming the file and the count otherwise."""
    match = _SegmentMatch.of(entries)
    for path in segment[kind]:
        wrong = 0
        for table in _file_tables_checked(path, segment["run_id"]):
            rows, bad = match.match(table, expand)
            wrong += bad
            yield rows
        if wrong:
            raise DatasetError(
                f"{path}: {wrong} rows have another model fingerprint than "
                f"the index gives them (run {segment['run_id']}'s files were "
                "rewritten since, e.g. by a re-run with another model)")
    match.check(segment, kind)


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


def current_tables(manifest: dict[str, Any], kind: str = EMBEDDINGS,
                   expand_duplicates: bool = False) -> Iterator[Any]:
    """The current dataset of a succeeded run's ``manifest`` as Arrow
    tables (fixed-size vectors), a Parquet row group (or a thousand
    TFRecord rows) of one segment file at a time, in segment and file
    order; memory holds the index and one such table.

    ``kind`` is ``embeddings`` or ``documents``.  Each segment's rows are
    kept when the index points at that segment's run for the row's
    document, content and model fingerprint.  With ``expand_duplicates``
    each index entry gets its rows, so an id that ``--dedup`` mapped to
    another document's rows comes as a copy of them under its own id, and
    an ``embedded_as`` column names the document embedded.  Raises
    ``DatasetError`` (after the tables read so far) when the files do not
    hold exactly the indexed rows.
    """
    import pyarrow.compute as pc
    index = index_table(manifest)
    _unlisted_runs(manifest, index)
    for segment in manifest["index"]["segments"]:
        entries = index.filter(pc.equal(index.column(RUN_ID),
                                        segment["run_id"]))
        yield from _segment_tables(segment, kind, entries, expand_duplicates)
        _check_segment_run(segment, manifest["output"])


def load_index(manifest_path: str, kind: str = EMBEDDINGS,
               expand_duplicates: bool = False) -> Embeddings:
    """The current dataset a run's manifest describes, sorted by id.

    ``kind`` is ``embeddings`` or ``documents`` (document vectors).  Each
    segment's rows are kept when the index points at that segment's run
    for the row's document and content, so rows that later runs replaced
    or deleted are left out.  ``expand_duplicates=True`` returns a row for
    every id of the index: the ids that ``--dedup`` did not embed (the same
    text as another id) come with the vectors of the one embedded, which
    ``embedded_as`` names (``current_tables``).  Raises ``DatasetError``
    when the files do not hold exactly the indexed rows: a row with another
    model fingerprint than its entry, a document twice or missing, a
    segment whose output now holds another run.
    """
    import pyarrow as pa
    manifest = succeeded_manifest(manifest_path)
    if not any(s[kind] for s in manifest["index"]["segments"]):
        raise FileNotFoundError(f"{manifest_path}: the index holds no "
                                f"{kind} rows")
    tables = list(current_tables(manifest, kind, expand_duplicates))
    return _sorted(table_embeddings(pa.concat_tables(
        tables, promote_options="default")))
