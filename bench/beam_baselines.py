"""The two Beam pipelines that ``bench.throughput`` compares ours with.

1. baseline: what a Beam user writes first: ``RunInference`` with
   ``TFModelHandlerTensor``, inputs padded to ``max_seq_length``, default
   batching;
2. peer: the same ``RunInference`` with Beam's own length-aware batching
   (``batch_length_fn`` + ``batch_bucket_boundaries``, which Beam applies
   with ``max_batch_duration_secs``) and padding per batch.

Both read and tokenize with our transforms and write with our Parquet
writer, so that only batching and inference differ from our pipeline.  This
module is imported (not run as ``__main__``) so that Beam pickles its
classes by reference and ``COMPUTED_TOKENS`` is this process's counter.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _embedding_row(doc_id: str, pooled: Any, sequence: Any, length: int):
    """Our output row from a baseline prediction (padding rows cut)."""
    from transforms.records import DocumentEmbedding
    return DocumentEmbedding(doc_id, length, False, np.asarray(pooled),
                             np.asarray(sequence)[:length])


# Tokens the model calls computed (batch x width).  The DirectRunner runs
# these pipelines in this process; Beam metrics updated from the stateful
# batcher's timer callbacks were not all reported, so the bench counts here.
COMPUTED_TOKENS = [0]


class _CountingInference:
    """A RunInference ``inference_fn`` that pads per batch (or to a fixed
    width) and counts computed tokens."""

    def __init__(self, pad_to: int | None):
        self._pad_to = pad_to

    def __call__(self, model, batch: Sequence[Any], inference_args,
                 model_id=None):
        import tensorflow as tf
        from apache_beam.ml.inference.base import PredictionResult
        width = self._pad_to or max(int(t.shape[1]) for t in batch)
        stacked = tf.stack([tf.pad(t, [[0, 0], [0, width - t.shape[1]]])
                            for t in batch])
        pooled, sequence = model([stacked[:, 0], stacked[:, 1],
                                  stacked[:, 2]])
        COMPUTED_TOKENS[0] += int(stacked.shape[0]) * width
        lengths = tf.reduce_sum(stacked[:, 1], axis=1).numpy()
        return [PredictionResult(t, (pooled[i].numpy(),
                                     sequence[i].numpy(), int(lengths[i])))
                for i, t in enumerate(batch)]


def _saved_model_handler(model_dir: str, **kwargs):
    """``TFModelHandlerTensor`` whose loader restores a plain SavedModel.

    Beam's default loader is ``tf.keras.models.load_model``, which under
    Keras 3 no longer opens SavedModel directories; the obvious fix a user
    makes is to load with ``tf.saved_model.load``.
    """
    from apache_beam.ml.inference.tensorflow_inference import \
        TFModelHandlerTensor

    class SavedModelHandlerTensor(TFModelHandlerTensor):
        def load_model(self):
            import tensorflow as tf
            return tf.saved_model.load(model_dir)

    return SavedModelHandlerTensor(model_dir, **kwargs)


def _to_tensor(doc, pad_to: int | None):
    import tensorflow as tf
    ids = doc.input_word_ids
    width = pad_to or len(ids)
    stacked = np.zeros((3, width), np.int32)
    stacked[0, :len(ids)] = ids
    stacked[1, :len(ids)] = 1
    return doc.id, tf.constant(stacked)


def build_beam_variant(pipeline, variant: str, corpus: str, out: str,
                       model_dir: str, vocab: list[str], max_seq: int,
                       batch_size: int) -> None:
    """Baseline or peer pipeline: same read/tokenize/write as ours."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from transforms.read import ReadDocuments
    from transforms.tokenize import TokenizeDocuments, TokenizeSettings
    from transforms.write import WriteEmbeddings
    docs, _ = pipeline | ReadDocuments([corpus])
    tokens = docs | beam.ParDo(TokenizeDocuments(vocab, True,
                                                 TokenizeSettings(max_seq)))
    if variant == "baseline":
        pad_to, kwargs = max_seq, {}
    else:
        pad_to, kwargs = None, dict(
            max_batch_size=batch_size, max_batch_duration_secs=1,
            batch_length_fn=lambda kv: int(kv[1].shape[1]),
            batch_bucket_boundaries=[16, 32, 64, 128, 256, 512])
    handler = KeyedModelHandler(_saved_model_handler(
        model_dir, inference_fn=_CountingInference(pad_to), **kwargs))
    _ = (tokens
         | beam.Map(_to_tensor, pad_to)
         | RunInference(handler)
         | beam.MapTuple(lambda key, r: _embedding_row(key, *r.inference))
         | WriteEmbeddings(out, "parquet", 768, ("pooled", "sequence")))
