"""``load_index`` returns exactly the dataset the manifest describes, and a
run writes one document per id (the last record wins), reporting the ids
that occurred more than once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.read_embeddings import DatasetError, load_index, read_files
from pipeline.run import run
from transforms.dedup import pick_latest
from transforms.identity import content_hash, derived_id
from transforms.records import Document

NEWS = {"a": "今天天气很好", "b": "客服回复很及时", "c": "北京时间昨晚",
        "d": "手机电池续航一般"}


def _job(corpus: Path, output: Path, model: str, *extra: str):
    return run(["--input", str(corpus), "--output", str(output),
                "--model", model, "--max_seq_length", "32",
                "--outputs", "pooled", *extra])


def _manifest(output: Path) -> dict:
    return json.loads(Path(f"{output}-manifest.json").read_text("utf-8"))


def _save(manifest: dict, path: Path) -> str:
    path.write_text(json.dumps(manifest), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    """d1: a first run (two shards); d2: builds on d1 and embeds nothing."""
    root = tmp_path_factory.mktemp("chain")
    corpus = root / "news.jsonl"
    corpus.write_text("".join(
        json.dumps({"id": k, "text": v}, ensure_ascii=False) + "\n"
        for k, v in NEWS.items()), encoding="utf-8")
    _job(corpus, root / "d1" / "emb", tiny_model_dir, "--num_shards", "2")
    _job(corpus, root / "d2" / "emb", tiny_model_dir,
         "--previous_index", str(root / "d1" / "emb"))
    return root, corpus


def test_a_chain_reads_back_whole(two_runs):
    root, _ = two_runs
    index = load_index(str(root / "d2" / "emb-manifest.json"))
    assert index.ids == sorted(NEWS)
    assert _manifest(root / "d2" / "emb")["index"]["segments"][0][
        "output"] == str(root / "d1" / "emb")


def test_rows_the_index_does_not_describe_are_refused(two_runs, tmp_path):
    root, _ = two_runs
    manifest = _manifest(root / "d2" / "emb")
    segment = manifest["index"]["segments"][0]
    shards = segment["embeddings"]
    rows = {path: len(read_files([path])) for path in shards}
    assert len(shards) == 2 and sum(rows.values()) == len(NEWS)
    # A shard listed twice: its documents come back twice.
    segment["embeddings"] = shards + [max(rows, key=rows.get)]
    with pytest.raises(DatasetError, match="rows repeat a document"):
        load_index(_save(manifest, tmp_path / "twice.json"))
    # A shard left out: documents of the index are missing.
    segment["embeddings"] = [min(rows, key=rows.get)]
    with pytest.raises(DatasetError, match="documents the index puts in run"):
        load_index(_save(manifest, tmp_path / "missing.json"))
    # An index that lists an id twice.
    manifest = _manifest(root / "d2" / "emb")
    manifest["index"]["keys"] *= 2
    with pytest.raises(DatasetError, match="index entries repeat an id"):
        load_index(_save(manifest, tmp_path / "keys.json"))
    # The earlier output now holds another run (it was re-run).
    manifest = _manifest(root / "d2" / "emb")
    manifest["index"]["segments"][0]["run_id"] = "20240101T000000Z-000000"
    with pytest.raises(DatasetError):
        load_index(_save(manifest, tmp_path / "rerun.json"))


def test_a_rerun_of_an_earlier_output_with_another_model_is_refused(
        tmp_path, tiny_model_dir):
    """d2 builds on d1; then d1 is run again with other settings (another
    model fingerprint): d2's index must not hand out d1's new rows."""
    corpus = tmp_path / "news.jsonl"
    corpus.write_text("".join(
        json.dumps({"id": k, "text": v}, ensure_ascii=False) + "\n"
        for k, v in NEWS.items()), encoding="utf-8")
    d1, d2 = tmp_path / "d1" / "emb", tmp_path / "d2" / "emb"
    _job(corpus, d1, tiny_model_dir, "--num_shards", "1")
    _job(corpus, d2, tiny_model_dir, "--previous_index", str(d1))
    before = load_index(f"{d2}-manifest.json")
    _job(corpus, d1, tiny_model_dir, "--num_shards", "1",
         "--max_seq_length", "24")
    assert _manifest(d1)["model_fingerprint"] != \
        _manifest(d2)["model_fingerprint"]
    with pytest.raises(DatasetError) as refused:
        load_index(f"{d2}-manifest.json")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(str(d1) + "-00000-of-00001.parquet: "
                              f"{len(NEWS)} rows have another model "
                              "fingerprint")
    assert len(before) == len(NEWS)


def test_pick_latest_is_the_last_record_whatever_the_order():
    docs = [Document("x", "A", "a.jsonl", 1, "h1"),
            Document("x", "C", "a.jsonl", 7, "h3"),
            Document("x", "B", "b.jsonl", 2, "h2")]
    for order in (docs, docs[::-1], docs[1:] + docs[:1]):
        kept, dropped = pick_latest(order)
        assert kept.text == "B"  # b.jsonl sorts after a.jsonl
        assert sorted(d.text for d in dropped) == ["A", "C"]


def test_one_document_per_id_the_last_wins_and_is_reported(tmp_path,
                                                            tiny_model_dir):
    news = tmp_path / "news.jsonl"
    news.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"id": "x", "text": "今天天气很好"}, {"id": "y", "text": "客服回复很及时"},
        {"id": "x", "text": "北京时间昨晚"}]), encoding="utf-8")
    lines = tmp_path / "lines.txt"
    # The repeated line shares its derived id; the two blank lines do too,
    # but they are skipped (empty), not duplicates.
    lines.write_text("手机电池续航一般\n\n拍照效果不错\n\n手机电池续航一般\n",
                     encoding="utf-8")
    out = tmp_path / "out" / "emb"
    summary = run(["--input", str(news), "--input", str(lines), "--output",
                   str(out), "--model", tiny_model_dir, "--max_seq_length",
                   "32", "--outputs", "pooled"])
    c = summary.counts
    assert (c["documents_read"], c["documents_embedded"],
            c["documents_skipped_empty"], c["documents_duplicates"],
            c["duplicate_ids"]) == (8, 4, 2, 2, 2)
    assert summary.reconciled and summary.status == "succeeded"
    repeated_line = derived_id("lines.txt", content_hash("手机电池续航一般"))
    assert summary.duplicate_id_sample == sorted(["x", repeated_line])
    assert "2 ids more than once" in summary.format()
    written = json.loads(Path(f"{out}-summary.json").read_text("utf-8"))
    assert written["duplicate_id_sample"] == summary.duplicate_id_sample
    index = load_index(f"{out}-manifest.json")
    assert len(index.ids) == len(set(index.ids)) == 4
    assert _manifest(out)["index"]["documents"] == 4
    assert dict(zip(index.ids, index.content_hash))["x"] == \
        content_hash("北京时间昨晚")  # the later record
