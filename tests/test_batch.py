"""Length-aware batching: sorted, bounded by documents and padded tokens."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.batch import (BatchByLength, BatchSettings, batch_width,
                             cut_batches, step_length)
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
        BatchSettings(0, 100)


def test_dofn_in_a_pipeline_keeps_all_documents():
    docs = [_doc(i, 2 + i % 50) for i in range(300)]
    with BeamTestPipeline() as p:
        sizes = (p | beam.Create(docs)
                 | beam.ParDo(BatchByLength(
                     BatchSettings(8, 256, sort_window=64)))
                 | beam.FlatMap(lambda b: [d.id for d in b]))
        assert_that(sizes, equal_to([d.id for d in docs]))


def _bucket_index(length: int, boundaries: list[int]) -> int:
    """Reference bucket: how many boundaries are <= length."""
    return sum(1 for b in boundaries if b <= length)


def test_bucket_boundaries_never_mix_buckets_and_keep_every_document():
    rng = np.random.default_rng(7)
    docs = [_doc(i, int(n)) for i, n in enumerate(rng.integers(3, 200, 400))]
    boundaries = [16, 32, 64, 128]
    batches = cut_batches(docs, max_docs=16, max_tokens=2048,
                          bucket_boundaries=boundaries)
    for batch in batches:
        assert len({_bucket_index(d.num_tokens, boundaries)
                    for d in batch}) == 1
        assert len(batch) <= 16
        if len(batch) > 1:
            assert len(batch) * max(d.num_tokens for d in batch) <= 2048
    ids = sorted(d.id for b in batches for d in b)
    assert ids == sorted(d.id for d in docs)


def test_bucket_boundaries_are_lower_inclusive():
    docs = [_doc(i, n) for i, n in enumerate([7, 8, 9, 15, 16, 17])]
    batches = cut_batches(docs, max_docs=100, max_tokens=10_000,
                          bucket_boundaries=[8, 16])
    assert _lengths(batches) == [[7], [8, 9, 15], [16, 17]]


def test_without_boundaries_a_batch_spans_what_buckets_would_split():
    docs = [_doc(i, n) for i, n in enumerate([7, 8, 9, 15, 16, 17])]
    assert _lengths(cut_batches(docs, 100, 10_000)) == [
        [7, 8, 9, 15, 16, 17]]
    assert _lengths(cut_batches(docs, 100, 10_000, None)) == \
        _lengths(cut_batches(docs, 100, 10_000))


def test_none_boundaries_give_the_unbucketed_batches():
    rng = np.random.default_rng(3)
    docs = [_doc(i, int(n)) for i, n in enumerate(rng.integers(2, 128, 300))]
    plain = cut_batches(docs, max_docs=8, max_tokens=512)
    explicit = cut_batches(docs, max_docs=8, max_tokens=512,
                           bucket_boundaries=None)
    assert [[d.id for d in b] for b in plain] == \
        [[d.id for d in b] for b in explicit]


@pytest.mark.parametrize("boundaries", [[], [0, 8], [16, 8], [8, 8]])
def test_rejects_unusable_bucket_boundaries(boundaries):
    with pytest.raises(ValueError, match="bucket_boundaries"):
        cut_batches([_doc(0, 5)], 4, 100, bucket_boundaries=boundaries)
    with pytest.raises(ValueError, match="bucket_boundaries"):
        BatchSettings(4, 100, bucket_boundaries=boundaries)


def test_dofn_with_bucket_boundaries_keeps_buckets_apart():
    docs = [_doc(i, 2 + i % 60) for i in range(240)]
    boundaries = [10, 30]
    with BeamTestPipeline() as p:
        batches = (p | beam.Create(docs)
                   | beam.ParDo(BatchByLength(BatchSettings(
                       8, 256, sort_window=64, bucket_boundaries=boundaries))))
        mixed = batches | beam.Filter(
            lambda b: len({_bucket_index(d.num_tokens, boundaries)
                           for d in b}) > 1)
        ids = batches | beam.FlatMap(lambda b: [d.id for d in b])
        assert_that(mixed, equal_to([]), label="NoMixedBatch")
        assert_that(ids, equal_to([d.id for d in docs]), label="AllKept")


def test_step_lengths_bound_the_number_of_widths_and_the_padding():
    for cap in (128, 512):
        widths = {step_length(n, cap) for n in range(1, cap + 1)}
        assert len(widths) == {128: 16, 512: 32}[cap]
        for n in range(1, cap + 1):
            width = step_length(n, cap)
            assert n <= width <= cap
            # at most 7 tokens up to 128, under an eighth beyond
            assert width - n <= max(7, n // 8)
            assert step_length(width, cap) == width  # a width is a step
    assert [step_length(n, 512) for n in (1, 8, 9, 65, 129, 257)] == \
        [8, 8, 16, 72, 144, 288]


def test_step_length_never_exceeds_max_seq_length_or_shortens():
    assert step_length(97, 100) == 100  # 104 would pass the cap
    assert step_length(100, 100) == 100
    assert step_length(600, 512) == 600  # above the cap: unchanged


def test_batch_width_rounds_only_with_pad_to_steps():
    assert batch_width([3, 11, 5], None) == 11
    assert batch_width([3, 11, 5], 128) == 16


def test_budget_counts_step_widths_when_padding_to_steps():
    rng = np.random.default_rng(5)
    docs = [_doc(i, int(n)) for i, n in enumerate(rng.integers(2, 129, 600))]
    batches = cut_batches(docs, max_docs=32, max_tokens=1024,
                          pad_to_steps=128)
    for batch in batches:
        lengths = [d.num_tokens for d in batch]
        assert len(batch) * batch_width(lengths, 128) <= 1024
    assert sorted(d.id for b in batches for d in b) == \
        sorted(d.id for d in docs)
    # A 20-token document is 24 wide: 1024 // 24 = 42 per batch, where
    # unrounded widths fit all 50 (50 x 20 = 1000).
    twenty = [_doc(i, 20) for i in range(50)]
    assert _lengths(cut_batches(twenty, 100, 1024, pad_to_steps=128)) == \
        [[20] * 42, [20] * 8]
    assert _lengths(cut_batches(twenty, 100, 1024)) == [[20] * 50]


def test_dofn_pads_to_steps_when_asked():
    docs = [_doc(i, 20) for i in range(50)]
    with BeamTestPipeline() as p:
        sizes = (p | beam.Create(docs)
                 | beam.ParDo(BatchByLength(BatchSettings(
                     100, 1024, max_seq_length=128, step_padding=True)))
                 | beam.Map(len))
        assert_that(sizes, equal_to([42, 8]))
