"""Incremental runs: documents already in the previous index are not embedded.

Every run writes an *index*: one ``IndexEntry`` per document of the current
dataset (id, content hash, model fingerprint, the run whose files hold its
rows, and ``embedded_as``: the id of those rows, the document's own, or
under ``--dedup`` the id embedded for its text) to
``<output>-index/part-*.parquet``.  With ``--previous_index``
the previous run's index is read (those four small columns only), keyed by
id and joined (``CoGroupByKey``, so it scales with the corpus rather than
with one worker's memory) with this run's documents.  For each id:

* a document whose content hash and model fingerprint are among the previous
  entries is **unchanged**: it is not embedded again, and its entry, still
  pointing at the run that wrote its rows, goes into the new index;
* any other document is **new** (id not in the previous index) or
  **changed**, and goes on to be embedded (an entry that maps the id to
  another id's rows, ``--dedup``, does not make it unchanged: no row of
  its own exists);
* a previous id that no document of this run carries (not even a dropped
  duplicate) is **deleted**: recorded in ``<output>-deleted-*.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, Iterator, Sequence

import apache_beam as beam

from transforms.embedding_files import (EMBEDDED_AS, ID, INDEX_COLUMNS,
                                        INDEX_SCHEMA, JSONL_EXT, PARQUET_EXT)
from transforms.records import METRICS_NAMESPACE, Document, DocumentEmbedding

UNCHANGED_TAG = "unchanged"
DELETED_TAG = "deleted"


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    """A document of the current dataset and the run that holds its rows."""
    id: str
    content_hash: str
    model_fingerprint: str
    run_id: str
    nbytes: int = 0  # input bytes, for progress only; not written
    embedded_as: str = ""  # the id of its rows; "" for its own id

    @property
    def row_id(self) -> str:
        """The id of the rows that hold this document's vectors."""
        return self.embedded_as or self.id

    @property
    def mapped(self) -> bool:
        """Whether the vectors are another id's rows (``--dedup``)."""
        return self.row_id != self.id

    def to_row(self) -> dict[str, str]:
        row = {name: getattr(self, name) for name in INDEX_COLUMNS}
        row[EMBEDDED_AS] = self.row_id
        return row


@dataclasses.dataclass(frozen=True)
class DeletedDocument:
    """A document of the previous index that this run's input lacks."""
    id: str
    content_hash: str
    run_id: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


def entry_of(row: DocumentEmbedding, fingerprint: str,
             run_id: str) -> IndexEntry:
    """The index entry of a row embedded by this run."""
    return IndexEntry(row.document_id, row.content_hash, fingerprint, run_id)


def _entry_from_row(row: dict[str, Any]) -> tuple[str, IndexEntry]:
    """An index file's row as ``(id, entry)``; files written before
    ``embedded_as`` existed lack the column (every entry its own row)."""
    return row[ID], IndexEntry(**{name: row.get(name) or ""
                                    for name in INDEX_COLUMNS})


class ReadIndexEntries(beam.PTransform):
    """``(id, IndexEntry)`` pairs from index files (every column: the files
    hold nothing else, and older ones lack ``embedded_as``)."""

    def __init__(self, files: Sequence[str]):
        super().__init__()
        self._files = list(files)

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (pbegin
                | "Files" >> beam.Create(self._files)
                | "Read" >> beam.io.ReadAllFromParquet()
                | "ById" >> beam.Map(_entry_from_row))


class _Classify(beam.DoFn):
    """One id's documents and previous entries in; documents to embed out
    (main), unchanged entries and deleted documents on their tags."""

    def __init__(self, fingerprint: str, reuse: bool):
        self._fingerprint = fingerprint
        self._reuse = reuse
        counter = beam.metrics.Metrics.counter
        self._unchanged = counter(METRICS_NAMESPACE, "documents_unchanged")
        self._new = counter(METRICS_NAMESPACE, "documents_new")
        self._changed = counter(METRICS_NAMESPACE, "documents_changed")
        self._deleted = counter(METRICS_NAMESPACE, "documents_deleted")

    def process(self, joined: tuple[str, dict[str, Iterable[Any]]]
                ) -> Iterator[Any]:
        doc_id, groups = joined
        previous: list[IndexEntry] = list(groups["previous"])
        docs: list[Document] = list(groups["documents"])
        if not docs and not any(True for _ in groups["duplicates"]):
            if previous:
                self._deleted.inc()
            for entry in previous:
                yield beam.pvalue.TaggedOutput(DELETED_TAG, DeletedDocument(
                    doc_id, entry.content_hash, entry.run_id))
            return
        runs = {(e.content_hash, e.model_fingerprint): e.run_id
                for e in previous if not e.mapped} if self._reuse else {}
        for doc in docs:
            run_id = runs.get((doc.content_hash, self._fingerprint))
            if run_id is not None:
                self._unchanged.inc()
                yield beam.pvalue.TaggedOutput(UNCHANGED_TAG, IndexEntry(
                    doc.id, doc.content_hash, self._fingerprint, run_id,
                    doc.nbytes))
                continue
            (self._changed if previous else self._new).inc()
            yield doc


