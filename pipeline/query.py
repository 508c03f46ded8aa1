"""Nearest documents to a text: ``python -m pipeline.query --index ...
--text ...``.

The text is embedded in this process with the settings of the run that
built the index, read from its manifest (``pipeline.embed``): same
tokenizer, model, precision, max_seq_length, long-text handling, pooling
and normalization.  A query whose model fingerprint or pooling differs
from the index's is refused (exit 2): its vector would not be comparable.

The search is exact cosine similarity over every current row of the index
(the manifest's segments, filtered by its index entries as
``pipeline.read_embeddings.load_index`` does), streamed: Parquet files one
batch of rows at a time with only the id, key and vector columns read,
TFRecord files record by record, with a running top-k, so memory stays at
one batch plus the index's keys of one segment, whatever the index's size.
Document vectors are searched when the run wrote them
(``--document_vectors``), else the embedding rows; a chunked document
scores as its best chunk.  With ``--write_text`` runs each hit's text is
printed too (read in a second pass, for the hits only).

Output: one line per hit, best first: ``score<TAB>id<TAB>text`` (the text
on one line, cut to ``--text_chars``), or JSON lines with ``--json``.
Exit codes: 0, 1 the index's files do not match its manifest, 2 bad usage
(a refused query too).
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import sys
from typing import Any, Iterator, Optional, Sequence

from pipeline.cli import (UsageError, UsageParser, exit_on_interrupt,
                          setup_logging, wants_help)

if __name__ == "__main__":
    exit_on_interrupt()

# pylint: disable=wrong-import-position
import numpy as np

from transforms.embedding_files import (
    CONTENT_HASH, DOC_ID, DOCUMENTS, EMBEDDINGS, ID, MODEL_FINGERPRINT,
    PARQUET, POOLED_OUTPUT, RUN_ID, TEXT, TFRECORD, document_key,
    example_values, file_format, tf_compression)

ROWS_KINDS = ("auto", EMBEDDINGS, DOCUMENTS)
DEFAULT_TOP_K = 10
DEFAULT_TEXT_CHARS = 200
# TFRecord rows scored at a time (8,192 x 768 float32 is 24 MiB); Parquet
# files are scored a row group at a time (about 32 MiB as the job writes).
SCAN_ROWS = 8192
# What names a row's document and its content (chunk rows: ``doc_id``).
_KEY_COLUMNS = (ID, DOC_ID, CONTENT_HASH)

EXIT_OK, EXIT_DATASET, EXIT_USAGE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Hit:
    """One result: the document id, its cosine similarity, its text (None
    when the index has no text column)."""
    id: str
    score: float
    text: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class RowBatch:
    """Rows of one file: document ids (``doc_id`` of chunk rows), content
    hashes, model fingerprints and ``[n, H]`` vectors."""
    doc_ids: list[str]
    hashes: list[str]
    fingerprints: list[str]
    vectors: np.ndarray


class TopK:
    """The ``k`` best-scoring distinct keys seen, a key keeping its best
    score (a chunked document scores as its best chunk).  Ties keep the
    key seen first."""

    def __init__(self, k: int) -> None:
        self._k = k
        self._best: dict[Any, float] = {}
        # (score, -arrival, key); stale entries (the key's best score is
        # now higher, or the key left) are skipped when they surface.
        self._heap: list[tuple[float, int, Any]] = []
        self._arrivals = 0

    def _clean_top(self) -> None:
        while self._heap and \
                self._best.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)

    def threshold(self) -> float:
        """The score a new key must beat to enter (-inf until full)."""
        if len(self._best) < self._k:
            return -np.inf
        self._clean_top()
        return self._heap[0][0]

    def offer(self, key: Any, score: float) -> None:
        """Counts ``key`` with ``score``."""
        known = self._best.get(key)
        if known is not None:
            if score > known:
                self._push(key, score)
            return
        if len(self._best) >= self._k:
            if score <= self.threshold():
                return
            _, _, dropped = heapq.heappop(self._heap)
            del self._best[dropped]
        self._push(key, score)

    def _push(self, key: Any, score: float) -> None:
        self._best[key] = score
        self._arrivals += 1
        heapq.heappush(self._heap, (score, -self._arrivals, key))
        if len(self._heap) > 4 * self._k + 64:  # drop stale entries
            self._heap = [(s, a, k) for s, a, k in self._heap
                          if self._best.get(k) == s]
            heapq.heapify(self._heap)

    def offer_batch(self, keys: Sequence[Any], scores: np.ndarray) -> None:
        """Counts a batch: only rows above the current threshold are looked
        at, best first, until none can enter."""
        candidates = np.flatnonzero(scores > self.threshold())
        for i in candidates[np.argsort(-scores[candidates], kind="stable")]:
            # Rows come best first and the threshold only rises: once a
            # row is at or below it, no later row can enter or improve a
            # key (a kept key's score is at least the threshold).
            if scores[i] <= self.threshold():
                break
            self.offer(keys[i], float(scores[i]))

    def best(self) -> list[tuple[Any, float]]:
        """``(key, score)``, best first."""
        return sorted(self._best.items(), key=lambda item: -item[1])


def cosine_scores(vectors: np.ndarray, unit_query: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``vectors`` with a unit-length
    query (zero rows score 0)."""
    rows = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1)
    return (rows @ unit_query) / np.where(norms > 0, norms, 1.0)


