"""``pipeline.query``: exact cosine search over a run's index with the
index's own model and settings, streamed; and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.embed import IndexMismatch, embed_texts
from pipeline.query import TopK, main, query_index, search
from pipeline.read_embeddings import load_index
from pipeline.run import run
from tests.conftest import E2E_TEXTS, SHARED_ASSETS

TEXTS = {f"d{i}": t for i, t in enumerate(E2E_TEXTS) if t.strip()}


def _write(path, docs: dict[str, str]) -> str:
    path.write_text("".join(
        json.dumps({"id": k, "text": v}, ensure_ascii=False) + "\n"
        for k, v in docs.items()), encoding="utf-8")
    return str(path)


def _run(*flags: str) -> None:
    summary = run(list(flags))
    assert summary.reconciled and summary.status != "failed"


def _brute_force(manifest: str, query: np.ndarray, kind: str = "embeddings"
                 ) -> list[tuple[str, float]]:
    """Every current document's cosine with ``query`` (a chunked
    document's best chunk), best first: what the search must return."""
    emb = load_index(manifest, kind)
    rows = emb.pooled_output.astype(np.float64)
    scores = rows @ query / (np.linalg.norm(rows, axis=1)
                             * np.linalg.norm(query))
    best: dict[str, float] = {}
    for doc, score in zip(emb.document_ids, scores):
        best[doc] = max(best.get(doc, -np.inf), float(score))
    return sorted(best.items(), key=lambda item: -item[1])


def _assert_top_k(got: list, expected: list[tuple[str, float]], k: int
                  ) -> None:
    """``got`` (``((id, hash), score)``, best first) is a top ``k`` of
    ``expected``: the same scores, each its document's own (documents
    whose scores tie within float noise may come in either order)."""
    assert len(got) == min(k, len(expected))
    np.testing.assert_allclose([s for _, s in got],
                               [s for _, s in expected[:k]], atol=1e-5)
    truth = dict(expected)
    for (doc, _), score in got:
        assert truth[doc] == pytest.approx(score, abs=1e-5)
    assert len({doc for (doc, _), _ in got}) == len(got)


# --- the running top-k ---------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_top_k_equals_sorting_everything(k):
    rng = np.random.default_rng(k)
    keys = [f"doc{n}" for n in rng.integers(0, 40, size=500)]  # repeats
    scores = rng.standard_normal(500).astype(np.float32)
    top = TopK(k)
    for start in range(0, 500, 64):
        top.offer_batch(keys[start:start + 64], scores[start:start + 64])
    best: dict[str, float] = {}
    for key, score in zip(keys, scores):
        best[key] = max(best.get(key, -np.inf), float(score))
    expected = sorted(best.items(), key=lambda item: -item[1])[:k]
    assert top.best() == expected


def test_top_k_ties_keep_the_first_seen():
    top = TopK(2)
    top.offer_batch(["a", "b", "c", "a"], np.array([0.5, 0.5, 0.5, 0.1]))
    assert top.best() == [("a", 0.5), ("b", 0.5)]


# --- a tiny model's index ------------------------------------------------
# Mean pooling: the tiny random model's [CLS] pooled outputs are nearly
# parallel (cosines within 1e-5 of each other), too close for a ranking to
# be stable across CPUs; its mean vectors are 0.03 or more apart.


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_model_dir) -> str:
    root = tmp_path_factory.mktemp("index")
    _run("--input", _write(root / "c.jsonl", TEXTS), "--output",
         str(root / "emb"), "--model", tiny_model_dir, "--max_seq_length",
         "32", "--write_text", "--outputs", "pooled", "--pooling", "mean",
         "--parquet_row_group_rows", "3")  # several row groups per file
    return str(root / "emb")


def test_each_document_finds_itself_first(index):
    for doc_id, text in TEXTS.items():
        hits = query_index(index, text, top_k=3)
        assert hits[0].id == doc_id
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[0].text == text
        assert len(hits) == 3 and len({h.id for h in hits}) == 3


def test_search_equals_brute_force(index):
    manifest = json.loads(open(index + "-manifest.json").read())
    query = embed_texts(["客服服务不错"], index=index)[0]
    expected = _brute_force(index + "-manifest.json", query)
    for k in (1, 4, len(TEXTS) + 5):
        _assert_top_k(search(manifest, query, k, "embeddings", rows=3),
                      expected, k)


