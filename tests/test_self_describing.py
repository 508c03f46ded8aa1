"""Outputs describe themselves and other tools read their vectors typed.

Parquet footers carry ``bert_zh_embed`` (model, fingerprint, vocabulary
hash, tokenizer settings, pooling, run id, schema version, column meanings),
every run publishes ``<output>-schema.json`` (TFRecord's only description),
vectors are fixed-size (Polars ``Array(Float32, H)``), and a Parquet run's
``<output>-duckdb.sql`` gives DuckDB ``FLOAT[H]`` vectors, so that
``array_cosine_similarity`` needs no cast.  Older files with plain-list
vectors still read back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.read_embeddings import load_embeddings, load_index
from pipeline.run import run
from tests.conftest import E2E_TEXTS
from transforms.embedding_files import METADATA_KEY, read_file_metadata

duckdb = pytest.importorskip("duckdb")
pl = pytest.importorskip("polars")

HIDDEN = 32  # the tiny test model's


def _manifest(output: Path) -> dict:
    return json.loads(Path(f"{output}-manifest.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def described(tmp_path_factory, tiny_model_dir):
    """A plain Parquet run, and a chunked TFRecord run with document
    vectors and float16 sequences."""
    root = tmp_path_factory.mktemp("described")
    corpus = root / "c.jsonl"
    corpus.write_text("".join(
        json.dumps({"id": f"doc-{i}", "text": t}, ensure_ascii=False) + "\n"
        for i, t in enumerate(E2E_TEXTS)), encoding="utf-8")
    common = ["--input", str(corpus), "--model", tiny_model_dir,
              "--max_seq_length", "32", "--num_shards", "1"]
    parquet = run(common + ["--output", str(root / "pq" / "emb")])
    tfrecord = run(common + ["--output", str(root / "tf" / "emb"),
                             "--format", "tfrecord", "--long_text", "chunk",
                             "--document_vectors",
                             "--sequence_dtype", "float16"])
    vocab = Path(tiny_model_dir) / "assets" / "vocab.txt"
    return {"root": root, "parquet": parquet, "tfrecord": tfrecord,
            "model": tiny_model_dir,
            "vocab_sha256": hashlib.sha256(vocab.read_bytes()).hexdigest()}


def _check_description(record: dict, summary, described: dict) -> None:
    assert record["schema_version"] == 1
    assert record["run_id"] == summary.run_id
    assert record["model"] == {"path": described["model"],
                               "fingerprint": summary.model_fingerprint,
                               "hidden_size": HIDDEN}
    tokenizer = record["tokenizer"]
    assert tokenizer["vocab_sha256"] == described["vocab_sha256"]
    assert (tokenizer["do_lower_case"], tokenizer["max_seq_length"]) == \
        (True, 32)
    assert (record["pooling"], record["normalize"], record["precision"],
            record["engine"]) == ("cls", False, "auto", "auto")
    # ``auto`` as this machine resolves it: a real engine and precision.
    from model.engines import ENGINES, PRECISIONS, choose_engine, \
        detect_hardware
    planned = choose_engine("auto", "auto", detect_hardware())
    assert (record["planned_engine"], record["planned_precision"]) == (
        planned.engine, planned.precision)
    assert record["planned_engine"] in ENGINES[1:]
    assert record["planned_precision"] in ("float32", "bfloat16")


def test_parquet_footer_says_what_made_the_vectors(described):
    summary = described["parquet"]
    (path,) = summary.outputs["embeddings"]
    footer = pq.ParquetFile(path).metadata.metadata
    record = read_file_metadata(footer)
    _check_description(record, summary, described)
    assert record["kind"] == "embeddings"
    schema = pq.read_schema(path)
    assert set(record["columns"]) == set(schema.names)
    assert "[CLS]" in record["columns"]["pooled_output"]
    flat = {k.decode(): v.decode() for k, v in footer.items()
            if k.decode().startswith(METADATA_KEY + ".")}
    assert flat == {
        f"{METADATA_KEY}.schema_version": "1",
        f"{METADATA_KEY}.kind": "embeddings",
        f"{METADATA_KEY}.run_id": summary.run_id,
        f"{METADATA_KEY}.model_fingerprint": summary.model_fingerprint,
        f"{METADATA_KEY}.hidden_size": str(HIDDEN),
        f"{METADATA_KEY}.pooling": "cls",
        f"{METADATA_KEY}.normalize": "false"}
    # DuckDB lists the same key-value metadata.
    found = duckdb.sql(
        "SELECT decode(key), decode(value) FROM parquet_kv_metadata("
        f"'{path}') WHERE decode(key) = '{METADATA_KEY}'").fetchall()
    assert json.loads(found[0][1]) == record


def test_vectors_are_fixed_size_for_arrow_and_polars(described):
    (path,) = described["parquet"].outputs["embeddings"]
    schema = pq.read_schema(path)
    assert schema.field("pooled_output").type == pa.list_(pa.float32(),
                                                          HIDDEN)
    assert schema.field("sequence_output").type == pa.list_(
        pa.list_(pa.float32(), HIDDEN))
    frame = pl.read_parquet(path)
    assert frame.schema["pooled_output"] == pl.Array(pl.Float32, HIDDEN)
    assert frame.schema["sequence_output"] == pl.List(
        pl.Array(pl.Float32, HIDDEN))


def test_duckdb_reads_a_run_with_typed_vectors(described):
    summary = described["parquet"]
    output = described["root"] / "pq" / "emb"
    manifest = _manifest(output)
    views = manifest["files"]["duckdb"]
    assert views == f"{output}-duckdb.sql"
    con = duckdb.connect()
    con.execute(Path(views).read_text("utf-8"))
    types = {row[0]: row[1]
             for row in con.sql("DESCRIBE embeddings").fetchall()}
    assert types["pooled_output"] == f"FLOAT[{HIDDEN}]"
    assert types["sequence_output"] == f"FLOAT[{HIDDEN}][]"
    rows = con.sql(
        "SELECT id, pooled_output, array_cosine_similarity(pooled_output, "
        "pooled_output) FROM embeddings ORDER BY id").fetchall()
    index = load_index(f"{output}-manifest.json")
    assert [r[0] for r in rows] == index.ids
    assert len(rows) == summary.counts["documents_embedded"]
    np.testing.assert_allclose(np.array([r[1] for r in rows]),
                               index.pooled_output, atol=1e-6)
    np.testing.assert_allclose([r[2] for r in rows], 1.0, atol=1e-6)


def test_the_schema_file_is_published_and_listed(described):
    summary = described["parquet"]
    output = described["root"] / "pq" / "emb"
    manifest = _manifest(output)
    path = manifest["files"]["schema"]
    assert path == f"{output}-schema.json"
    side = json.loads(Path(path).read_text("utf-8"))
    _check_description(side, summary, described)
    assert manifest["description"] == {
        k: v for k, v in side.items() if k not in ("files", "index")}
    (shard,) = summary.outputs["embeddings"]
    assert side["files"]["embeddings"]["files"] == [shard]
    footer = read_file_metadata(pq.ParquetFile(shard).metadata.metadata)
    columns = side["files"]["embeddings"]["columns"]
    assert {k: v["meaning"] for k, v in columns.items()} == \
        footer["columns"]
    assert columns["pooled_output"]["type"] == \
        str(pq.read_schema(shard).field("pooled_output").type)
    assert "embedded_as" in side["index"]["columns"]


def test_tfrecord_runs_publish_their_description(described):
    summary = described["tfrecord"]
    output = described["root"] / "tf" / "emb"
    manifest = _manifest(output)
    assert "duckdb" not in manifest["files"]  # DuckDB reads no TFRecord
    assert not Path(f"{output}-duckdb.sql").exists()
    side = json.loads(Path(manifest["files"]["schema"]).read_text("utf-8"))
    _check_description(side, summary, described)
    assert side["tokenizer"]["long_text"] == "chunk"
    assert side["format"] == "tfrecord"
    embeddings, documents = side["files"]["embeddings"], \
        side["files"]["documents"]
    assert embeddings["files"] == summary.outputs["embeddings"]
    assert documents["files"] == summary.outputs["documents"]
    features = embeddings["tfrecord_features"]
    assert {"id", "doc_id", "chunk_index", "num_chunks", "pooled_output",
            "sequence_output", "sequence_shape", "sequence_dtype"} <= \
        set(features)
    assert "float16" in features["sequence_output"]
    assert "sequence_output" not in documents["tfrecord_features"]
    assert "mean of the document's chunks" in \
        documents["columns"]["pooled_output"]["meaning"]
    # What the features say is what a reader finds.
    emb = load_embeddings(summary.outputs["embeddings"][0])
    assert emb.sequence_output[0].dtype == np.float16
    assert emb.pooled_output.shape[1] == HIDDEN


def test_a_rerun_in_another_format_leaves_no_stale_views(described,
                                                         tiny_model_dir):
    """The DuckDB views of a Parquet run at an output go when a TFRecord
    run replaces it (they would describe removed files)."""
    root = described["root"]
    output = root / "rerun" / "emb"
    common = ["--input", str(root / "c.jsonl"), "--model", tiny_model_dir,
              "--max_seq_length", "32", "--outputs", "pooled",
              "--output", str(output)]
    run(common)
    assert Path(f"{output}-duckdb.sql").exists()
    run(common + ["--format", "tfrecord"])
    assert not Path(f"{output}-duckdb.sql").exists()
    assert Path(f"{output}-schema.json").exists()


def test_plain_list_vectors_of_older_outputs_still_read(described, tmp_path):
    (path,) = described["parquet"].outputs["embeddings"]
    table = pq.read_table(path)
    plain = pa.schema([
        field.with_type(pa.list_(pa.float32())) if field.name ==
        "pooled_output" else field.with_type(pa.list_(pa.list_(
            pa.float32()))) if field.name == "sequence_output" else field
        for field in table.schema]).remove_metadata()
    old = tmp_path / "old-00000-of-00001.parquet"
    pq.write_table(table.cast(plain), old, store_schema=False)
    assert pa.types.is_list(pq.read_schema(old).field("pooled_output").type)
    new, back = load_embeddings(path), load_embeddings(str(old))
    assert back.ids == new.ids
    np.testing.assert_array_equal(back.pooled_output, new.pooled_output)
    for a, b in zip(back.sequence_output, new.sequence_output):
        np.testing.assert_array_equal(a, b)
