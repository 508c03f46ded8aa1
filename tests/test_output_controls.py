"""Output controls: float16 sequences, Parquet codec and row groups, the text
column, gzip TFRecord, and reading all of them back."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.read_embeddings import load_embeddings
from pipeline.run import run
from tests.conftest import E2E_TEXTS
from transforms.records import DocumentEmbedding
from transforms.embedding_files import (embedding_schema, to_record_batch,
                                        to_tf_example)

HIDDEN = 4


def _chunk_rows() -> list[DocumentEmbedding]:
    """Two chunks of one document (text on the first only) and a short
    document."""
    rng = np.random.default_rng(1)
    rows = []
    for row_id, doc_id, index, count, text in [
            ("long#0", "long", 0, 2, "长文"), ("long#1", "long", 1, 2, None),
            ("short#0", "short", 0, 1, "短")]:
        rows.append(DocumentEmbedding(
            row_id, 3, False, rng.standard_normal(HIDDEN).astype(np.float32),
            rng.standard_normal((3, HIDDEN)).astype(np.float32), doc_id,
            index, count, content_hash=f"hash-{doc_id}", text=text))
    return rows


def _check(loaded, rows) -> None:
    assert loaded.ids == [r.id for r in rows]
    assert loaded.text == [r.text for r in rows]
    assert loaded.content_hash == [r.content_hash for r in rows]
    assert set(loaded.model_fingerprint) == {"fp"}
    assert loaded.doc_ids == [r.doc_id for r in rows]
    np.testing.assert_array_equal(loaded.pooled_output,
                                  np.stack([r.pooled_output for r in rows]))
    for got, row in zip(loaded.sequence_output, rows):
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got,
                                      row.sequence_output.astype(np.float16))


def test_parquet_float16_text_round_trip(tmp_path):
    rows = _chunk_rows()
    schema = embedding_schema(HIDDEN, chunked=True, write_text=True,
                              sequence_dtype="float16")
    assert str(schema.field("sequence_output").type) == \
        "list<item: fixed_size_list<item: halffloat>[4]>"
    assert schema.field("text").nullable
    table = pa.Table.from_batches([to_record_batch(rows, schema, "fp")])
    pq.write_table(table, tmp_path / "e-00000-of-00001.parquet")
    _check(load_embeddings(str(tmp_path / "e-*.parquet")), rows)


def test_tfrecord_float16_gzip_text_round_trip(tmp_path):
    import tensorflow as tf
    rows = _chunk_rows()
    path = tmp_path / "e-00000-of-00001.tfrecord.gz"
    with tf.io.TFRecordWriter(str(path), options="GZIP") as writer:
        for row in rows:
            writer.write(to_tf_example(row, True, "fp", "float16", True))
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    _check(load_embeddings(str(tmp_path / "e-*.tfrecord.gz")), rows)


@pytest.fixture(scope="module")
def controlled(tmp_path_factory, tiny_model_dir):
    """The same corpus written as float16 Parquet (zstd, 2-row groups, text)
    and as float16 gzip TFRecord (text)."""
    root = tmp_path_factory.mktemp("controls")
    corpus = root / "c.jsonl"
    corpus.write_text("".join(
        json.dumps({"id": f"doc-{i}", "text": t}, ensure_ascii=False) + "\n"
        for i, t in enumerate(E2E_TEXTS)), encoding="utf-8")
    common = ["--input", str(corpus), "--model", tiny_model_dir,
              "--max_seq_length", "32", "--sequence_dtype", "float16",
              "--write_text", "--num_shards", "1", "--precision", "float32"]
    parquet = run(common + ["--output", str(root / "pq" / "emb"),
                            "--parquet_compression", "zstd",
                            "--parquet_row_group_rows", "2"])
    tfrecord = run(common + ["--output", str(root / "tf" / "emb"),
                             "--format", "tfrecord",
                             "--tfrecord_compression", "gzip"])
    return parquet, tfrecord


def test_parquet_codec_row_groups_and_types(controlled):
    parquet, _ = controlled
    (path,) = parquet.outputs["embeddings"]
    meta = pq.ParquetFile(path).metadata
    embedded = parquet.counts["documents_embedded"]
    assert meta.num_rows == embedded == len(E2E_TEXTS) - 2
    groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert max(groups) <= 2 and sum(groups) == embedded
    assert {meta.row_group(0).column(i).compression
            for i in range(meta.num_columns)} == {"ZSTD"}
    schema = pq.read_schema(path)
    assert str(schema.field("sequence_output").type.value_type) == \
        "fixed_size_list<item: halffloat>[32]"


def test_both_formats_read_back_the_same_rows(controlled):
    parquet, tfrecord = controlled
    (tf_path,) = tfrecord.outputs["embeddings"]
    assert tf_path.endswith(".tfrecord.gz")
    a = load_embeddings(parquet.outputs["embeddings"][0])
    b = load_embeddings(tf_path)
    assert a.ids == b.ids
    assert a.text == b.text == [E2E_TEXTS[int(i.split("-")[1])]
                                for i in a.ids]
    assert a.content_hash == b.content_hash
    np.testing.assert_allclose(a.pooled_output, b.pooled_output, atol=1e-5)
    for x, y in zip(a.sequence_output, b.sequence_output):
        assert x.dtype == y.dtype == np.float16
        np.testing.assert_allclose(x.astype(np.float32),
                                   y.astype(np.float32), atol=2e-3)


def test_parquet_buffer_is_bounded_in_bytes_not_rows():
    """Long rows are handed to the writer after ~32 MiB, not after 256 rows:
    one 512-token float32 sequence row is 1.5 MiB, so a row-count limit
    alone would hold hundreds of MiB per worker."""
    from transforms import write
    dofn = write._ToArrowTables(embedding_schema(768))
    dofn.start_bundle()
    row_bytes = 512 * 768 * 4 + 768 * 4
    tables, most_pending = [], 0
    for i in range(60):
        row = DocumentEmbedding(
            f"d{i}", 512, True, np.zeros(768, np.float32),
            np.full((512, 768), i, np.float32))
        tables.extend(dofn.process(row))
        most_pending = max(most_pending, dofn._buffered)
    tables.extend(t.value for t in dofn.finish_bundle())
    assert most_pending * row_bytes <= write._BYTES_PER_TABLE + row_bytes
    assert len(tables) >= 60 * row_bytes // write._BYTES_PER_TABLE
    assert all(t.nbytes <= write._BYTES_PER_TABLE + 2 * row_bytes
               for t in tables)
    written = pa.concat_tables(tables)
    assert written.column("id").to_pylist() == [f"d{i}" for i in range(60)]
    first = np.asarray(written.column("sequence_output")[59].values
                       .flatten()).reshape(512, 768)
    assert (first == 59).all()