# --- reading an index, streamed ----------------------------------------


def _parquet_batches(path: str) -> Iterator[RowBatch]:
    """``RowBatch``es of a Parquet embeddings file, one per row group,
    reading only the key and vector columns.  Row group by row group is
    both the faster and the leaner way: ``iter_batches`` reads ahead and
    held several row groups (about 400 MiB for a 300 MiB file)."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems
    with FileSystems.open(path) as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        if POOLED_OUTPUT not in names:
            raise UsageError(f"{path} has no pooled_output column (a run "
                             "with --outputs sequence): nothing to search")
        columns = [document_key(names), CONTENT_HASH, MODEL_FINGERPRINT,
                   POOLED_OUTPUT]
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=columns,
                                           use_threads=False)
            vectors = table.column(3).combine_chunks()
            yield RowBatch(
                table.column(0).to_pylist(), table.column(1).to_pylist(),
                table.column(2).to_pylist(),
                vectors.flatten().to_numpy(zero_copy_only=False).reshape(
                    len(table), vectors.type.list_size))


def _tfrecord_batches(path: str, rows: int) -> Iterator[RowBatch]:
    """``RowBatch``es of a TFRecord embeddings file, record by record."""
    import tensorflow as tf
    wanted = set(_KEY_COLUMNS) | {POOLED_OUTPUT, MODEL_FINGERPRINT}
    pending: list[tuple[str, str, str, np.ndarray]] = []
    for record in tf.data.TFRecordDataset(
            [path], compression_type=tf_compression(path)):
        values = example_values(record.numpy(), wanted)
        if POOLED_OUTPUT not in values:
            raise UsageError(f"{path} has no pooled_output feature (a run "
                             "with --outputs sequence): nothing to search")
        pending.append((values[document_key(values)], values[CONTENT_HASH],
                        values[MODEL_FINGERPRINT], values[POOLED_OUTPUT]))
        if len(pending) >= rows:
            yield _row_batch(pending)
            pending = []
    if pending:
        yield _row_batch(pending)


def _row_batch(rows: list[tuple[str, str, str, np.ndarray]]) -> RowBatch:
    ids, hashes, fingerprints, vectors = zip(*rows)
    return RowBatch(list(ids), list(hashes), list(fingerprints),
                    np.stack(vectors))


def file_batches(path: str, rows: int = SCAN_ROWS) -> Iterator[RowBatch]:
    """The rows of one embeddings file: a Parquet file's row groups, or
    ``rows`` records of a TFRecord[.gz] file at a time."""
    kind = file_format(path)
    if kind == PARQUET:
        return _parquet_batches(path)
    if kind == TFRECORD:
        return _tfrecord_batches(path, rows)
    raise UsageError(f"{path}: not a .parquet or .tfrecord[.gz] file")


def segment_keys(manifest: dict[str, Any], run_id: str
                 ) -> set[tuple[str, str]]:
    """``(document id, content hash)`` of the index entries that point at
    run ``run_id``: the rows of that run's files that are current.  Raises
    ``DatasetError`` for an entry with another fingerprint than the
    index's."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    from pipeline.read_embeddings import DatasetError
    keys: set[tuple[str, str]] = set()
    for path in manifest["index"]["keys"]:
        with FileSystems.open(path) as handle:
            table = pq.read_table(handle, columns=[
                ID, CONTENT_HASH, MODEL_FINGERPRINT, RUN_ID])
        table = table.filter(pc.equal(table.column(RUN_ID), run_id))
        fingerprints = set(table.column(MODEL_FINGERPRINT).to_pylist())
        if fingerprints - {manifest["model_fingerprint"]}:
            raise DatasetError(
                f"{path}: index entries with another model fingerprint "
                f"than the index's {manifest['model_fingerprint']}")
        keys.update(zip(table.column(ID).to_pylist(),
                        table.column(CONTENT_HASH).to_pylist()))
    return keys


