"""The inference step runs one batch ahead (``transforms.infer._InferAhead``):
the model computes batch N on a background thread while batch N-1's
results are emitted; every batch comes out once, as embeddings or as a
failure; the last comes out at the end of the bundle, in its window; the
model is loaded once per process."""

from __future__ import annotations

import pickle
import threading

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.transforms.window import GlobalWindow, IntervalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms.infer import _InferAhead
from transforms.records import TokenizedDocument

LOADS = []


class FakeHandler:
    """Records what happens, in order, and on which thread."""

    def __init__(self, fail_call=(), fail_pad=()):
        self.events: list[tuple] = []
        self.fail_call, self.fail_pad = set(fail_call), set(fail_pad)

    def get_metrics_namespace(self):
        return "test"

    def load_model(self):
        LOADS.append(1)
        return "model"

    def pad(self, batch):
        name = batch[0].id
        self.events.append(("pad", name))
        if name in self.fail_pad:
            raise ValueError(f"cannot pad {name}")
        return (name,)

    def call(self, model, inputs):
        (name,) = inputs
        self.events.append(("call", name, threading.get_ident()))
        if name in self.fail_call:
            raise RuntimeError(f"model failed on {name}")
        return (f"out-{name}",)

    def predictions(self, batch, inputs, outputs):
        self.events.append(("predictions", batch[0].id))
        return [(doc.id, outputs[0]) for doc in batch]


def _batch(name: str, size: int = 2):
    return [TokenizedDocument(f"{name}" if i == 0 else f"{name}.{i}",
                              np.array([101, 102], np.int32), False)
            for i in range(size)]


def _run(fn, batches, window=GlobalWindow(), timestamp=Timestamp(0)):
    """Drives ``fn`` through one bundle; returns (main, failed, finish)."""
    fn.setup()
    fn.start_bundle()
    emitted = []
    for batch in batches:
        emitted += list(fn.process(batch, window, timestamp))
    finish = list(fn.finish_bundle() or [])
    fn.teardown()
    main = [o for o in emitted if not isinstance(o, beam.pvalue.TaggedOutput)]
    failed = [o.value for o in emitted
              if isinstance(o, beam.pvalue.TaggedOutput)]
    return main, failed, finish


def test_the_model_runs_ahead_on_another_thread():
    handler = FakeHandler()
    main, failed, finish = _run(_InferAhead(handler),
                                [_batch("a"), _batch("b"), _batch("c")])
    events = handler.events
    # Batch b was handed to the model before a's results were made.
    assert events.index(("pad", "b")) < events.index(("predictions", "a"))
    assert events.index(("pad", "c")) < events.index(("predictions", "b"))
    calls = [e for e in events if e[0] == "call"]
    assert [c[1] for c in calls] == ["a", "b", "c"]
    assert {c[2] for c in calls} != {threading.get_ident()}
    # Every document once: a and b while processing, c at the end.
    assert main == [("a", "out-a"), ("a.1", "out-a"),
                    ("b", "out-b"), ("b.1", "out-b")]
    assert not failed
    assert [w.value for w in finish] == [("c", "out-c"), ("c.1", "out-c")]


def test_the_last_batch_keeps_its_window_and_timestamp():
    window = IntervalWindow(10, 20)
    _, _, finish = _run(_InferAhead(FakeHandler()), [_batch("a")],
                        window=window, timestamp=Timestamp(15))
    assert finish and all(isinstance(w, WindowedValue) for w in finish)
    assert {(w.timestamp, tuple(w.windows)) for w in finish} == {
        (Timestamp(15), (window,))}


@pytest.mark.parametrize("where", ["call", "pad"])
@pytest.mark.parametrize("failing", ["a", "b"])
def test_a_failed_batch_is_reported_once_and_the_others_go_on(where,
                                                               failing):
    handler = FakeHandler(**{f"fail_{where}": [failing]})
    main, failed, finish = _run(_InferAhead(handler),
                                [_batch("a"), _batch("b")])
    outputs = main + [w.value for w in finish
                      if not isinstance(w, beam.pvalue.TaggedOutput)]
    failed += [w.value.value for w in finish
               if isinstance(w, beam.pvalue.TaggedOutput)]
    other = "b" if failing == "a" else "a"
    assert sorted(doc for doc, _ in outputs) == [other, f"{other}.1"]
    (batch, error), = failed
    assert [d.id for d in batch] == [failing, f"{failing}.1"]
    assert isinstance(error, (RuntimeError, ValueError))
    assert failing in str(error)


def test_the_model_is_loaded_once_per_process():
    """Copies of the step (as Beam deserializes one per thread) share the
    loaded model."""
    LOADS.clear()
    fn = _InferAhead(FakeHandler())
    copies = [pickle.loads(pickle.dumps(fn)) for _ in range(3)]
    for copy in copies:
        copy.setup()
    assert len(LOADS) == 1
    assert all(c._model == "model" for c in copies)
    for copy in copies:
        copy.teardown()


def test_a_pipeline_counts_every_document(tiny_model_dir, small_vocab):
    """Through Beam: 7 documents in batches of 2, all embedded, the model
    loaded once and timed per call."""
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.testing.util import assert_that, equal_to

    from transforms.batch import BatchSettings
    from transforms.infer import (BertModelHandler, EmbedDocuments,
                                  InferSettings)
    vocab_size = len(small_vocab)
    docs = [TokenizedDocument(f"d{i}", np.array(
        [101] + [104 + (i * 7 + j) % (vocab_size - 104) for j in range(i + 1)]
        + [102], np.int32), False) for i in range(7)]
    batching = BatchSettings(max_seq_length=32, batch_size=2)
    handler = BertModelHandler(InferSettings(tiny_model_dir), batching)
    pipeline = beam.Pipeline()
    embeddings, dead = (pipeline | beam.Create(docs)
                        | EmbedDocuments(handler, batching))
    assert_that(embeddings | beam.Map(lambda e: (e.id, e.num_tokens,
                                                 e.sequence_output.shape)),
                equal_to([(d.id, d.num_tokens, (d.num_tokens, 32))
                          for d in docs]), label="all")
    assert_that(dead, equal_to([]), label="none dead")
    result = pipeline.run()
    result.wait_until_finish()
    dists = {d.key.metric.name: d.committed for d in
             result.metrics().query(MetricsFilter())["distributions"]}
    assert dists["load_model_latency_milli_secs"].count == 1
    assert dists["inference_batch_latency_micro_secs"].count == 4
