"""Tokenizing: ``Document`` in, ``TokenizedDocument`` out.

The DoFn applies BERT's WordPiece rules (``transforms.tokenization``) with the
vocabulary and ``do_lower_case`` of the model the run uses.  Documents with
no tokens (empty or whitespace-only lines) are counted and left out;
documents longer than ``max_seq_length`` are truncated and flagged.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import apache_beam as beam
import numpy as np

from transforms.records import (METRICS_NAMESPACE, DeadLetter, Document,
                                TokenizedDocument)
from transforms.tokenization import BertWordPieceTokenizer

DEAD_LETTER_TAG = "dead_letter"


class TokenizeDocuments(beam.DoFn):
    """Encodes each document as ``[CLS] wordpieces [SEP]`` token ids.

    The tokenizer is built in ``setup`` from the vocabulary passed in, so it
    exists once per DoFn instance and its caches warm up across bundles.
    """

    def __init__(self, vocab: Sequence[str], do_lower_case: bool,
                 max_seq_length: int):
        if max_seq_length < 2:
            raise ValueError("max_seq_length must be at least 2 "
                             "(room for [CLS] and [SEP])")
        self._vocab = list(vocab)
        self._do_lower_case = do_lower_case
        self._max_seq_length = max_seq_length
        self._tokenizer: BertWordPieceTokenizer | None = None
        counter = beam.metrics.Metrics.counter
        self._skipped = counter(METRICS_NAMESPACE, "documents_skipped_empty")
        self._truncated = counter(METRICS_NAMESPACE, "documents_truncated")
        self._failed = counter(METRICS_NAMESPACE, "documents_failed")

    def setup(self) -> None:
        self._tokenizer = BertWordPieceTokenizer(
            self._vocab, do_lower_case=self._do_lower_case)

    def process(self, doc: Document) -> Iterator[Any]:
        assert self._tokenizer is not None, "setup() was not called"
        try:
            encoded = self._tokenizer.encode(doc.text, self._max_seq_length)
        except Exception as err:  # a bad document must not stop the run
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, DeadLetter(
                "tokenize", f"{type(err).__name__}: {err}", doc.source,
                doc.line, doc.id, doc.text))
            return
        if encoded.num_wordpieces == 0:
            self._skipped.inc()
            return
        if encoded.truncated:
            self._truncated.inc()
        yield TokenizedDocument(
            doc.id, np.asarray(encoded.input_word_ids, dtype=np.int32),
            encoded.truncated)
