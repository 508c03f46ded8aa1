"""``pipeline.compact``: the current dataset of an index as one Parquet
dataset that DuckDB and Polars read as ``load_index`` does, published like a
run and refusing what is not a finished run's index."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import compact
from pipeline.lock import OutputLock
from pipeline.read_embeddings import current_tables, load_index
from pipeline.run import run
from tests.test_embedding_files import (
    assert_scalar_only_dictionaries_and_statistics)
from transforms.embedding_files import read_file_metadata

duckdb = pytest.importorskip("duckdb")
pl = pytest.importorskip("polars")

HIDDEN = 32
LONG = "手机电池续航一般，拍照效果不错。" * 6  # several chunks at 32 tokens
V1 = {"a": "今天天气很好", "b": "客服回复很及时", "c": "今天天气很好",
      "d": LONG, "e": LONG, "f": "北京时间昨晚"}
V2 = {"a": V1["a"], "b": "问题解决了", "c": V1["c"], "d": LONG, "e": LONG,
      "g": "房间干净"}


def _write(path: Path, docs: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": k, "text": v},
                                       ensure_ascii=False) + "\n"
                            for k, v in docs.items()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_dir):
    """c1, then c2 on top of it: chunked, document vectors, --dedup, both
    outputs, two-row row groups."""
    root = tmp_path_factory.mktemp("compact")

    def job(name: str, docs: dict[str, str], *extra: str):
        return run(["--input", str(_write(root / f"{name}.jsonl", docs)),
                    "--output", str(root / name / "emb"),
                    "--model", tiny_model_dir, "--max_seq_length", "32",
                    "--long_text", "chunk", "--document_vectors", "--dedup",
                    "--parquet_row_group_rows", "2", "--num_shards", "1",
                    *extra])

    job("c1", V1)
    job("c2", V2, "--previous_index", str(root / "c1" / "emb"))
    return root


@pytest.fixture(scope="module")
def compacted(chain):
    output = chain / "current" / "emb"
    code = compact.main(["--index", str(chain / "c2" / "emb"),
                         "--output", str(output)])
    assert code == 0
    return output


def _manifest(chain: Path, name: str) -> str:
    return str(chain / name / "emb-manifest.json")


def test_compaction_publishes_exactly_its_files(compacted, capsys):
    files = sorted(p.name for p in compacted.parent.iterdir())
    assert files == ["emb-00000-of-00001.parquet", "emb-compact.json",
                     "emb-documents-00000-of-00001.parquet",
                     "emb-duckdb.sql"]
    record = json.loads(Path(f"{compacted}-compact.json").read_text("utf-8"))
    assert record["status"] == "succeeded"
    assert record["ids"] == len(V2)
    assert record["duplicates_mapped"] == 2  # c -> a, e -> d
    assert record["files"]["embeddings"] == \
        [f"{compacted}-00000-of-00001.parquet"]


def test_duckdb_and_polars_read_what_load_index_returns(chain, compacted):
    index = load_index(_manifest(chain, "c2"), expand_duplicates=True)
    assert sorted(set(index.doc_ids)) == sorted(V2)
    path = f"{compacted}-00000-of-00001.parquet"
    con = duckdb.connect()
    con.execute(Path(f"{compacted}-duckdb.sql").read_text("utf-8"))
    rows = con.sql(
        "SELECT id, doc_id, embedded_as, pooled_output, sequence_output, "
        "array_cosine_similarity(pooled_output, pooled_output) "
        "FROM embeddings ORDER BY doc_id, chunk_index").fetchall()
    assert [r[0] for r in rows] == index.ids
    assert [r[1] for r in rows] == index.doc_ids
    assert [r[2] for r in rows] == index.embedded_as
    np.testing.assert_allclose(np.array([r[3] for r in rows]),
                               index.pooled_output, atol=1e-6)
    for row, sequence in zip(rows, index.sequence_output):
        np.testing.assert_allclose(np.array(row[4]), sequence, atol=1e-6)
    np.testing.assert_allclose([r[5] for r in rows], 1.0, atol=1e-6)
    types = {r[0]: r[1] for r in con.sql("DESCRIBE embeddings").fetchall()}
    assert types["pooled_output"] == f"FLOAT[{HIDDEN}]"

    frame = pl.read_parquet(path).sort(["doc_id", "chunk_index"])
    assert frame.schema["pooled_output"] == pl.Array(pl.Float32, HIDDEN)
    assert frame.schema["sequence_output"] == pl.List(
        pl.Array(pl.Float32, HIDDEN))
    assert frame["id"].to_list() == index.ids
    np.testing.assert_allclose(frame["pooled_output"].to_numpy(),
                               index.pooled_output, atol=1e-6)
    # The id that --dedup did not embed has its text's vectors.
    e_rows = [i for i, doc in enumerate(index.doc_ids) if doc == "e"]
    d_rows = [i for i, doc in enumerate(index.doc_ids) if doc == "d"]
    assert len(e_rows) == len(d_rows) > 1
    np.testing.assert_array_equal(index.pooled_output[e_rows],
                                  index.pooled_output[d_rows])


def test_a_runs_views_show_its_current_dataset(chain):
    """c2's own views (two segments, chunks, --dedup) give DuckDB the rows
    load_index does, one per id, the mapped ones included."""
    index = load_index(_manifest(chain, "c2"), expand_duplicates=True)
    con = duckdb.connect()
    con.execute(Path(f"{chain}/c2/emb-duckdb.sql").read_text("utf-8"))
    rows = con.sql("SELECT id, doc_id, embedded_as, pooled_output FROM "
                   "embeddings ORDER BY doc_id, chunk_index").fetchall()
    assert [r[:3] for r in rows] == list(zip(index.ids, index.doc_ids,
                                             index.embedded_as))
    np.testing.assert_allclose(np.array([r[3] for r in rows]),
                               index.pooled_output, atol=1e-6)
    docs = load_index(_manifest(chain, "c2"), kind="documents",
                      expand_duplicates=True)
    assert con.sql("SELECT id FROM documents ORDER BY id").fetchall() == \
        [(i,) for i in docs.ids]


def test_document_vectors_are_compacted_too(chain, compacted):
    docs = load_index(_manifest(chain, "c2"), kind="documents",
                      expand_duplicates=True)
    frame = pl.read_parquet(
        f"{compacted}-documents-00000-of-00001.parquet").sort("id")
    assert frame["id"].to_list() == docs.ids == sorted(V2)
    assert frame["embedded_as"].to_list() == docs.embedded_as
    np.testing.assert_allclose(frame["pooled_output"].to_numpy(),
                               docs.pooled_output, atol=1e-6)
    con = duckdb.connect()
    con.execute(Path(f"{compacted}-duckdb.sql").read_text("utf-8"))
    assert con.execute("SELECT count(*) FROM documents").fetchall() == \
        [(len(V2),)]


def test_the_footer_names_the_source_and_the_columns(chain, compacted):
    record = read_file_metadata(pq.ParquetFile(
        f"{compacted}-00000-of-00001.parquet").metadata.metadata)
    source = json.loads(Path(_manifest(chain, "c2")).read_text("utf-8"))
    assert record["compaction"]["source_run_id"] == source["run_id"]
    assert record["model"]["fingerprint"] == source["model_fingerprint"]
    assert record["kind"] == "embeddings"
    assert "embedded_as" in record["columns"]
    assert set(record["columns"]) == set(pq.read_schema(
        f"{compacted}-00000-of-00001.parquet").names)
    for kind in ("", "-documents"):
        assert assert_scalar_only_dictionaries_and_statistics(
            f"{compacted}{kind}-00000-of-00001.parquet") >= 1


def test_current_rows_stream_a_row_group_at_a_time(chain):
    manifest = json.loads(Path(_manifest(chain, "c2")).read_text("utf-8"))
    groups = sum(pq.ParquetFile(path).metadata.num_row_groups
                 for segment in manifest["index"]["segments"]
                 for path in segment["embeddings"])
    tables = list(current_tables(manifest))
    assert groups > 2 and len(tables) == groups
    assert max(t.num_rows for t in tables) <= 2


def test_row_groups_and_a_second_compaction_replace_the_first(chain,
                                                              tmp_path):
    output = tmp_path / "cur" / "emb"
    assert compact.main(["--index", _manifest(chain, "c2"), "--output",
                         str(output), "--row_group_rows", "3"]) == 0
    meta = pq.ParquetFile(f"{output}-00000-of-00001.parquet").metadata
    assert {meta.row_group(i).num_rows
            for i in range(meta.num_row_groups - 1)} == {3}
    assert compact.main(["--index", _manifest(chain, "c1"), "--output",
                         str(output)]) == 0
    frame = pl.read_parquet(f"{output}-00000-of-00001.parquet")
    assert sorted(set(frame["doc_id"].to_list())) == sorted(V1)
    assert sorted(p.name for p in output.parent.iterdir()) == [
        "emb-00000-of-00001.parquet", "emb-compact.json",
        "emb-documents-00000-of-00001.parquet", "emb-duckdb.sql"]


def _refused(capsys, *args: str) -> str:
    assert compact.main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


def test_missing_failed_or_foreign_sources_are_refused(chain, tmp_path,
                                                       capsys):
    out = str(tmp_path / "x" / "emb")
    assert "no manifest" in _refused(capsys, "--index", str(tmp_path / "no"),
                                     "--output", out)
    failed = json.loads(Path(_manifest(chain, "c2")).read_text("utf-8"))
    failed["status"], failed["failure"] = "failed", "counts do not add up"
    path = tmp_path / "failed-manifest.json"
    path.write_text(json.dumps(failed), encoding="utf-8")
    assert "did not succeed" in _refused(capsys, "--index", str(path),
                                         "--output", out)
    _refused(capsys, "--index", _manifest(chain, "c2"), "--output", out,
             "--shards", "3")
    assert not (tmp_path / "x").exists()


def test_a_runs_output_is_never_overwritten(chain, capsys):
    c1 = chain / "c1"
    before = {p: p.stat().st_mtime_ns for p in c1.rglob("*")}
    # The output the index reads from, and another run's output.
    assert "reads from" in _refused(capsys, "--index", _manifest(chain, "c2"),
                                    "--output", str(c1 / "emb"))
    other = chain / "c2" / "emb"
    assert "run's files" in _refused(capsys, "--index",
                                     _manifest(chain, "c1"),
                                     "--output", str(other))
    assert {p: p.stat().st_mtime_ns for p in c1.rglob("*")} == before


def test_a_locked_output_exits_4(chain, tmp_path, capsys):
    output = tmp_path / "locked" / "emb"
    with OutputLock(str(output), "20240101T000000Z-abcdef"):
        assert compact.main(["--index", _manifest(chain, "c2"), "--output",
                             str(output)]) == 4
    assert "error: " in capsys.readouterr().err
    assert not Path(f"{output}-00000-of-00001.parquet").exists()


def test_files_that_disagree_with_the_index_publish_nothing(chain, tmp_path,
                                                            capsys):
    manifest = json.loads(Path(_manifest(chain, "c2")).read_text("utf-8"))
    manifest["index"]["segments"][-1]["embeddings"] = []
    manifest["index"]["segments"][-1]["documents"] = []
    path = tmp_path / "emb-manifest.json"
    path.write_text(json.dumps(manifest), encoding="utf-8")
    output = tmp_path / "out" / "emb"
    assert compact.main(["--index", str(path), "--output",
                         str(output)]) == 1
    err = capsys.readouterr().err
    assert "nothing was published" in err and err.count("\n") == 1
    assert not output.parent.exists() or not list(output.parent.iterdir())


def _plain_lists(path: str) -> None:
    """Rewrites an embeddings file the way older outputs were: plain-list
    vectors, no Arrow schema in the footer."""
    table = pq.read_table(path)
    fields = []
    for field in table.schema:
        if field.name == "pooled_output":
            field = field.with_type(pa.list_(pa.float32()))
        elif field.name == "sequence_output":
            field = field.with_type(pa.list_(pa.list_(pa.float32())))
        fields.append(field)
    pq.write_table(table.cast(pa.schema(fields)), path, store_schema=False)


def test_older_outputs_with_plain_lists_still_load_and_compact(chain,
                                                               tmp_path):
    copy = tmp_path / "c1"
    shutil.copytree(chain / "c1", copy)
    text = Path(f"{copy}/emb-manifest.json").read_text("utf-8")
    Path(f"{copy}/emb-manifest.json").write_text(
        text.replace(str(chain / "c1"), str(copy)), encoding="utf-8")
    manifest = json.loads(Path(f"{copy}/emb-manifest.json").read_text())
    for path in manifest["files"]["embeddings"]:
        _plain_lists(path)
        assert pa.types.is_list(pq.read_schema(path).field(
            "pooled_output").type)
    new = load_index(_manifest(chain, "c1"), expand_duplicates=True)
    old = load_index(f"{copy}/emb-manifest.json", expand_duplicates=True)
    assert old.ids == new.ids
    np.testing.assert_array_equal(old.pooled_output, new.pooled_output)
    output = tmp_path / "cur" / "emb"
    assert compact.main(["--index", str(copy / "emb"), "--output",
                         str(output)]) == 0
    frame = pl.read_parquet(f"{output}-00000-of-00001.parquet")
    assert frame.schema["pooled_output"] == pl.Array(pl.Float32, HIDDEN)
    assert sorted(frame["id"].to_list()) == sorted(new.ids)
