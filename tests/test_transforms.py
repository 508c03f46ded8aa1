"""Unit tests of the pieces between the stages: padding, Arrow/Example
conversion and reading back, input format detection, dead-letter records."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.read_embeddings import load_embeddings
from transforms.batch import BatchSettings
from transforms.infer import InferSettings, pad_batch
from transforms.read import detect_format, get_field
from transforms.records import DeadLetter, DocumentEmbedding, TokenizedDocument
from transforms.embedding_files import (dead_letter_line, embedding_schema,
                                        to_record_batch, to_tf_example)


def _doc(doc_id: str, ids: list[int]) -> TokenizedDocument:
    return TokenizedDocument(doc_id, np.array(ids, np.int32), False)


def test_pad_batch_pads_to_the_longest_document_only():
    ids, mask, segments = pad_batch([_doc("a", [101, 5, 102]),
                                     _doc("b", [101, 7, 8, 9, 102])])
    np.testing.assert_array_equal(ids, [[101, 5, 102, 0, 0],
                                        [101, 7, 8, 9, 102]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert not segments.any()
    assert ids.dtype == mask.dtype == segments.dtype == np.int32


def test_pad_batch_rounds_the_width_to_a_step_when_asked():
    ids, mask, _ = pad_batch([_doc("a", [101, 5, 102]),
                              _doc("b", [101, 7, 8, 9, 102])],
                             pad_to_steps=128)
    assert ids.shape == mask.shape == (2, 8)
    np.testing.assert_array_equal(ids[1], [101, 7, 8, 9, 102, 0, 0, 0])
    np.testing.assert_array_equal(mask.sum(axis=1), [3, 5])


def test_batches_pad_to_steps_only_under_xla():
    def pad_to(**infer: object) -> object:
        """The width cap batches of a run with these settings pad to, as
        the launcher composes them (step padding where XLA applies)."""
        return BatchSettings(max_seq_length=64, step_padding=InferSettings(
            "/m", **infer).xla).pad_to_steps
    assert pad_to(jit_compile=True) == 64
    assert pad_to() is None
    # bfloat16 on TensorFlow: GPU workers compile the re-trace.
    assert pad_to(precision="bfloat16", jit_compile=True) == 64
    assert pad_to(precision="bfloat16") is None
    assert pad_to(engine="openvino", jit_compile=True) is None
    assert pad_to(precision="int8", jit_compile=True) is None


def test_model_handler_rejects_unknown_outputs():
    with pytest.raises(ValueError, match="outputs"):
        InferSettings("/nowhere", outputs=("cls",))
    with pytest.raises(ValueError, match="outputs"):
        InferSettings("/nowhere", outputs=())


def _rows(hidden: int = 4) -> list[DocumentEmbedding]:
    rng = np.random.default_rng(0)
    rows = []
    for i, n in enumerate([3, 1, 7]):
        rows.append(DocumentEmbedding(
            f"id-{i}", n, i == 2,
            rng.standard_normal(hidden).astype(np.float32),
            rng.standard_normal((n, hidden)).astype(np.float32)))
    return rows


def _assert_same(loaded, rows) -> None:
    assert loaded.ids == [r.id for r in rows]
    np.testing.assert_array_equal(loaded.num_tokens,
                                  [r.num_tokens for r in rows])
    np.testing.assert_array_equal(loaded.truncated,
                                  [r.truncated for r in rows])
    np.testing.assert_array_equal(loaded.pooled_output,
                                  np.stack([r.pooled_output for r in rows]))
    for got, row in zip(loaded.sequence_output, rows):
        np.testing.assert_array_equal(got, row.sequence_output)


def test_parquet_round_trip(tmp_path):
    rows = _rows()
    batch = to_record_batch(rows, embedding_schema(4))
    pq.write_table(pa.Table.from_batches([batch]),
                   tmp_path / "e-00000-of-00001.parquet")
    _assert_same(load_embeddings(str(tmp_path / "e-*.parquet")), rows)


def test_tfrecord_round_trip(tmp_path):
    import tensorflow as tf
    rows = _rows()
    with tf.io.TFRecordWriter(str(tmp_path / "e.tfrecord")) as writer:
        for row in rows:
            writer.write(to_tf_example(row))
    _assert_same(load_embeddings(str(tmp_path / "*.tfrecord")), rows)


def test_pooled_only_schema_has_no_sequence_column(tmp_path):
    rows = [DocumentEmbedding(r.id, r.num_tokens, r.truncated,
                              r.pooled_output, None) for r in _rows()]
    schema = embedding_schema(4, pooled=True, sequence=False)
    batch = to_record_batch(rows, schema)
    assert batch.schema.names == ["id", "num_tokens", "truncated",
                                  "content_hash", "model_fingerprint",
                                  "pooled_output"]


def test_reader_refuses_mixed_or_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_embeddings(str(tmp_path / "none-*.parquet"))
    (tmp_path / "a.parquet").write_bytes(b"")
    (tmp_path / "a.tfrecord").write_bytes(b"")
    with pytest.raises(ValueError, match="not all"):
        load_embeddings(str(tmp_path / "a.*"))


@pytest.mark.parametrize("path, fmt, expected", [
    ("x/news.jsonl", "auto", "jsonl"),
    ("x/news.jsonl.gz", "auto", "jsonl"),
    ("gs://b/x.ndjson", "auto", "jsonl"),
    ("x/lines.txt", "auto", "text"),
    ("x/lines.txt.bz2", "auto", "text"),
    ("x/lines.txt", "jsonl", "jsonl"),
])
def test_detect_format(path, fmt, expected):
    assert detect_format(path, fmt) == expected


def test_get_field_follows_dots():
    record = {"meta": {"id": 7}, "body": "文本"}
    assert get_field(record, "meta.id") == 7
    assert get_field(record, "body") == "文本"
    with pytest.raises(KeyError):
        get_field(record, "meta.missing")
    with pytest.raises(KeyError):
        get_field(record, "body.text")


def test_dead_letter_json_escapes_control_characters_and_cuts_excerpt():
    letter = DeadLetter("read", "bad", "f.jsonl", 3, "x", "坏\x00" + "字" * 500)
    record = json.loads(dead_letter_line(letter))
    assert record["excerpt"].startswith("坏\\x00字")
    assert record["excerpt"].endswith("…")
    assert len(record["excerpt"]) < 220
    assert (record["stage"], record["line"], record["id"]) == ("read", 3, "x")