def test_cli_prints_score_id_text(index, capsys):
    text = TEXTS["d1"]
    assert main(["--index", index + "-manifest.json", "--text", text,
                 "--top_k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    score, doc_id, shown = lines[0].split("\t")
    assert (doc_id, shown) == ("d1", text) and float(score) > 0.9999
    assert main(["--index", index, "--text", text, "--top_k", "1",
                 "--json"]) == 0
    hit = json.loads(capsys.readouterr().out)
    assert hit["id"] == "d1" and hit["text"] == text


@pytest.mark.parametrize("flags, message", [
    (["--pooling", "cls"], "holds pooling mean vectors, not cls"),
    (["--model", "DEMO"], "differs from the index's"),
    (["--top_k", "0"], "--top_k must be at least 1"),
    (["--rows", "documents"], "no document vectors"),
    (["--top_k", "x"], "invalid int value"),
])
def test_refused_queries(index, capsys, flags, message):
    from model.demo import ensure_demo_model
    flags = [ensure_demo_model() if f == "DEMO" else f for f in flags]
    assert main(["--index", index, "--text", "你好", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 1
    assert any(message in line for line in err), err


def test_missing_index_is_a_usage_error(tmp_path, capsys):
    assert main(["--index", str(tmp_path / "nothing"), "--text", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "manifest" in err[-1]


def test_embed_texts_with_an_index_refuses_other_settings(index,
                                                          tiny_model_dir):
    same = embed_texts(["你好"], index=index)
    np.testing.assert_allclose(
        same, embed_texts(["你好"], model=tiny_model_dir, max_seq_length=32,
                          pooling="mean", precision="auto"), atol=1e-6)
    with pytest.raises(IndexMismatch, match="pooling"):
        embed_texts(["你好"], index=index, pooling="first_last_avg")
    with pytest.raises(IndexMismatch, match="normalized"):
        embed_texts(["你好"], index=index, normalize=True)
    with pytest.raises(IndexMismatch, match="fingerprint"):
        embed_texts(["你好"], index=index, max_seq_length=16)


# --- incremental indexes (several segments), TFRecord --------------------


def test_incremental_index_searches_current_rows_only(tmp_path,
                                                      tiny_model_dir,
                                                      capsys):
    common = ["--model", tiny_model_dir, "--max_seq_length", "32",
              "--format", "tfrecord", "--write_text", "--outputs", "pooled",
              "--pooling", "mean", "--normalize"]
    _run("--input", _write(tmp_path / "a.jsonl", TEXTS), "--output",
         str(tmp_path / "one/emb"), *common)
    second = dict(TEXTS)
    old_text = second["d1"]
    second["d1"] = "房间很大，早餐丰富。"  # changed
    del second["d2"]  # deleted
    second["new"] = "快递很快，包装完好。"
    _run("--input", _write(tmp_path / "b.jsonl", second), "--output",
         str(tmp_path / "two/emb"), "--previous_index",
         str(tmp_path / "one/emb"), *common)
    index = str(tmp_path / "two/emb")
    manifest = json.loads(open(index + "-manifest.json").read())
    assert len(manifest["index"]["segments"]) == 2
    query = embed_texts([old_text], index=index)[0]
    expected = _brute_force(index + "-manifest.json", query)
    got = search(manifest, query, 50, "embeddings")
    _assert_top_k(got, expected, 50)
    assert sorted(k[0] for k, _ in got) == sorted(second)
    hits = query_index(index, second["d1"], top_k=len(second))
    assert hits[0].id == "d1" and hits[0].text == second["d1"]
    assert {h.id: h.text for h in hits} == second
    # A file of the older segment gone: the index no longer holds.
    for path in (tmp_path / "one").glob("emb-0*.tfrecord"):
        path.unlink()
    assert main(["--index", index, "--text", "你好"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "cannot be read" in err[-1]


# --- chunked runs --------------------------------------------------------


def test_chunked_documents_find_themselves(tmp_path, tiny_model_dir):
    _run("--input", _write(tmp_path / "c.jsonl", TEXTS), "--output",
         str(tmp_path / "emb"), "--model", tiny_model_dir,
         "--max_seq_length", "12", "--long_text", "chunk",
         "--document_vectors", "--write_text", "--outputs", "pooled",
         "--pooling", "mean")
    index = str(tmp_path / "emb")
    long_id = max(TEXTS, key=lambda k: len(TEXTS[k]))
    for rows in ("auto", "embeddings"):
        hits = query_index(index, TEXTS[long_id], top_k=3, rows=rows)
        assert hits[0].id == long_id
        assert hits[0].text == TEXTS[long_id]
    # Document vectors: the query is averaged over its chunks like them.
    hits = query_index(index, TEXTS[long_id], top_k=1, rows="documents")
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)


# --- the real corpus, demo model -----------------------------------------

CORPUS = SHARED_ASSETS / "corpus"


@pytest.mark.skipif(not list(CORPUS.glob("*.jsonl")),
                    reason="shared corpus not present")
def test_real_corpus_documents_retrieve_themselves(tmp_path, capsys):
    docs: dict[str, str] = {}
    seen: set[str] = set()
    for path in sorted(CORPUS.glob("*.jsonl")):
        taken = 0
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                text = record.get("text") or ""
                if not text.strip() or text in seen:
                    continue  # one document per text: top-1 is unique
                seen.add(text)
                docs[str(record["id"])] = text
                taken += 1
                if taken == 100:
                    break
    corpus = _write(tmp_path / "corpus.jsonl", docs)
    _run("--input", corpus, "--output", str(tmp_path / "emb"),
         "--write_text", "--outputs", "pooled", "--pooling", "mean",
         "--normalize", "--max_seq_length", "128")
    capsys.readouterr()
    index = str(tmp_path / "emb")
    rng = np.random.default_rng(20)
    sample = rng.choice(sorted(docs), size=20, replace=False)
    for doc_id in sample:
        hits = query_index(index, docs[doc_id], top_k=5)
        assert hits[0].id == doc_id, (doc_id, hits[:2])
    assert main(["--index", index, "--text", docs[sample[0]], "--top_k",
                 "3", "--text_chars", "20"]) == 0
    first = capsys.readouterr().out.splitlines()[0].split("\t")
    assert first[1] == sample[0] and len(first[2]) <= 20
