"""Document vectors for chunked runs: the mean of a document's chunk vectors.

With ``--long_text chunk`` a long document is embedded as several chunks;
``DocumentVectors`` groups them by ``doc_id`` and averages their vectors
(the ``pooled_output`` column: the run's ``--pooling``, already unit length
with ``--normalize``) into one vector per document, scaled to unit length
again with ``--normalize``, so a long text still has a single vector for
retrieval or clustering.
"""

from __future__ import annotations

from typing import Any, Optional

import apache_beam as beam
import numpy as np

from transforms.pooling import l2_normalize
from transforms.records import DocumentEmbedding

# (sum of pooled vectors in float64, number of chunks, tokens over chunks)
_Accumulator = tuple[Optional[np.ndarray], int, int]


class MeanOfChunks(beam.CombineFn):
    """Averages ``pooled_output`` over a document's chunks; ``normalize``
    scales the mean to unit length."""

    def __init__(self, normalize: bool = False) -> None:
        super().__init__()
        self._normalize = normalize

    def create_accumulator(self) -> _Accumulator:
        return None, 0, 0

    def add_input(self, acc: _Accumulator,
                  chunk: tuple[np.ndarray, int]) -> _Accumulator:
        total, count, tokens = acc
        pooled, num_tokens = chunk
        vector = pooled.astype(np.float64)
        return (vector if total is None else total + vector, count + 1,
                tokens + num_tokens)

    def merge_accumulators(self, accs: Any) -> _Accumulator:
        total, count, tokens = None, 0, 0
        for part_total, part_count, part_tokens in accs:
            if part_total is not None:
                total = part_total if total is None else total + part_total
            count += part_count
            tokens += part_tokens
        return total, count, tokens

    def extract_output(self, acc: _Accumulator) -> tuple[np.ndarray, int, int]:
        total, count, tokens = acc
        mean = total / count
        return (l2_normalize(mean) if self._normalize
                else mean.astype(np.float32)), count, tokens


def _document_row(item: tuple[tuple[str, str], tuple[np.ndarray, int, int]]
                  ) -> DocumentEmbedding:
    (doc_id, digest), (mean, count, tokens) = item
    return DocumentEmbedding(doc_id, tokens, False, mean, None, doc_id, 0,
                             count, content_hash=digest)


class DocumentVectors(beam.PTransform):
    """Chunk embeddings in, one ``DocumentEmbedding`` per document out.

    The output rows carry the document id as ``id``, the mean of the chunk
    vectors as ``pooled_output`` (unit length when ``normalize``), the
    tokens of all chunks as ``num_tokens`` and the document's
    ``content_hash``.  Chunks are grouped by document id and content hash,
    so two different texts that share an id are not averaged together.
    """

    def __init__(self, normalize: bool = False) -> None:
        super().__init__()
        self._normalize = normalize

    def expand(self, chunks: beam.PCollection) -> beam.PCollection:
        # Only the pooled vector and the token count cross the shuffle, not
        # the (large) sequence output.
        return (chunks
                | "KeyByDocument" >> beam.Map(
                    lambda c: ((c.doc_id, c.content_hash),
                               (c.pooled_output, c.num_tokens)))
                | "MeanOfChunks" >> beam.CombinePerKey(
                    MeanOfChunks(self._normalize))
                | "ToRow" >> beam.Map(_document_row))
