"""``--dedup``: exact duplicate texts within a run are embedded once.

Documents are grouped by content hash.  In each group one document is kept
and the others are dropped and counted (``documents_duplicates``).  The
kept one is the smallest by (id, source, line), not the first seen: the
choice must not depend on the order in which workers read, so that a re-run
over the same input keeps the same documents (which the incremental join
relies on).  Blank texts are not grouped: they go on to be counted as
skipped (empty).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import apache_beam as beam

from transforms.records import METRICS_NAMESPACE, Document

DUPLICATE_TAG = "duplicates"


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
