"""Tokenizing: ``Document`` in, ``TokenizedDocument`` out.

The DoFn applies BERT's WordPiece rules (``transforms.tokenization``) with the
vocabulary and ``do_lower_case`` of the model the run uses.  Documents with
no tokens (empty or whitespace-only lines) are counted and left out.  A
document longer than ``max_seq_length`` is either truncated and flagged
(``truncate``), or cut into overlapping windows that are all embedded
(``chunk``), so that nothing of a long text is silently dropped.  Each
output carries the document's content hash, and its text when the run
writes a ``text`` column (on the first chunk only, to keep long documents
from repeating it on every chunk row).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np

from transforms.records import (DEAD_LETTER_TAG, METRICS_NAMESPACE,
                                DeadLetter, Document, TokenizedDocument)
from transforms.tokenization import BertWordPieceTokenizer

LONG_TEXT_MODES = ("truncate", "chunk")

# Upper bound on wordpieces kept per document in chunk mode: a runaway
# "document" (a whole book on one line) becomes a dead letter instead of
# thousands of chunks.
MAX_CHUNKS_PER_DOCUMENT = 1000

# The shortest max_seq_length: [CLS], one token, [SEP].
MIN_SEQ_LENGTH = 3


def validate_max_seq_length(max_seq_length: int) -> int:
    """``max_seq_length`` once it can hold ``[CLS]``, one token and
    ``[SEP]``; else ``ValueError`` (one line).

    The one place the rule and its minimum live: ``TokenizeSettings`` calls
    it, and every launcher (``pipeline.run``, ``pipeline.analyze``,
    ``pipeline.embed``) reaches it through that class or directly, so that
    the other stages receive a value already checked.
    """
    if max_seq_length < MIN_SEQ_LENGTH:
        raise ValueError(f"max_seq_length must be at least {MIN_SEQ_LENGTH}"
                         " ([CLS], one token, [SEP])")
    return max_seq_length


def chunk_spans(num_pieces: int, window: int, stride: int
                ) -> list[tuple[int, int]]:
    """``[start, end)`` wordpiece spans covering ``num_pieces`` pieces.

    Windows hold ``window`` pieces and start ``stride`` pieces apart
    (``stride < window`` overlaps them); the last window ends at the last
    piece, so every piece is in at least one chunk.
    """
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got stride={stride}, "
                         f"window={window}")
    spans = []
    start = 0
    while True:
        spans.append((start, min(start + window, num_pieces)))
        if start + window >= num_pieces:
            return spans
        start += stride


@dataclasses.dataclass(frozen=True)
class TokenizeSettings:
    """How documents become model inputs (``--max_seq_length``,
    ``--long_text``, ``--chunk_stride``, and ``--write_text``, which keeps
    each first chunk's text); checked once, here.

    ``chunk_stride`` None (or 0) means windows that do not overlap.
    """
    max_seq_length: int = 128
    long_text: str = "truncate"
    chunk_stride: Optional[int] = None
    write_text: bool = False

    def __post_init__(self) -> None:
        validate_max_seq_length(self.max_seq_length)
        if self.long_text not in LONG_TEXT_MODES:
            raise ValueError(f"long_text must be one of {LONG_TEXT_MODES}")
        if self.chunk_stride is not None and self.chunk_stride < 0:
            raise ValueError("chunk_stride must be positive")
        if self.chunk_stride and self.chunk_stride > self.window:
            raise ValueError("chunk_stride must be at most max_seq_length - 2"
                             " (chunks must not skip tokens)")

    @property
    def window(self) -> int:
        """Wordpieces per document or chunk (``[CLS]`` and ``[SEP]`` take
        the other two places)."""
        return self.max_seq_length - 2

    @property
    def stride(self) -> int:
        """Wordpieces between the starts of two chunks."""
        return self.chunk_stride or self.window

    @property
    def chunked(self) -> bool:
        return self.long_text == "chunk"

    @property
    def effective_stride(self) -> Optional[int]:
        """The chunk stride the model fingerprint counts (None unless
        chunking)."""
        return self.stride if self.chunked else None


class TokenizeDocuments(beam.DoFn):
    """Encodes each document as ``[CLS] wordpieces [SEP]`` token ids.

    ``vocab`` and ``do_lower_case`` are the model's (as the launcher
    resolves them); ``settings`` the run's.  The tokenizer is built in
    ``setup`` from the vocabulary passed in, so it exists once per DoFn
    instance and its caches warm up across bundles.  A document it cannot
    encode is a ``DeadLetter`` tagged ``DEAD_LETTER_TAG``:
    ``WithDeadLetters`` applies it as ``(tokens, dead_letters)``.
    """

    def __init__(self, vocab: Sequence[str], do_lower_case: bool,
                 settings: TokenizeSettings = TokenizeSettings()):
        self._vocab = list(vocab)
        self._do_lower_case = do_lower_case
        self._max_seq_length = settings.max_seq_length
        self._window = settings.window
        self._stride = settings.stride
        self._chunk = settings.chunked
        self._write_text = settings.write_text
        self._tokenizer: BertWordPieceTokenizer | None = None
        counter = beam.metrics.Metrics.counter
        self._skipped = counter(METRICS_NAMESPACE, "documents_skipped_empty")
        self._chunked = counter(METRICS_NAMESPACE, "documents_chunked")
        self._chunks = counter(METRICS_NAMESPACE, "chunks")
        self._failed = counter(METRICS_NAMESPACE, "documents_failed")

    def setup(self) -> None:
        self._tokenizer = BertWordPieceTokenizer(
            self._vocab, do_lower_case=self._do_lower_case)

    def process(self, doc: Document) -> Iterator[Any]:
        assert self._tokenizer is not None, "setup() was not called"
        try:
            pieces = self._encode(doc)
        except Exception as err:  # a bad document must not stop the run
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(
                DEAD_LETTER_TAG, DeadLetter.of_document(
                    "tokenize", f"{type(err).__name__}: {err}", doc,
                    doc.text))
            return
        if pieces is None:
            self._skipped.inc()
            return
        yield from pieces

    def _encode(self, doc: Document) -> Optional[list[TokenizedDocument]]:
        """The document's model inputs, or ``None`` when it has no tokens."""
        if not self._chunk:
            encoded = self._tokenizer.encode(doc.text, self._max_seq_length)
            if encoded.num_wordpieces == 0:
                return None
            return [TokenizedDocument(
                doc.id, np.asarray(encoded.input_word_ids, np.int32),
                encoded.truncated, doc.id, content_hash=doc.content_hash,
                text=self._text_of(doc, 0), source=doc.source,
                line=doc.line)]
        return self._chunks_of(doc)

    def _chunks_of(self, doc: Document) -> Optional[list[TokenizedDocument]]:
        limit = self._window * MAX_CHUNKS_PER_DOCUMENT + 2
        encoded = self._tokenizer.encode(doc.text, limit)
        if encoded.num_wordpieces == 0:
            return None
        if encoded.truncated:
            raise ValueError(f"document has {encoded.num_wordpieces} "
                             f"wordpieces, more than {limit - 2} "
                             f"({MAX_CHUNKS_PER_DOCUMENT} chunks)")
        ids = np.asarray(encoded.input_word_ids, np.int32)
        cls_id, pieces, sep_id = ids[:1], ids[1:-1], ids[-1:]
        spans = chunk_spans(len(pieces), self._window, self._stride)
        if len(spans) > 1:
            self._chunked.inc()
        self._chunks.inc(len(spans))
        return [TokenizedDocument(
            f"{doc.id}#{index}",
            np.concatenate([cls_id, pieces[start:end], sep_id]), False,
            doc.id, index, len(spans), doc.content_hash,
            self._text_of(doc, index), doc.source, doc.line)
            for index, (start, end) in enumerate(spans)]

    def _text_of(self, doc: Document, chunk_index: int) -> Optional[str]:
        """The text for the row's ``text`` column: on the first chunk, and
        only when the run writes one."""
        return doc.text if self._write_text and chunk_index == 0 else None