class SplitUnchanged(beam.PTransform):
    """Joins documents with the previous index.

    ``reuse=False`` (the previous index was written with another output
    layout) re-embeds every document but still records deletions.  Returns
    a ``DoOutputsTuple``: ``to_embed`` documents, ``unchanged`` entries and
    ``deleted`` documents.
    """

    def __init__(self, index_files: Sequence[str], fingerprint: str,
                 reuse: bool = True):
        super().__init__()
        self._files = list(index_files)
        self._fingerprint = fingerprint
        self._reuse = reuse

    def expand(self, inputs: tuple[beam.PCollection, beam.PCollection]
               ) -> Any:
        docs, duplicates = inputs
        previous = inputs[0].pipeline | "ReadPrevious" >> ReadIndexEntries(
            self._files)
        joined = ({"documents": docs | "DocsById" >> beam.Map(
                       lambda d: (d.id, d)),
                   "duplicates": duplicates | "DuplicatesById" >> beam.Map(
                       lambda d: (d.id, 1)),
                   "previous": previous}
                  | "Join" >> beam.CoGroupByKey())
        return joined | "Classify" >> beam.ParDo(_Classify(
            self._fingerprint, self._reuse)).with_outputs(
                UNCHANGED_TAG, DELETED_TAG, main="to_embed")


class WriteIndex(beam.PTransform):
    """Writes ``IndexEntry`` elements as ``<prefix>-SSSSS-of-NNNNN.parquet``
    (the ``INDEX_COLUMNS``)."""

    def __init__(self, prefix: str):
        super().__init__()
        self._prefix = prefix

    def expand(self, entries: beam.PCollection) -> Any:
        return (entries
                | "ToRow" >> beam.Map(IndexEntry.to_row)
                | "WriteParquet" >> beam.io.WriteToParquet(
                    self._prefix, INDEX_SCHEMA, codec="snappy",
                    file_name_suffix=PARQUET_EXT))


class WriteDeleted(beam.PTransform):
    """Writes ``DeletedDocument`` records as JSON lines to
    ``<prefix>-SSSSS-of-NNNNN.jsonl``."""

    def __init__(self, prefix: str):
        super().__init__()
        self._prefix = prefix

    def expand(self, deleted: beam.PCollection) -> Any:
        return (deleted
                | "ToJson" >> beam.Map(DeletedDocument.to_json)
                | "WriteJsonl" >> beam.io.WriteToText(
                    self._prefix, file_name_suffix=JSONL_EXT))


class _KeepComplete(beam.DoFn):
    """Index entries for documents all of whose chunks were embedded.

    A chunked document whose later chunk's batch failed is left out of the
    index (and counted as ``documents_incomplete``), so that the next
    incremental run embeds it again instead of taking it as unchanged.
    """

    def __init__(self, fingerprint: str, run_id: str):
        self._fingerprint = fingerprint
        self._run_id = run_id
        self._incomplete = beam.metrics.Metrics.counter(
            METRICS_NAMESPACE, "documents_incomplete")

    def process(self, item: tuple[str, Iterable[tuple[int, str]]]
                ) -> Iterator[IndexEntry]:
        doc_id, chunks = item
        chunks = list(chunks)
        num_chunks, content_hash = chunks[0]
        if len(chunks) != num_chunks:
            self._incomplete.inc()
            return
        yield IndexEntry(doc_id, content_hash, self._fingerprint, self._run_id)


class CompleteDocumentEntries(beam.PTransform):
    """Embedding rows in, one ``IndexEntry`` per fully embedded document out.

    Unchunked runs have one row per document: its entry comes straight from
    the row.  Chunked runs group the (small) chunk keys by document first.
    """

    def __init__(self, fingerprint: str, run_id: str, chunked: bool):
        super().__init__()
        self._fingerprint = fingerprint
        self._run_id = run_id
        self._chunked = chunked

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        if not self._chunked:
            return rows | "Entries" >> beam.Map(
                entry_of, self._fingerprint, self._run_id)
        return (rows
                | "ChunkKeys" >> beam.Map(
                    lambda r: (r.document_id, (r.num_chunks, r.content_hash)))
                | "ByDocument" >> beam.GroupByKey()
                | "KeepComplete" >> beam.ParDo(
                    _KeepComplete(self._fingerprint, self._run_id)))
