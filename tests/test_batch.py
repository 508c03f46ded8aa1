"""Length-aware batching: sorted, bounded by documents and padded tokens."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.batch import BatchByLength, cut_batches
from transforms.records import TokenizedDocument


def _doc(i: int, length: int) -> TokenizedDocument:
    return TokenizedDocument(f"d{i}", np.full(length, 5, np.int32), False)


def _lengths(batches):
    return [[d.num_tokens for d in b] for b in batches]


def test_batches_group_similar_lengths_and_respect_doc_cap():
    docs = [_doc(i, n) for i, n in enumerate([40, 3, 9, 41, 4, 10, 42, 5])]
    batches = cut_batches(docs, max_docs=3, max_tokens=10_000)
    assert _lengths(batches) == [[3, 4, 5], [9, 10, 40], [41, 42]]


def test_batches_respect_padded_token_budget():
    docs = [_doc(i, n) for i, n in enumerate([10, 10, 10, 30, 30, 100])]
    batches = cut_batches(docs, max_docs=100, max_tokens=60)
    assert _lengths(batches) == [[10, 10, 10], [30, 30], [100]]
    for batch in batches[:-1]:
        assert len(batch) * max(d.num_tokens for d in batch) <= 60


def test_every_document_lands_in_exactly_one_batch():
    rng = np.random.default_rng(1)
    docs = [_doc(i, int(n)) for i, n in enumerate(rng.integers(2, 128, 500))]
    batches = cut_batches(docs, max_docs=16, max_tokens=1024)
    ids = sorted(d.id for b in batches for d in b)
    assert ids == sorted(d.id for d in docs)


def test_rejects_nonpositive_limits():
    with pytest.raises(ValueError):
        BatchByLength(0, 100)


def test_dofn_in_a_pipeline_keeps_all_documents():
    docs = [_doc(i, 2 + i % 50) for i in range(300)]
    with BeamTestPipeline() as p:
        sizes = (p | beam.Create(docs)
                 | beam.ParDo(BatchByLength(8, 256, sort_window=64))
                 | beam.FlatMap(lambda b: [d.id for d in b]))
        assert_that(sizes, equal_to([d.id for d in docs]))
