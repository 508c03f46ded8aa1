"""Inference: batches of ``TokenizedDocument`` in, ``DocumentEmbedding`` out.

Built on Beam's RunInference: ``BertModelHandler`` tells it how to load the
SavedModel (once per worker process, through RunInference's ``Shared``
handle) and how to run one batch.  Batches come from ``BatchByLength``
(documents of similar length together), each is padded only to its own
longest document (rounded up to a length step when the model runs under
XLA, so that few shapes are compiled), and padding is cut off again before
the results leave the handler, so ``sequence_output`` holds real tokens
only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import (ModelHandler, PredictionResult,
                                           RunInference)

from model.engines import (OPENVINO, PRECISIONS, TENSORFLOW, EngineSpec,
                           load_engine, xla_applies)
from model.load import BertSavedModel
from transforms.batch import BatchByLength, BatchSettings, batch_width
from transforms.pooling import check_pooling, needs_layers, pool
from transforms.records import (METRICS_NAMESPACE, DeadLetter,
                                DocumentEmbedding, TokenizedDocument)

OUTPUT_KINDS = ("pooled", "sequence")

# Longest dead-letter reason kept for a failed model call.
REASON_CHARS = 300


def pad_batch(docs: Sequence[TokenizedDocument],
              pad_to_steps: Optional[int] = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``input_word_ids``, ``input_mask``, ``segment_ids`` for a batch.

    All three are int32 ``[batch, width]``: ids zero-padded (``[PAD]`` is
    id 0), mask one on real tokens, segments all zero (one-sentence input).
    The width is the longest document, rounded up to a length step when
    ``pad_to_steps`` is set (see ``transforms.batch.batch_width``).
    """
    lengths = np.fromiter((d.num_tokens for d in docs), dtype=np.int64,
                          count=len(docs))
    width = batch_width(lengths.tolist(), pad_to_steps)
    ids = np.zeros((len(docs), width), dtype=np.int32)
    for row, doc in enumerate(docs):
        ids[row, :doc.num_tokens] = doc.input_word_ids
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
    return ids, mask, np.zeros_like(ids)