def rows_kind(manifest: dict[str, Any], rows: str) -> str:
    """``embeddings`` or ``documents``: what ``--rows`` picks in this
    index (``auto``: document vectors when the run wrote them)."""
    has_documents = bool((manifest.get("layout") or {}).get(
        "document_vectors"))
    if rows == "auto":
        return DOCUMENTS if has_documents else EMBEDDINGS
    if rows == DOCUMENTS and not has_documents:
        raise UsageError("--rows documents: the index has no document "
                         "vectors (a run without --document_vectors)")
    return rows


def current_batches(manifest: dict[str, Any], kind: str,
                    rows: int = SCAN_ROWS
                    ) -> Iterator[tuple[str, RowBatch, np.ndarray]]:
    """``(file, batch, live)`` for every file of the index's segments:
    ``live`` marks the batch's rows the index points at.  Raises
    ``DatasetError`` when a current row has another model fingerprint than
    the index (the run's files were rewritten since)."""
    from pipeline.read_embeddings import DatasetError, _check_segment_run
    expected = manifest["model_fingerprint"]
    for segment in manifest["index"]["segments"]:
        if not segment.get(kind):
            continue
        _check_segment_run(segment, manifest["output"])
        keys = segment_keys(manifest, segment["run_id"])
        for path in segment[kind]:
            for batch in _readable(path, file_batches(path, rows)):
                live = np.fromiter(
                    (pair in keys for pair in zip(batch.doc_ids,
                                                  batch.hashes)),
                    dtype=bool, count=len(batch.doc_ids))
                wrong = sum(1 for i in np.flatnonzero(live)
                            if batch.fingerprints[i] != expected)
                if wrong:
                    raise DatasetError(
                        f"{path}: {wrong} rows have another model "
                        f"fingerprint than the index's {expected} (the "
                        "run's files were rewritten since)")
                yield path, batch, live


def _readable(path: str, batches: Iterator[RowBatch]) -> Iterator[RowBatch]:
    """``batches``, a file that cannot be read being a ``DatasetError``
    (removed or replaced since the manifest was written)."""
    from pipeline.read_embeddings import DatasetError
    failures: tuple[type, ...] = (OSError, ValueError)
    if "tensorflow" in sys.modules:  # TFRecord files are read with it
        failures += (sys.modules["tensorflow"].errors.OpError,)
    try:
        yield from batches
    except failures as err:
        if isinstance(err, (DatasetError, UsageError)):
            raise
        raise DatasetError(f"{path}: a file of the index cannot be read "
                           f"({type(err).__name__}): it was removed or "
                           "replaced since") from err


def search(manifest: dict[str, Any], query: np.ndarray, top_k: int,
           kind: str, rows: int = SCAN_ROWS) -> list[tuple[tuple[str, str],
                                                            float]]:
    """The ``top_k`` current documents most similar (cosine) to ``query``:
    ``((document id, content hash), score)``, best first."""
    norm = float(np.linalg.norm(query))
    unit = (np.asarray(query, np.float64) / (norm if norm > 0 else 1.0)
            ).astype(np.float32)
    best = TopK(top_k)
    for _, batch, live in current_batches(manifest, kind, rows):
        if not live.any():
            continue
        keep = np.flatnonzero(live)
        scores = cosine_scores(batch.vectors if len(keep) == len(live)
                               else batch.vectors[keep], unit)
        keys = [(batch.doc_ids[i], batch.hashes[i]) for i in keep]
        best.offer_batch(keys, scores)
    return best.best()


def hit_texts(manifest: dict[str, Any], wanted: set[tuple[str, str]]
              ) -> dict[tuple[str, str], str]:
    """The texts of ``wanted`` documents from the index's embedding rows
    (a chunked document's first chunk holds it), when the run wrote them."""
    if not (manifest.get("layout") or {}).get("write_text"):
        return {}
    found: dict[tuple[str, str], str] = {}
    for segment in manifest["index"]["segments"]:
        for path in segment.get(EMBEDDINGS) or []:
            texts = (_parquet_texts if file_format(path) == PARQUET
                     else _tfrecord_texts)
            found.update(texts(path, wanted))
            if len(found) == len(wanted):
                return found
    return found


def _tfrecord_texts(path: str, wanted: set[tuple[str, str]]
                    ) -> dict[tuple[str, str], str]:
    """The texts of ``wanted`` documents in one TFRecord file, streamed."""
    import tensorflow as tf
    found = {}
    for record in tf.data.TFRecordDataset(
            [path], compression_type=tf_compression(path)):
        values = example_values(record.numpy(), (*_KEY_COLUMNS, TEXT))
        if TEXT not in values:
            continue
        pair = (values[document_key(values)], values[CONTENT_HASH])
        if pair in wanted:
            found[pair] = values[TEXT]
    return found


