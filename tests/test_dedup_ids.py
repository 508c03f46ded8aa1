"""``--dedup`` embeds each text once and keeps every input id findable: the
index maps each dropped id to the id embedded for its text
(``embedded_as``), and ``load_index(..., expand_duplicates=True)`` returns
a row with the right vectors for every id, through incremental runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.read_embeddings import DatasetError, load_index
from pipeline.run import run
from transforms.dedup import mapped_entries
from transforms.identity import content_hash
from transforms.incremental import IndexEntry
from transforms.records import Document

T1, T2, T3, T4, T5 = ("今天天气很好", "客服回复很及时", "北京时间昨晚",
                      "手机电池续航一般", "拍照效果不错")
# g occurs twice: the later record (T1) wins, then --dedup maps it to a.
V1 = [("a", T1), ("b", T2), ("c", T1), ("d", T3), ("e", T1), ("f", T2),
      ("g", T4), ("g", T1)]
# a's text changes: T1's group is now c, e, g, and c (the smallest id) is
# embedded; f is deleted, h is new with a known text.
V2 = [("a", T5), ("b", T2), ("c", T1), ("d", T3), ("e", T1), ("g", T1),
      ("h", T3)]


def _write(path: Path, records: list[tuple[str, str]]) -> Path:
    path.write_text("".join(
        json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n"
        for i, t in records), encoding="utf-8")
    return path


def _texts(records: list[tuple[str, str]]) -> dict[str, str]:
    return dict(records)  # the last record of an id wins


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("dedup_ids")

    def job(name: str, corpus: Path, *extra: str):
        return run(["--input", str(corpus), "--output", str(root / name /
                                                            "emb"),
                    "--model", tiny_model_dir, "--max_seq_length", "32",
                    "--outputs", "pooled", "--num_shards", "1", *extra])

    # The reference: every text embedded once under its own id, no dedup.
    texts = [T1, T2, T3, T4, T5]
    ref = job("ref", _write(root / "ref.jsonl",
                            [(f"t{i}", t) for i, t in enumerate(texts)]))
    ref_index = load_index(f"{root}/ref/emb-manifest.json")
    vectors = {texts[int(i[1:])]: v for i, v in
               zip(ref_index.ids, ref_index.pooled_output)}
    v1 = _write(root / "v1.jsonl", V1)
    summaries = {"ref": ref,
                 "d1": job("d1", v1, "--dedup"),
                 "d2": job("d2", v1, "--dedup", "--previous_index",
                           str(root / "d1" / "emb"))}
    summaries["d3"] = job("d3", _write(root / "v2.jsonl", V2), "--dedup",
                          "--previous_index", str(root / "d2" / "emb"))
    return root, summaries, vectors


def _index_rows(root: Path, name: str) -> dict[str, dict]:
    manifest = json.loads((root / name / "emb-manifest.json")
                          .read_text("utf-8"))
    rows = {}
    for path in manifest["index"]["keys"]:
        for row in pq.read_table(path).to_pylist():
            rows[row["id"]] = row
    return rows


def _check_every_id(root: Path, name: str, records, vectors) -> None:
    """Every input id has one row, with its text's vectors."""
    texts = _texts(records)
    index = load_index(f"{root}/{name}/emb-manifest.json",
                       expand_duplicates=True)
    assert index.ids == sorted(texts)
    assert index.content_hash == [content_hash(texts[i]) for i in index.ids]
    for doc_id, vector in zip(index.ids, index.pooled_output):
        np.testing.assert_allclose(vector, vectors[texts[doc_id]],
                                   atol=1e-5, err_msg=doc_id)
    # embedded_as names an id with the same text that has a row of its own.
    own = load_index(f"{root}/{name}/emb-manifest.json")
    assert set(index.embedded_as) == set(own.ids)
    for doc_id, source in zip(index.ids, index.embedded_as):
        assert texts[source] == texts[doc_id]


def test_a_dedup_run_maps_every_dropped_id(runs):
    root, summaries, vectors = runs
    c = summaries["d1"].counts
    # 8 records: g's first one (same id) and c, e, g, f (same text) dropped.
    assert (c["documents_read"], c["documents_embedded"],
            c["documents_duplicates"], c["duplicate_ids"]) == (8, 3, 5, 1)
    assert summaries["d1"].reconciled
    rows = _index_rows(root, "d1")
    assert {i: r["embedded_as"] for i, r in rows.items()} == {
        "a": "a", "b": "b", "c": "a", "d": "d", "e": "a", "f": "b",
        "g": "a"}
    manifest = json.loads((root / "d1" / "emb-manifest.json")
                          .read_text("utf-8"))
    assert manifest["index"]["documents"] == 7
    assert manifest["index"]["duplicates_mapped"] == 4
    # Without expanding, one row per embedded text, as before.
    assert load_index(f"{root}/d1/emb-manifest.json").ids == ["a", "b", "d"]
    _check_every_id(root, "d1", V1, vectors)


