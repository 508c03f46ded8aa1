"""Duplicates: one document per id always; with ``--dedup`` one per text.

Documents sharing an id (a record repeated, or an id reused for another
text) would give the dataset two rows for one id.  They are grouped by id
and the **last** one wins: the greatest (source, line), i.e. the latest
record of a file, and of the files the one whose path sorts last -- a rule
that does not depend on the order in which workers read.  The others are
dropped and counted as ``documents_duplicates``; the ids concerned are
counted (``duplicate_ids``) and a few of them named in the run summary.
Blank texts are not grouped: they go on to be counted as skipped (empty).

``--dedup``: exact duplicate texts within a run are embedded once.

Documents are grouped by content hash.  In each group one document is kept
and the others are dropped and counted (``documents_duplicates``).  The
kept one is the smallest by (id, source, line), not the first seen: the
choice must not depend on the order in which workers read, so that a re-run
over the same input keeps the same documents (which the incremental join
relies on).  Blank texts are not grouped: they go on to be counted as
skipped (empty).

The dropped ids stay findable: ``MapDuplicates`` gives each of them an
index entry whose ``embedded_as`` is the id that was embedded for its text
(joined by content hash with the run's index entries, so it points at the
run that holds those rows, this one or, when the text was unchanged, an
earlier one).  A dropped id whose text has no entry (its document failed)
gets none, like the document itself.

The two rules compose: an id is first reduced to one document (the last),
then texts to one document each; every id that is left has one entry.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import apache_beam as beam

from transforms.incremental import IndexEntry
from transforms.records import METRICS_NAMESPACE, Document

DUPLICATE_TAG = "duplicates"
# How many of the ids that occurred more than once the summary names (and
# each DoFn instance adds to the sample metric at most).
ID_SAMPLE_SIZE = 5


def pick_latest(docs: Iterable[Document]) -> tuple[Document, list[Document]]:
    """(the document that wins, the dropped ones) of documents sharing an
    id: the last by (source, line); the content hash breaks a tie (the same
    file read twice), so the choice never depends on reading order."""
    ordered = sorted(docs, key=lambda d: (d.source, d.line, d.content_hash))
    return ordered[-1], ordered[:-1]


class _KeepLastPerId(beam.DoFn):
    """One id's documents in; the winner out (main output), the dropped
    ones on the ``duplicates`` output."""

    def __init__(self) -> None:
        metrics = beam.metrics.Metrics
        self._duplicates = metrics.counter(METRICS_NAMESPACE,
                                           "documents_duplicates")
        self._ids = metrics.counter(METRICS_NAMESPACE, "duplicate_ids")
        self._sample = metrics.string_set(METRICS_NAMESPACE,
                                          "duplicate_id_sample")
        self._named = 0

    def process(self, group: tuple[str, Iterable[Document]]
                ) -> Iterator[Any]:
        kept, dropped = pick_latest(group[1])
        yield kept
        if not dropped:
            return
        self._ids.inc()
        if self._named < ID_SAMPLE_SIZE:
            self._named += 1
            self._sample.add(group[0])
        for doc in dropped:
            self._duplicates.inc()
            yield beam.pvalue.TaggedOutput(DUPLICATE_TAG, doc)


class KeepLastPerId(beam.PTransform):
    """Documents in; ``(one document per id, dropped documents)`` out.

    Blank documents pass through untouched: they are skipped (empty) later
    and never written, and the blank lines of a text file, which share one
    derived id, should count as skipped, not as duplicates.
    """

    def expand(self, docs: beam.PCollection) -> tuple[Any, Any]:
        blank = docs | "Blank" >> beam.Filter(lambda d: not d.text.strip())
        grouped = (docs
                   | "NonBlank" >> beam.Filter(lambda d: bool(d.text.strip()))
                   | "ById" >> beam.Map(lambda d: (d.id, d))
                   | "Group" >> beam.GroupByKey()
                   | "KeepLast" >> beam.ParDo(_KeepLastPerId()).with_outputs(
                       DUPLICATE_TAG, main="kept"))
        unique = (grouped.kept, blank) | "WithBlank" >> beam.Flatten()
        return unique, grouped[DUPLICATE_TAG]


def pick_kept(docs: Iterable[Document]) -> tuple[Document, list[Document]]:
    """(the document to keep, the duplicates) of one group of equal texts."""
    ordered = sorted(docs, key=lambda d: (d.id, d.source, d.line))
    return ordered[0], ordered[1:]


class _KeepOnePerText(beam.DoFn):
    """One group of equal texts in, the kept document out (main output) and
    the dropped ones on the ``duplicates`` output."""

    def __init__(self) -> None:
        self._duplicates = beam.metrics.Metrics.counter(
            METRICS_NAMESPACE, "documents_duplicates")

    def process(self, group: tuple[str, Iterable[Document]]
                ) -> Iterator[Any]:
        kept, dropped = pick_kept(group[1])
        yield kept
        for doc in dropped:
            self._duplicates.inc()
            yield beam.pvalue.TaggedOutput(DUPLICATE_TAG, doc)


class DropDuplicates(beam.PTransform):
    """Documents in; ``(unique documents, duplicates)`` out.

    Blank documents pass through untouched (they are skipped later).
    """

    def expand(self, docs: beam.PCollection) -> tuple[Any, Any]:
        blank = docs | "Blank" >> beam.Filter(lambda d: not d.text.strip())
        grouped = (docs
                   | "NonBlank" >> beam.Filter(lambda d: bool(d.text.strip()))
                   | "ByHash" >> beam.Map(lambda d: (d.content_hash, d))
                   | "Group" >> beam.GroupByKey()
                   | "KeepOne" >> beam.ParDo(_KeepOnePerText()).with_outputs(
                       DUPLICATE_TAG, main="kept"))
        unique = ((grouped.kept, blank)
                  | "WithBlank" >> beam.Flatten())
        return unique, grouped[DUPLICATE_TAG]


def mapped_entries(entries: Iterable[IndexEntry],
                   duplicates: Iterable[Document]) -> Iterator[IndexEntry]:
    """Index entries of the ``duplicates`` of one text, pointing at the
    rows of the one entry (the embedded document) of ``entries``; none
    when that document has no entry."""
    own = [e for e in entries if not e.mapped]
    if len(own) != 1:
        return
    (kept,) = own
    for doc in duplicates:
        yield IndexEntry(doc.id, doc.content_hash, kept.model_fingerprint,
                         kept.run_id, embedded_as=kept.row_id)


class MapDuplicates(beam.PTransform):
    """``(index entries, documents dropped by --dedup)`` in; an index entry
    per dropped document out, mapping its id to the embedded one's rows.

    Joined by content hash: after ``DropDuplicates`` each text of the run
    has one document, so at most one entry per hash.
    """

    def expand(self, inputs: tuple[beam.PCollection, beam.PCollection]
               ) -> beam.PCollection:
        entries, duplicates = inputs
        return ({"entries": entries | "EntriesByHash" >> beam.Map(
                    lambda e: (e.content_hash, e)),
                 "duplicates": duplicates | "DuplicatesByHash" >> beam.Map(
                    lambda d: (d.content_hash, d))}
                | "JoinByHash" >> beam.CoGroupByKey()
                | "Map" >> beam.FlatMap(lambda item: mapped_entries(
                    item[1]["entries"], item[1]["duplicates"])))
