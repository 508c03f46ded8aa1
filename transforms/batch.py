"""Length-aware batching: ``TokenizedDocument`` in, lists of them out.

BERT's cost grows with the padded batch shape, so a batch that mixes a
10-token review with a 128-token article computes mostly padding.  This
DoFn keeps a window of documents, sorts it by length, and cuts it into
batches of similar length, each bounded by a document count and by a budget
of padded tokens (``documents x longest``).  The model then pads each batch
only to its own longest document.

With ``bucket_boundaries`` (e.g. the ones ``pipeline.analyze`` recommends)
documents are first split into length buckets and a batch never mixes two
buckets, so each bucket's batches are padded within that bucket's range.

With step padding (``BatchSettings.step_padding``, set when the model is
compiled with XLA, which compiles once per input shape) a batch's width is its longest document
rounded up to a length step (``step_length``), so that a whole corpus
needs a few dozen shapes instead of one per length; the token budget
counts the rounded width.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from transforms.records import TokenizedDocument

# Documents held back for sorting before batches are cut.  Larger windows
# group lengths better; the cost is memory for the ids only (small).
DEFAULT_SORT_WINDOW = 2048


def check_bucket_boundaries(boundaries: Optional[Sequence[int]]
                            ) -> Optional[list[int]]:
    """``boundaries`` as a list of ints, after checking that they are usable.

    ``None`` stays ``None`` (no bucketing).  Otherwise the boundaries must be
    non-empty, positive and strictly increasing, so that every length falls
    into exactly one bucket.
    """
    if boundaries is None:
        return None
    values = [int(b) for b in boundaries]
    if (not values or values[0] < 1
            or any(a >= b for a, b in zip(values, values[1:]))):
        raise ValueError("bucket_boundaries must be a non-empty, strictly "
                         f"increasing list of positive ints, got {boundaries}")
    return values


def step_length(num_tokens: int, cap: int) -> int:
    """``num_tokens`` rounded up to a length step, but not beyond ``cap``.

    Steps are 8 tokens up to 128, 16 up to 256, 32 up to 512 and so on
    (a sixteenth of the power of two at or above the length, at least 8),
    so rounding adds at most 7 tokens up to 128 and under an eighth beyond,
    while lengths up to 128 need 16 widths and up to 512 need 32.
    ``cap`` (the run's ``max_seq_length``) keeps the width within what the
    model accepts; a length already above it is returned unchanged.
    """
    step = max(8, 1 << max(0, (num_tokens - 1).bit_length() - 4))
    rounded = -(-num_tokens // step) * step
    return max(num_tokens, min(rounded, cap))


def batch_width(lengths: Sequence[int], pad_to_steps: Optional[int]) -> int:
    """The padded width of a batch: its longest length, rounded up with
    ``step_length`` when ``pad_to_steps`` (the cap) is set."""
    longest = max(lengths)
    return longest if pad_to_steps is None else step_length(longest,
                                                            pad_to_steps)


def bucket_of(num_tokens: int, boundaries: Sequence[int]) -> int:
    """The bucket index of a length: bucket ``i`` is ``[b[i-1], b[i])``.

    Boundaries are lower-inclusive (``bisect_right``, as in Beam's
    ``BatchElements``): a document exactly as long as a boundary starts the
    next bucket.
    """
    return bisect.bisect_right(boundaries, num_tokens)


def _cut_sorted(ordered: Sequence[TokenizedDocument], max_docs: int,
                max_tokens: int, pad_to_steps: Optional[int]
                ) -> list[list[TokenizedDocument]]:
    """Cuts length-sorted documents into batches bounded by both limits."""
    batches: list[list[TokenizedDocument]] = []
    current: list[TokenizedDocument] = []
    for doc in ordered:
        # Sorted ascending, so this document is the batch's longest.
        width = batch_width([doc.num_tokens], pad_to_steps)
        padded = (len(current) + 1) * width
        if current and (len(current) >= max_docs or padded > max_tokens):
            batches.append(current)
            current = []
        current.append(doc)
    if current:
        batches.append(current)
    return batches


def cut_batches(docs: Sequence[TokenizedDocument], max_docs: int,
                max_tokens: int,
                bucket_boundaries: Optional[Sequence[int]] = None,
                pad_to_steps: Optional[int] = None
                ) -> list[list[TokenizedDocument]]:
    """Sorts ``docs`` by length and cuts them into bounded batches.

    A batch never has more than ``max_docs`` documents, and its padded size
    (documents x ``batch_width``) never exceeds ``max_tokens`` unless a
    single document is longer than the budget on its own.  With
    ``bucket_boundaries`` each length bucket (see ``bucket_of``) is cut on
    its own, so no batch holds documents of two buckets; batches come out
    bucket by bucket, shortest bucket first.
    """
    ordered = sorted(docs, key=lambda d: d.num_tokens)
    boundaries = check_bucket_boundaries(bucket_boundaries)
    if boundaries is None:
        return _cut_sorted(ordered, max_docs, max_tokens, pad_to_steps)
    buckets: dict[int, list[TokenizedDocument]] = {}
    for doc in ordered:  # stays sorted within each bucket
        buckets.setdefault(bucket_of(doc.num_tokens, boundaries),
                           []).append(doc)
    return [batch for index in sorted(buckets)
            for batch in _cut_sorted(buckets[index], max_docs, max_tokens,
                                     pad_to_steps)]


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    """How documents are batched and how wide each batch is padded
    (``--batch_size``, ``--max_tokens_per_batch``, ``--bucket_boundaries``),
    checked once, here.

    The width policy is this class's: a batch is padded to its longest
    document, rounded up to a length step (``step_length``) capped at
    ``max_seq_length`` when ``step_padding`` is set (the model runs under
    XLA).  The batcher counts and the model handler pads those same widths.
    ``max_seq_length`` is received already checked (``TokenizeSettings``).
    """
    batch_size: int = 32
    max_tokens_per_batch: int = 2048
    bucket_boundaries: Optional[Sequence[int]] = None
    max_seq_length: int = 512
    step_padding: bool = False
    sort_window: int = DEFAULT_SORT_WINDOW

    def __post_init__(self) -> None:
        if (self.batch_size < 1 or self.max_tokens_per_batch < 1
                or self.sort_window < 1):
            raise ValueError("batch_size, max_tokens_per_batch and "
                             "sort_window must be positive")
        boundaries = check_bucket_boundaries(self.bucket_boundaries)
        object.__setattr__(self, "bucket_boundaries",
                           None if boundaries is None else tuple(boundaries))

    @property
    def pad_to_steps(self) -> Optional[int]:
        """The cap widths are rounded up to steps within, or None (each
        batch as wide as its longest document)."""
        return self.max_seq_length if self.step_padding else None


class BatchByLength(beam.DoFn):
    """Groups documents of similar token length into bounded batches.

    Sorting happens within a window of ``sort_window`` documents of one
    bundle; what is left at the end of a bundle is flushed then.  With
    ``bucket_boundaries`` no batch mixes length buckets (see
    ``cut_batches``); with step padding the budget counts widths rounded to
    length steps, as the model handler then pads them.
    """

    def __init__(self, settings: BatchSettings = BatchSettings()):
        self._settings = settings
        self._window = max(settings.sort_window, settings.batch_size)
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
        s = self._settings
        batches = cut_batches(self._buffer, s.batch_size,
                              s.max_tokens_per_batch, s.bucket_boundaries,
                              s.pad_to_steps)
        self._buffer = []
        return batches