def _parquet_texts(path: str, wanted: set[tuple[str, str]]
                   ) -> dict[tuple[str, str], str]:
    """The texts of ``wanted`` documents in one Parquet file."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems
    found = {}
    with FileSystems.open(path) as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        if TEXT not in names:
            return found
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(
                group, columns=[document_key(names), CONTENT_HASH, TEXT],
                use_threads=False)
            for pair, text in zip(zip(table.column(0).to_pylist(),
                                      table.column(1).to_pylist()),
                                  table.column(2).to_pylist()):
                if text is not None and pair in wanted:
                    found[pair] = text
    return found


def query_index(index: str, text: str, top_k: int = DEFAULT_TOP_K,
                model: Optional[str] = None, pooling: Optional[str] = None,
                rows: str = "auto", batch_rows: int = SCAN_ROWS
                ) -> list[Hit]:
    """The ``top_k`` documents of the index at ``index`` (manifest or
    output prefix) nearest to ``text``, best first.

    Raises ``IndexMismatch`` when ``model``/``pooling`` (or the model's
    files) make other vectors than the index's, ``ManifestError`` for a
    missing or failed run, ``DatasetError`` when the files do not match
    the manifest.
    """
    from pipeline.embed import embedder, read_index_manifest, \
        settings_for_index
    if top_k < 1:
        raise UsageError("--top_k must be at least 1")
    _, manifest = read_index_manifest(index)
    kind = rows_kind(manifest, rows)
    settings = settings_for_index(index, model, pooling=pooling)
    vector = embedder(settings).embed([text])[0]
    ranked = search(manifest, vector, top_k, kind, batch_rows)
    texts = hit_texts(manifest, {key for key, _ in ranked})
    return [Hit(key[0], score, texts.get(key)) for key, score in ranked]


def one_line(text: Optional[str], limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters (0: whole)."""
    if text is None:
        return ""
    flat = " ".join(text.split())
    return flat if not limit or len(flat) <= limit else \
        flat[:limit - 1] + "…"


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``python -m pipeline.query``."""
    parser = UsageParser(
        prog="python -m pipeline.query",
        description="Print the documents of an embeddings index nearest "
                    "(cosine) to a text, embedded with the index's own "
                    "model and settings.")
    parser.add_argument("--index", required=True,
                        help="A run's manifest (…-manifest.json) or output "
                             "prefix.")
    parser.add_argument("--text", required=True, help="The query text.")
    parser.add_argument("--top_k", type=int, default=DEFAULT_TOP_K,
                        help=f"Hits to print (default {DEFAULT_TOP_K}).")
    parser.add_argument("--model", default=None,
                        help="The model to embed the query with (default: "
                             "the index's); must be the index's model.")
    parser.add_argument("--pooling", default=None,
                        help="Must be the index's pooling (default: it).")
    parser.add_argument("--rows", default="auto", choices=ROWS_KINDS,
                        help="Search document vectors or embedding rows "
                             "(auto: document vectors when the run wrote "
                             "them).")
    parser.add_argument("--text_chars", type=int,
                        default=DEFAULT_TEXT_CHARS,
                        help="Cut printed texts to this many characters "
                             f"(0: whole; default {DEFAULT_TEXT_CHARS}).")
    parser.add_argument("--json", action="store_true",
                        help="One JSON object per hit (id, score, text).")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: 0 with hits printed, 1 when the index's files do not match its
    manifest, 2 on bad usage or a refused query."""
    from model.errors import ModelFormatError
    from pipeline.manifest import ManifestError
    from pipeline.read_embeddings import DatasetError
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if wants_help(args):
        parser.print_help()
        return EXIT_OK
    setup_logging()
    try:
        options = parser.parse_args(args)
        hits = query_index(options.index, options.text, options.top_k,
                           options.model, options.pooling, options.rows)
    except (UsageError, ManifestError, ModelFormatError,
            FileNotFoundError, ValueError) as err:
        if isinstance(err, DatasetError):
            print(f"error: {err}", file=sys.stderr)
            return EXIT_DATASET
        print(f"error: {one_line(str(err), 0)}", file=sys.stderr)
        return EXIT_USAGE
    for hit in hits:
        if options.json:
            print(json.dumps(dataclasses.asdict(hit), ensure_ascii=False))
        else:
            print(f"{hit.score:.4f}\t{hit.id}\t"
                  f"{one_line(hit.text, options.text_chars)}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
