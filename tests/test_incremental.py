"""Incremental runs: identity, model fingerprint, previous index, manifests.

The end-to-end sequence runs four times over a small corpus: a first run,
a second over unchanged input (nothing embedded), a third after one
document changed, one was added, one deleted and a line was inserted at the
top of a plain-text file (exactly those embedded), and a fourth with other
tokenizer settings (a new fingerprint: everything embedded again).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.fingerprint import model_fingerprint
from pipeline.manifest import ManifestError, find_previous, load_previous
from pipeline.read_embeddings import load_embeddings, load_index
from pipeline.run import EXIT_USAGE, main, run
from transforms.identity import content_hash, derived_id

NEWS_V1 = {"a": "今天天气很好", "b": "客服回复很及时", "c": "北京时间昨晚",
           "d": "手机电池续航一般", "e": "拍照效果不错"}
NEWS_V2 = {"a": "今天天气很好，我们去公园散步", "b": NEWS_V1["b"],
           "d": NEWS_V1["d"], "e": NEWS_V1["e"], "f": "房间干净"}
LINES_V1 = ["请问订单什么时候发货", "问题解决了"]
LINES_V2 = ["服务非常好"] + LINES_V1  # a line inserted at the top


def _write(root: Path, news: dict[str, str], lines: list[str]) -> list[str]:
    (root / "news.jsonl").write_text("".join(
        json.dumps({"id": k, "text": v}, ensure_ascii=False) + "\n"
        for k, v in news.items()), encoding="utf-8")
    (root / "lines.txt").write_text("\n".join(lines) + "\n",
                                    encoding="utf-8")
    return ["--input", str(root / "news.jsonl"),
            "--input", str(root / "lines.txt")]


def _line_id(text: str) -> str:
    return derived_id("lines.txt", content_hash(text))


def _manifest(root: Path, name: str) -> dict:
    return json.loads((root / name / "emb-manifest.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("incremental")
    previous = ["--previous_index", str(root / "*" / "emb-manifest.json")]

    def job(name: str, inputs: list[str], *extra: str):
        return run(inputs + ["--output", str(root / name / "emb"),
                             "--model", tiny_model_dir,
                             "--max_seq_length", "32", "--outputs", "pooled",
                             *extra])

    v1 = _write(root, NEWS_V1, LINES_V1)
    summaries = {"r1": job("r1", v1, *previous)}  # glob finds nothing yet
    summaries["r2"] = job("r2", v1, *previous)
    v2 = _write(root, NEWS_V2, LINES_V2)
    summaries["r3"] = job("r3", v2, *previous)
    summaries["r4"] = job("r4", v2, "--previous_index", str(root / "r3" /
                                                            "emb"),
                          "--max_seq_length", "24")
    return root, summaries


def _counts(summary) -> tuple:
    c = summary.counts
    return tuple(c[k] for k in (
        "documents_read", "documents_embedded", "documents_unchanged",
        "documents_new", "documents_changed", "documents_deleted"))


def test_first_run_embeds_everything(runs):
    root, summaries = runs
    assert summaries["r1"].previous_index is None
    assert _counts(summaries["r1"]) == (7, 7, 0, 0, 0, 0)
    assert _manifest(root, "r1")["index"]["documents"] == 7


def test_unchanged_input_embeds_nothing_and_says_so(runs):
    root, summaries = runs
    r2 = summaries["r2"]
    assert r2.previous_index == str(root / "r1" / "emb-manifest.json")
    assert _counts(r2) == (7, 0, 7, 0, 0, 0)
    assert r2.reconciled
    assert "no new embeddings: all 7 documents are unchanged" in r2.format()
    assert len(load_embeddings(str(root / "r2" / "emb-*.parquet"))) == 0
    manifest = _manifest(root, "r2")
    assert [s["output"] for s in manifest["index"]["segments"]] == \
        [str(root / "r1" / "emb")]
    first = load_index(str(root / "r1" / "emb-manifest.json"))
    second = load_index(str(root / "r2" / "emb-manifest.json"))
    assert second.ids == first.ids
    np.testing.assert_array_equal(second.pooled_output, first.pooled_output)


def test_only_changed_and_new_documents_are_embedded(runs):
    root, summaries = runs
    r3 = summaries["r3"]
    assert r3.previous_index == str(root / "r2" / "emb-manifest.json")
    # a changed; f and the inserted line are new; c was deleted; the old
    # lines keep their ids although their line numbers moved.
    assert _counts(r3) == (8, 3, 5, 2, 1, 1)
    written = load_embeddings(str(root / "r3" / "emb-*.parquet"))
    assert written.ids == sorted(["a", "f", _line_id("服务非常好")])
    deleted = [json.loads(line) for path in r3.outputs["deleted"]
               for line in Path(path).read_text("utf-8").splitlines()]
    assert [(d["id"], d["content_hash"]) for d in deleted] == \
        [("c", content_hash(NEWS_V1["c"]))]


def test_the_index_after_an_incremental_run_is_the_current_corpus(runs):
    root, _ = runs
    index = load_index(str(root / "r3" / "emb-manifest.json"))
    expected = {**NEWS_V2, **{_line_id(t): t for t in LINES_V2}}
    assert index.ids == sorted(expected)
    assert index.content_hash == [content_hash(expected[i])
                                  for i in index.ids]
    first = load_index(str(root / "r1" / "emb-manifest.json"))
    row = {i: n for n, i in enumerate(index.ids)}
    old = {i: n for n, i in enumerate(first.ids)}
    np.testing.assert_array_equal(index.pooled_output[row["b"]],
                                  first.pooled_output[old["b"]])
    assert not np.allclose(index.pooled_output[row["a"]],
                           first.pooled_output[old["a"]])
    manifest = _manifest(root, "r3")
    assert [s["output"] for s in manifest["index"]["segments"]] == [
        str(root / "r3" / "emb"), str(root / "r1" / "emb")]
    assert manifest["index"]["documents"] == len(expected)


def test_another_model_fingerprint_embeds_everything_again(runs):
    root, summaries = runs
    r4 = summaries["r4"]
    assert _counts(r4) == (8, 8, 0, 0, 8, 0)
    assert r4.model_fingerprint != summaries["r3"].model_fingerprint
    manifest = _manifest(root, "r4")
    assert [s["output"] for s in manifest["index"]["segments"]] == \
        [str(root / "r4" / "emb")]
    index = load_index(str(root / "r4" / "emb-manifest.json"))
    assert set(index.model_fingerprint) == {r4.model_fingerprint}


def test_manifest_records_the_run(runs):
    root, summaries = runs
    manifest = _manifest(root, "r3")
    assert manifest["status"] == "succeeded"
    assert manifest["run_id"] == summaries["r3"].run_id
    assert manifest["started_at"] <= manifest["finished_at"]
    assert manifest["model_fingerprint"] == summaries["r3"].model_fingerprint
    assert manifest["counts"] == summaries["r3"].counts
    assert manifest["options"]["max_seq_length"] == 32
    assert manifest["files"]["embeddings"] == \
        summaries["r3"].outputs["embeddings"]
    assert manifest["files"]["summary"] == str(root / "r3" /
                                               "emb-summary.json")


def test_previous_index_usage_errors(runs, tiny_model_dir, capsys):
    root, _ = runs
    base = ["--input", str(root / "news.jsonl"), "--model", tiny_model_dir,
            "--max_seq_length", "32", "--outputs", "pooled"]
    assert main(base + ["--output", str(root / "x" / "emb"),
                        "--previous_index", str(root / "nowhere" / "emb")]
                ) == EXIT_USAGE
    assert "no manifest at" in capsys.readouterr().err
    # Building on an index whose files live under this run's own output
    # would replace them while publishing.
    assert main(base + ["--output", str(root / "r1" / "emb"),
                        "--previous_index", str(root / "r3" / "emb")]
                ) == EXIT_USAGE
    assert "which this run would replace" in capsys.readouterr().err


# --- units ------------------------------------------------------------------


def test_fingerprint_follows_weights_vocab_and_settings(tmp_path,
                                                         tiny_model_dir):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    vocab = next(copy.glob("assets/*"))

    def fingerprint(model: Path, **settings) -> str:
        args = {"do_lower_case": True, "max_seq_length": 32, **settings}
        return model_fingerprint(str(model), str(vocab), **args)

    base = fingerprint(copy)
    assert fingerprint(Path(tiny_model_dir)) == base  # content, not path
    assert fingerprint(copy, max_seq_length=64) != base
    assert fingerprint(copy, do_lower_case=False) != base
    assert fingerprint(copy, long_text="chunk", chunk_stride=30) != base
    data = next(copy.glob("variables/variables.data-*"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    changed = fingerprint(copy)
    assert changed != base
    vocab.write_text(vocab.read_text("utf-8") + "新词\n", encoding="utf-8")
    assert fingerprint(copy) not in (base, changed)


def _fake_manifest(path: Path, status: str, finished: str,
                   layout: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "manifest_version": 1, "status": status, "run_id": path.parent.name,
        "finished_at": finished, "output": str(path.parent / "emb"),
        "layout": layout,
        "index": {"keys": [str(path.parent / "k.parquet")],
                  "segments": []}}), encoding="utf-8")


def test_previous_index_glob_takes_the_newest_successful_run(tmp_path):
    layout = {"format": "parquet"}
    _fake_manifest(tmp_path / "d1" / "emb-manifest.json", "succeeded",
                   "2024-05-01T02:00:00+00:00", layout)
    _fake_manifest(tmp_path / "d2" / "emb-manifest.json", "succeeded",
                   "2024-05-02T02:00:00+00:00", layout)
    _fake_manifest(tmp_path / "d3" / "emb-manifest.json", "failed",
                   "2024-05-03T02:00:00+00:00", layout)
    pattern = str(tmp_path / "*" / "emb-manifest.json")
    assert find_previous(pattern, str(tmp_path / "d4" / "emb")) == \
        str(tmp_path / "d2" / "emb-manifest.json")
    # A run never builds on itself (a re-run of d2 takes d1).
    assert find_previous(pattern, str(tmp_path / "d2" / "emb")) == \
        str(tmp_path / "d1" / "emb-manifest.json")
    assert find_previous(str(tmp_path / "none-*.json"), "o") is None
    with pytest.raises(ManifestError, match="that run failed"):
        load_previous(str(tmp_path / "d3" / "emb-manifest.json"), "o", layout)
    previous = load_previous(str(tmp_path / "d2" / "emb-manifest.json"),
                             "o", layout)
    assert previous.reuse and previous.index_files == [
        str(tmp_path / "d2" / "k.parquet")]
    other = load_previous(str(tmp_path / "d2" / "emb-manifest.json"), "o",
                          {"format": "tfrecord"})
    assert not other.reuse  # another layout: every document is re-embedded


def test_index_leaves_out_documents_with_a_missing_chunk():
    """A chunked document whose later chunk failed is not indexed, so the
    next incremental run embeds it again instead of calling it unchanged."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline as BeamPipeline
    from apache_beam.testing.util import assert_that, equal_to
    from transforms.incremental import CompleteDocumentEntries, IndexEntry
    from transforms.records import DocumentEmbedding

    def row(doc: str, index: int, count: int) -> DocumentEmbedding:
        return DocumentEmbedding(f"{doc}#{index}", 5, False, None, None, doc,
                                 index, count, f"hash-{doc}")

    rows = [row("whole", 0, 2), row("whole", 1, 2),  # both chunks embedded
            row("broken", 0, 3), row("broken", 2, 3),  # chunk 1 failed
            row("short", 0, 1)]
    with BeamPipeline() as p:
        entries = (p | beam.Create(rows)
                   | CompleteDocumentEntries("fp", "run-1", chunked=True))
        assert_that(entries, equal_to([
            IndexEntry("whole", "hash-whole", "fp", "run-1"),
            IndexEntry("short", "hash-short", "fp", "run-1")]))