def test_an_unchanged_rerun_keeps_the_mapping(runs):
    root, summaries, vectors = runs
    c = summaries["d2"].counts
    assert (c["documents_embedded"], c["documents_unchanged"],
            c["documents_duplicates"]) == (0, 3, 5)
    rows = _index_rows(root, "d2")
    run_d1 = summaries["d1"].run_id
    assert {r["run_id"] for r in rows.values()} == {run_d1}
    assert rows["e"]["embedded_as"] == "a"
    _check_every_id(root, "d2", V1, vectors)


def test_a_changed_representative_moves_the_mapping(runs):
    """a's text changed: c becomes the id embedded for T1 (its old entry
    only mapped it to a, so it is embedded now, not taken as unchanged),
    and e and g follow it; h is new with T3, which d already has."""
    root, summaries, vectors = runs
    c = summaries["d3"].counts
    assert (c["documents_read"], c["documents_embedded"],
            c["documents_unchanged"], c["documents_duplicates"],
            c["documents_deleted"]) == (7, 2, 2, 3, 1)
    rows = _index_rows(root, "d3")
    assert {i: r["embedded_as"] for i, r in rows.items()} == {
        "a": "a", "b": "b", "c": "c", "d": "d", "e": "c", "g": "c",
        "h": "d"}
    d3, d1 = summaries["d3"].run_id, summaries["d1"].run_id
    assert rows["e"]["run_id"] == rows["c"]["run_id"] == d3
    assert rows["h"]["run_id"] == rows["d"]["run_id"] == d1
    _check_every_id(root, "d3", V2, vectors)


def test_a_mapping_without_its_row_is_refused(runs, tmp_path):
    root, _, _ = runs
    manifest = json.loads((root / "d1" / "emb-manifest.json")
                          .read_text("utf-8"))
    (path,) = manifest["index"]["keys"]
    table = pq.read_table(path)
    rows = [dict(r, embedded_as="nobody") if r["id"] == "c" else r
            for r in table.to_pylist()]
    broken = tmp_path / "part-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), broken)
    manifest["index"]["keys"] = [str(broken)]
    changed = tmp_path / "emb-manifest.json"
    changed.write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(DatasetError, match="ids the index maps to another"):
        load_index(str(changed), expand_duplicates=True)


def test_mapped_entries_point_at_the_one_embedded_document():
    kept = IndexEntry("a", "h1", "fp", "run-1")
    docs = [Document("c", "x", content_hash="h1"),
            Document("e", "x", content_hash="h1")]
    mapped = list(mapped_entries([kept], docs))
    assert [(e.id, e.row_id, e.run_id, e.model_fingerprint)
            for e in mapped] == [("c", "a", "run-1", "fp"),
                                 ("e", "a", "run-1", "fp")]
    assert all(e.mapped for e in mapped) and not kept.mapped
    # The embedded document failed: no entry, so nothing to map to.
    assert list(mapped_entries([], docs)) == []
    assert kept.to_row()["embedded_as"] == "a"


def test_an_older_index_without_embedded_as_still_serves(runs, tmp_path,
                                                         tiny_model_dir):
    """An index written before ``embedded_as`` (no column, and no entries
    for dropped ids) is read by load_index and by an incremental run."""
    import shutil
    root, summaries, vectors = runs
    old = tmp_path / "old"
    shutil.copytree(root / "d1", old)
    manifest_path = old / "emb-manifest.json"
    manifest_path.write_text(manifest_path.read_text("utf-8").replace(
        str(root / "d1"), str(old)), encoding="utf-8")
    manifest = json.loads(manifest_path.read_text("utf-8"))
    for path in manifest["index"]["keys"]:
        table = pq.read_table(path)
        own = [r for r in table.to_pylist() if r["id"] == r["embedded_as"]]
        pq.write_table(pa.Table.from_pylist(own).drop_columns(
            ["embedded_as"]), path)
    assert load_index(str(manifest_path)).ids == ["a", "b", "d"]
    assert load_index(str(manifest_path), expand_duplicates=True
                      ).embedded_as == ["a", "b", "d"]
    summary = run(["--input", str(root / "v1.jsonl"), "--output",
                   str(tmp_path / "new" / "emb"), "--model", tiny_model_dir,
                   "--max_seq_length", "32", "--outputs", "pooled",
                   "--dedup", "--previous_index", str(old / "emb")])
    c = summary.counts
    assert (c["documents_embedded"], c["documents_unchanged"]) == (0, 3)
    _check_every_id(tmp_path, "new", V1, vectors)
