"""Element types that flow between the pipeline's stages.

read -> ``Document`` -> tokenize -> ``TokenizedDocument`` -> infer ->
``DocumentEmbedding`` -> write.  Anything that cannot go on becomes a
``DeadLetter`` that names the stage, the source and the reason, so that no
input document is ever dropped without a trace.  Every stage that makes
dead letters returns ``(main, dead_letters)`` (``WithDeadLetters`` for a
DoFn that tags them ``DEAD_LETTER_TAG``), and ``pipeline.graph`` writes
them all to one errors file set (``transforms.embedding_files``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import apache_beam as beam
import numpy as np

# Beam metrics namespace shared by every stage's counters.
METRICS_NAMESPACE = "bert_zh_embed"

# How many characters of a bad record are kept in its dead-letter entry.
EXCERPT_CHARS = 200

# The output a DoFn tags its ``DeadLetter`` elements with.
DEAD_LETTER_TAG = "dead_letter"


@dataclasses.dataclass(frozen=True)
class Document:
    """One input document: its id, its text and where it came from.

    ``content_hash`` identifies the text (``transforms.identity``): the
    incremental join and ``--dedup`` compare it instead of the text.
    ``nbytes`` is the share of the input file this document consumed, for
    progress and ETA reporting.
    """
    id: str
    text: str
    source: str = ""
    line: int = 0
    content_hash: str = ""
    nbytes: int = 0


@dataclasses.dataclass(frozen=True)
class TokenizedDocument:
    """A document (or one chunk of it) as the model takes it: ``[CLS] ...
    [SEP]`` ids, unpadded.

    With ``--long_text chunk`` a long document becomes several of these:
    ``id`` is ``<doc_id>#<chunk_index>`` and ``num_chunks`` says how many.
    """
    id: str
    input_word_ids: np.ndarray  # int32 [num_tokens]
    truncated: bool
    doc_id: str = ""
    chunk_index: int = 0
    num_chunks: int = 1
    # Carried to the output row (see ``BertModelHandler``): the document's
    # content hash, and its text when the run writes a ``text`` column.
    content_hash: str = ""
    text: Optional[str] = None
    # Where the document was read, for a dead letter if inference fails.
    source: str = ""
    line: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.input_word_ids.shape[0])


@dataclasses.dataclass(frozen=True)
class DocumentEmbedding:
    """The model's outputs for one document, without padding rows.

    ``sequence_output`` holds one row per real token (``num_tokens`` rows, the
    ``[CLS]`` and ``[SEP]`` rows included); either output may be ``None`` when
    the run was asked not to keep it.
    """
    id: str
    num_tokens: int
    truncated: bool
    pooled_output: Optional[np.ndarray]  # float32 [hidden]
    sequence_output: Optional[np.ndarray]  # float32 [num_tokens, hidden]
    doc_id: str = ""
    chunk_index: int = 0
    num_chunks: int = 1
    content_hash: str = ""
    text: Optional[str] = None

    @property
    def document_id(self) -> str:
        """The id of the document this row belongs to (chunks share it)."""
        return self.doc_id or self.id


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A document (or raw record) that could not be embedded, and why."""
    stage: str
    reason: str
    source: str = ""
    line: int = 0
    id: str = ""
    excerpt: str = ""

    @classmethod
    def of_document(cls, stage: str, reason: str, doc: Any,
                    excerpt: str = "") -> "DeadLetter":
        """The dead letter of a document (``Document``, or a
        ``TokenizedDocument`` chunk) that ``stage`` could not process:
        its source, line and id come with it."""
        return cls(stage, reason, doc.source, doc.line, doc.id, excerpt)


class WithDeadLetters(beam.PTransform):
    """Applies a DoFn that tags its ``DeadLetter`` elements
    ``DEAD_LETTER_TAG``; returns ``(main, dead_letters)``, the shape of
    every stage that makes dead letters."""

    def __init__(self, dofn: beam.DoFn):
        super().__init__()
        self._dofn = dofn

    def expand(self, pcoll: beam.PCollection) -> tuple[Any, Any]:
        outputs = pcoll | beam.ParDo(self._dofn).with_outputs(
            DEAD_LETTER_TAG, main="main")
        return outputs.main, outputs[DEAD_LETTER_TAG]


def safe_excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """The start of ``text`` with control characters escaped, for error logs.

    Unpaired surrogates (a JSON ``"\\udc80"`` escape decodes to one) are
    escaped too, so the excerpt is always valid UTF-8.
    """
    head = text[:limit]
    cleaned = "".join(
        ch if ch.isprintable() or ch == " " else repr(ch)[1:-1]
        for ch in head)
    return cleaned + ("…" if len(text) > limit else "")