def check_precision(precision: str) -> str:
    """``precision`` once it names one (``auto``, ``float32``,
    ``bfloat16``, ``int8``: see ``model.engines``); else ``ValueError``.

    The one place a run's precision is checked: ``InferSettings`` calls it,
    and the launchers reach it through that class."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    return precision


@dataclasses.dataclass(frozen=True)
class InferSettings:
    """How the model runs (``--model``, ``--outputs``, ``--engine``,
    ``--precision``, ``--int8_model``, ``--pooling``, ``--normalize``, the
    TensorFlow thread pools, and XLA as the launcher decides it); checked
    once, here.

    ``outputs`` picks which embeddings each result keeps (``pooled``,
    ``sequence``).  ``engine`` and ``precision`` (``auto`` or a name, see
    ``model.engines``) pick the engine each worker loads; ``int8_model`` is
    the quantized model for ``int8``.  ``jit_compile`` runs the TensorFlow
    engine through XLA where it applies (``xla``).  ``pooling`` and
    ``normalize`` say how the ``pooled`` vector is made from the model's
    outputs (``transforms.pooling``: ``cls`` keeps the model's
    ``pooled_output``).
    """
    model_dir: str
    outputs: Sequence[str] = OUTPUT_KINDS
    precision: str = "float32"
    engine: str = TENSORFLOW
    int8_model: Optional[str] = None
    pooling: str = "cls"
    normalize: bool = False
    jit_compile: bool = False
    intra_op_threads: Optional[int] = None
    inter_op_threads: Optional[int] = None

    def __post_init__(self) -> None:
        unknown = set(self.outputs) - set(OUTPUT_KINDS)
        if unknown or not self.outputs:
            raise ValueError(f"outputs must be a non-empty subset of "
                             f"{OUTPUT_KINDS}, got {list(self.outputs)}")
        object.__setattr__(self, "outputs", tuple(self.outputs))
        check_precision(self.precision)
        check_pooling(self.pooling)
        # Per-layer outputs come from the TensorFlow wrapper only.
        if needs_layers(self.pooling) and self.engine == OPENVINO:
            raise ValueError(f"pooling {self.pooling} needs the model's "
                             "encoder_outputs, which only the "
                             "tensorflow engine returns")

    @property
    def xla(self) -> bool:
        """Whether a worker may run the model through XLA (TensorFlow at
        float32, or at bfloat16 on GPUs: ``model.engines.xla_applies``);
        batches are then padded to length steps
        (``BatchSettings.step_padding``)."""
        return xla_applies(self.jit_compile, self.precision, self.engine)


class BertModelHandler(ModelHandler[TokenizedDocument, PredictionResult,
                                    BertSavedModel]):
    """RunInference handler for a TF Hub–style BERT SavedModel.

    ``settings`` say how the model runs (``InferSettings``); ``batching``
    how wide each batch is padded (``BatchSettings``, whose widths the
    batcher counts) and the ``max_seq_length`` no batch exceeds.  Of the
    model's outputs only ``settings.outputs`` are kept, the other dropped
    right after the model call so it does not travel through the rest of
    the pipeline.  Each result also carries the document's row metadata
    (chunk fields, content hash, text when the run writes it), so no join
    of the large embedding rows with the documents is needed after
    inference.  OpenVINO runs each batch at its own width.
    """

    def __init__(self, settings: InferSettings,
                 batching: BatchSettings = BatchSettings()):
        super().__init__()
        self._settings = settings
        self._batching = batching
        # Padded tokens the model computed (batch x longest): with
        # tokens_embedded it gives the share of compute spent on padding.
        self._computed = beam.metrics.Metrics.counter(
            METRICS_NAMESPACE, "tokens_computed")
        self._keep_pooled = "pooled" in settings.outputs
        self._keep_sequence = "sequence" in settings.outputs
        # Per-layer outputs come from the TensorFlow wrapper only.
        engine = (TENSORFLOW if needs_layers(settings.pooling)
                  else settings.engine)
        self._spec = EngineSpec(
            settings.model_dir, engine, settings.precision,
            settings.intra_op_threads, settings.inter_op_threads,
            settings.xla, settings.int8_model)

    def load_model(self) -> BertSavedModel:
        """This worker's engine for the job's model (see
        ``model.engines.load_engine``); raises ``ValueError`` when
        ``max_seq_length`` exceeds the model's position table (the launcher
        checks this first; this guards graphs built without it), since
        every longer batch would fail."""
        model = load_engine(self._spec)
        positions = model.limits.max_positions
        longest = self._batching.max_seq_length
        if positions is not None and longest > positions:
            raise ValueError(
                f"max_seq_length {longest} exceeds the model's "
                f"{positions} positions ({model.model_dir})")
        return model

    def run_inference(self, batch: Sequence[TokenizedDocument],
                      model: BertSavedModel,
                      inference_args: Optional[dict[str, Any]] = None
                      ) -> Iterable[PredictionResult]:
        ids, mask, segments = pad_batch(batch, self._batching.pad_to_steps)
        layers = None
        pooling = self._settings.pooling
        if needs_layers(pooling):
            pooled, sequence, layers = model.call_with_layers(
                ids, mask, segments)
        else:
            pooled, sequence = model(ids, mask, segments)
        if self._keep_pooled:
            pooled = pool(pooling, pooled, sequence, mask, layers,
                          self._settings.normalize)
        self._computed.inc(ids.size)
        for row, doc in enumerate(batch):
            yield PredictionResult(doc, DocumentEmbedding(
                doc.id, doc.num_tokens, doc.truncated,
                pooled[row] if self._keep_pooled else None,
                sequence[row, :doc.num_tokens]
                if self._keep_sequence else None,
                doc.doc_id, doc.chunk_index, doc.num_chunks,
                doc.content_hash, doc.text))

    def get_num_bytes(self, batch: Sequence[TokenizedDocument]) -> int:
        return sum(d.input_word_ids.nbytes for d in batch)

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE


class _CountEmbedded(beam.DoFn):
    """Unwraps RunInference results and counts documents and tokens.

    A chunked document counts as embedded with its first chunk, so that
    every document read is counted once; its other chunks count as chunks.
    Truncated documents are counted here, once embedded, so that a document
    whose batch failed is counted as failed only.
    """

    def __init__(self) -> None:
        counter = beam.metrics.Metrics.counter
        self._embedded = counter(METRICS_NAMESPACE, "documents_embedded")
        self._truncated = counter(METRICS_NAMESPACE, "documents_truncated")
        self._chunks = counter(METRICS_NAMESPACE, "chunks_embedded")
        self._tokens = counter(METRICS_NAMESPACE, "tokens_embedded")

    def process(self, result: PredictionResult) -> Iterator[DocumentEmbedding]:
        embedding: DocumentEmbedding = result.inference
        if embedding.chunk_index == 0:
            self._embedded.inc()
        if embedding.truncated:
            self._truncated.inc()
        self._chunks.inc()
        self._tokens.inc(embedding.num_tokens)
        yield embedding


def failure_reason(error: Any, limit: int = REASON_CHARS) -> str:
    """``ExceptionType: message`` on one line of at most ``limit``
    characters, from what Beam's exception handling pairs with a failed
    batch: ``(type, repr, formatted traceback lines)``, or an exception.

    The message is ``str(exception)``, which Beam does not keep but its
    traceback's last line shows; the repr stands in when that is missing.
    """
    if isinstance(error, BaseException):
        kind, message = type(error), str(error)
    else:
        kind, message = error[0], _traceback_message(error[0], error[2])
        if message is None:
            message = str(error[1])
    text = f"{kind.__name__}: {message}" if message.strip() else kind.__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _traceback_message(kind: type, lines: Sequence[str]) -> Optional[str]:
    """The message of the last ``kind`` exception in a formatted traceback
    (``module.Type: message``), or None when there is none."""
    name = kind.__qualname__
    if kind.__module__ not in ("builtins", "__main__"):
        name = f"{kind.__module__}.{name}"
    for entry in reversed(list(lines)):
        if entry.startswith(name + ": "):
            return entry[len(name) + 2:]
        if entry.rstrip("\n") == name:
            return ""
    return None


class _FailedBatchToDeadLetters(beam.DoFn):
    """One ``DeadLetter`` per document (or chunk) of a batch whose inference
    raised, with the document's source and line and the exception in one
    line (``failure_reason``); counted like ``_CountEmbedded`` counts
    successes."""

    def __init__(self) -> None:
        counter = beam.metrics.Metrics.counter
        self._failed = counter(METRICS_NAMESPACE, "documents_failed")
        self._chunks = counter(METRICS_NAMESPACE, "chunks_failed")

    def process(self, failure: tuple[Sequence[TokenizedDocument], Any]
                ) -> Iterator[DeadLetter]:
        batch, error = failure
        reason = failure_reason(error)
        for doc in batch:
            if doc.chunk_index == 0:
                self._failed.inc()
            self._chunks.inc()
            yield DeadLetter.of_document("infer", reason, doc)


class EmbedDocuments(beam.PTransform):
    """Batches tokenized documents by length and embeds them with BERT.

    Returns ``(embeddings, dead_letters)``: a batch whose model call raises
    is not retried forever; its documents become dead letters and the run
    goes on.
    """

    def __init__(self, model_handler: BertModelHandler,
                 batching: BatchSettings):
        super().__init__()
        self._handler = model_handler
        self._batching = BatchByLength(batching)

    def expand(self, docs: beam.PCollection) -> tuple[Any, Any]:
        results, failures = (
            docs
            | "BatchByLength" >> beam.ParDo(self._batching)
            | "RunInference" >> RunInference(
                self._handler.with_no_batching()).with_exception_handling())
        embeddings = results | "CountEmbedded" >> beam.ParDo(_CountEmbedded())
        dead = (failures.failed_inferences
                | "FailedBatches" >> beam.ParDo(_FailedBatchToDeadLetters()))
        return embeddings, dead
