"""Length-aware batching: ``TokenizedDocument`` in, lists of them out.

BERT's cost grows with the padded batch shape, so a batch that mixes a
10-token review with a 128-token article computes mostly padding.  This
DoFn keeps a window of documents, sorts it by length, and cuts it into
batches of similar length, each bounded by a document count and by a budget
of padded tokens (``documents x longest``).  The model then pads each batch
only to its own longest document.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from transforms.records import TokenizedDocument

# Documents held back for sorting before batches are cut.  Larger windows
# group lengths better; the cost is memory for the ids only (small).
DEFAULT_SORT_WINDOW = 2048


def cut_batches(docs: Sequence[TokenizedDocument], max_docs: int,
                max_tokens: int) -> list[list[TokenizedDocument]]:
    """Sorts ``docs`` by length and cuts them into bounded batches.

    A batch never has more than ``max_docs`` documents, and its padded size
    (documents x longest) never exceeds ``max_tokens`` unless a single
    document is longer than the budget on its own.
    """
    ordered = sorted(docs, key=lambda d: d.num_tokens)
    batches: list[list[TokenizedDocument]] = []
    current: list[TokenizedDocument] = []
    for doc in ordered:
        # Sorted ascending, so this document is the batch's longest.
        padded = (len(current) + 1) * doc.num_tokens
        if current and (len(current) >= max_docs or padded > max_tokens):
            batches.append(current)
            current = []
        current.append(doc)
    if current:
        batches.append(current)
    return batches


class BatchByLength(beam.DoFn):
    """Groups documents of similar token length into bounded batches.

    Sorting happens within a window of ``sort_window`` documents of one
    bundle; what is left at the end of a bundle is flushed then.
    """

    def __init__(self, max_docs: int, max_tokens: int,
                 sort_window: int = DEFAULT_SORT_WINDOW):
        if max_docs < 1 or max_tokens < 1 or sort_window < 1:
            raise ValueError("max_docs, max_tokens and sort_window must be "
                             "positive")
        self._max_docs = max_docs
        self._max_tokens = max_tokens
        self._window = max(sort_window, max_docs)
        self._buffer: list[TokenizedDocument] = []

    def start_bundle(self) -> None:
        self._buffer = []

    def process(self, doc: TokenizedDocument
                ) -> Iterator[list[TokenizedDocument]]:
        self._buffer.append(doc)
        if len(self._buffer) >= self._window:
            yield from self._drain()

    def finish_bundle(self) -> Iterator[Any]:
        for batch in self._drain():
            yield GlobalWindows.windowed_value(batch)

    def _drain(self) -> list[list[TokenizedDocument]]:
        batches = cut_batches(self._buffer, self._max_docs, self._max_tokens)
        self._buffer = []
        return batches
