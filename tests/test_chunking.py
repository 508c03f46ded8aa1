"""``--long_text chunk``: every wordpiece of a long document is embedded, in
windows of ``max_seq_length`` with a stride, plus optional document vectors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from pipeline.read_embeddings import load_embeddings
from pipeline.run import main, run
from transforms.tokenization import BertWordPieceTokenizer
from transforms.tokenize import chunk_spans

MAX_SEQ = 12  # 10 wordpieces per chunk
LONG = "今天天气很好，我们去公园散步。这家酒店的服务非常好，房间干净。客服回复很及时，问题解决了。"
SHORT = "手机电池续航一般。"


@pytest.mark.parametrize("n, window, stride, expected", [
    (5, 10, 10, [(0, 5)]),
    (10, 10, 10, [(0, 10)]),
    (11, 10, 10, [(0, 10), (10, 11)]),
    (25, 10, 10, [(0, 10), (10, 20), (20, 25)]),
    (25, 10, 8, [(0, 10), (8, 18), (16, 25)]),
    (20, 10, 5, [(0, 10), (5, 15), (10, 20)]),
])
def test_chunk_spans(n, window, stride, expected):
    assert chunk_spans(n, window, stride) == expected


def test_chunk_spans_cover_every_piece():
    for n in range(1, 60):
        for stride in (1, 3, 7, 10):
            covered = set()
            for start, end in chunk_spans(n, 10, stride):
                assert end - start <= 10
                covered.update(range(start, end))
            assert covered == set(range(n))


def test_chunk_spans_reject_gaps():
    with pytest.raises(ValueError):
        chunk_spans(30, 10, 11)


@pytest.fixture(scope="module")
def chunked_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("chunk")
    corpus = root / "c.jsonl"
    corpus.write_text("".join(
        json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n"
        for i, t in [("long", LONG), ("short", SHORT), ("empty", "")]),
        encoding="utf-8")
    summary = run([
        "--input", str(corpus), "--output", str(root / "emb"),
        "--model", tiny_model_dir, "--max_seq_length", str(MAX_SEQ),
        "--long_text", "chunk", "--chunk_stride", "8",
        "--document_vectors", "--batch_size", "2",
        "--engine", "tensorflow", "--precision", "float32"])
    return summary, root


def test_chunks_cover_the_whole_document(chunked_run, tiny_model_dir,
                                         small_vocab):
    summary, root = chunked_run
    emb = load_embeddings(str(root / "emb-[0-9]*.parquet"))
    tokenizer = BertWordPieceTokenizer(small_vocab)
    pieces = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(LONG))
    spans = chunk_spans(len(pieces), MAX_SEQ - 2, 8)
    assert len(spans) >= 3
    long_rows = [i for i, d in enumerate(emb.doc_ids) if d == "long"]
    assert [emb.ids[i] for i in long_rows] == [
        f"long#{k}" for k in range(len(spans))]
    assert list(emb.chunk_index[long_rows]) == list(range(len(spans)))
    assert set(emb.num_chunks[long_rows]) == {len(spans)}
    assert not emb.truncated.any()
    model = tf.saved_model.load(tiny_model_dir)
    cls_id, sep_id = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    for row, (start, end) in zip(long_rows, spans):
        ids = tf.constant([[cls_id] + pieces[start:end] + [sep_id]], tf.int32)
        pooled, sequence = model([ids, tf.ones_like(ids), tf.zeros_like(ids)])
        assert emb.num_tokens[row] == end - start + 2
        np.testing.assert_allclose(emb.pooled_output[row], pooled[0],
                                   atol=1e-5)
        np.testing.assert_allclose(emb.sequence_output[row], sequence[0],
                                   atol=1e-5)


def test_document_vectors_are_chunk_means(chunked_run):
    _, root = chunked_run
    chunks = load_embeddings(str(root / "emb-[0-9]*.parquet"))
    docs = load_embeddings(str(root / "emb-documents-*.parquet"))
    assert docs.ids == ["long", "short"]
    assert docs.sequence_output is None
    for row, doc_id in enumerate(docs.ids):
        mine = [i for i, d in enumerate(chunks.doc_ids) if d == doc_id]
        np.testing.assert_allclose(
            docs.pooled_output[row],
            chunks.pooled_output[mine].mean(axis=0), atol=1e-6)
        assert docs.num_tokens[row] == chunks.num_tokens[mine].sum()


def test_chunked_counts_reconcile(chunked_run):
    summary, _ = chunked_run
    c = summary.counts
    assert (c["documents_read"], c["documents_embedded"],
            c["documents_skipped_empty"]) == (3, 2, 1)
    assert c["documents_chunked"] == 1
    assert c["chunks"] == c["chunks_embedded"] >= 4
    assert c["chunks_failed"] == 0
    assert summary.reconciled
    assert summary.outputs["documents"]


def test_chunked_tfrecord_matches_parquet(tmp_path, chunked_run,
                                          tiny_model_dir):
    _, root = chunked_run
    summary = run([
        "--input", str(root / "c.jsonl"), "--output", str(tmp_path / "emb"),
        "--model", tiny_model_dir, "--max_seq_length", str(MAX_SEQ),
        "--long_text", "chunk", "--chunk_stride", "8", "--format",
        "tfrecord", "--batch_size", "2",
        "--engine", "tensorflow", "--precision", "float32"])
    assert summary.reconciled
    a = load_embeddings(str(root / "emb-[0-9]*.parquet"))
    b = load_embeddings(str(tmp_path / "emb-[0-9]*.tfrecord"))
    assert a.ids == b.ids and a.doc_ids == b.doc_ids
    np.testing.assert_array_equal(a.chunk_index, b.chunk_index)
    # Batches may be composed differently between runs: float noise only.
    np.testing.assert_allclose(a.pooled_output, b.pooled_output, atol=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--document_vectors"], "need --long_text chunk"),
    (["--long_text", "chunk", "--chunk_stride", "11"], "at most"),
    (["--long_text", "chunk", "--document_vectors", "--outputs", "sequence"],
     "needs pooled"),
])
def test_chunk_flag_errors(tmp_path, tiny_model_dir, capsys, flags, message):
    corpus = tmp_path / "c.txt"
    corpus.write_text("你好\n", encoding="utf-8")
    assert main(["--input", str(corpus), "--output", str(tmp_path / "o"),
                 "--model", tiny_model_dir, "--max_seq_length", "12",
                 *flags]) == 2
    assert message in capsys.readouterr().err
