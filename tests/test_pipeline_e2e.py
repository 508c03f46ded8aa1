"""End-to-end runs of ``pipeline.run`` on the DirectRunner with a tiny model.

Each run's output is read back from disk and checked against a direct call
of the same SavedModel on the same token ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from model import load as model_load
from pipeline.read_embeddings import load_embeddings
from pipeline.run import main, run
from tests.conftest import E2E_TEXTS
from transforms.identity import content_hash
from transforms.tokenization import BertWordPieceTokenizer

MAX_SEQ = 32


def _run(corpus: Path, out: Path, model_dir: str, *extra: str):
    # TensorFlow float32 through XLA, as these runs were written for
    # (tests/test_openvino_engine.py runs the OpenVINO engine end to end).
    return run([
        "--input", str(corpus), "--output", str(out), "--model", model_dir,
        "--max_seq_length", str(MAX_SEQ), "--batch_size", "3",
        "--engine", "tensorflow", "--precision", "float32", "--xla", "on",
        "--runner", "DirectRunner", *extra])


def _expected(model_dir: str, vocab: list[str]) -> dict[str, tuple]:
    """Reference outputs: one unpadded, unbatched model call per document."""
    model = tf.saved_model.load(model_dir)
    tokenizer = BertWordPieceTokenizer(vocab, do_lower_case=True)
    expected = {}
    for i, text in enumerate(E2E_TEXTS):
        if not text.strip():
            continue
        pieces = tokenizer.tokenize(text)
        ids = tokenizer.convert_tokens_to_ids(
            ["[CLS]"] + pieces[:MAX_SEQ - 2] + ["[SEP]"])
        ids_t = tf.constant([ids], tf.int32)
        pooled, sequence = model([ids_t, tf.ones_like(ids_t),
                                  tf.zeros_like(ids_t)])
        expected[f"doc-{i}"] = (ids, len(pieces) > MAX_SEQ - 2,
                                pooled.numpy()[0], sequence.numpy()[0])
    return expected


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, small_vocab):
    """Parquet and TFRecord runs over the same corpus (through XLA, the
    default), and a Parquet run without XLA."""
    root = tmp_path_factory.mktemp("e2e")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(
        json.dumps({"id": f"doc-{i}", "text": t}, ensure_ascii=False) + "\n"
        for i, t in enumerate(E2E_TEXTS)), encoding="utf-8")
    parquet = _run(corpus, root / "pq" / "emb", tiny_model_dir)
    tfrecord = _run(corpus, root / "tfr" / "emb", tiny_model_dir,
                    "--format", "tfrecord")
    _run(corpus, root / "noxla" / "emb", tiny_model_dir, "--xla", "off")
    return {
        "parquet": (parquet, load_embeddings(str(root / "pq" / "emb-*.parquet"))),
        "tfrecord": (tfrecord,
                     load_embeddings(str(root / "tfr" / "emb-*.tfrecord"))),
        "parquet_noxla": (None, load_embeddings(
            str(root / "noxla" / "emb-*.parquet"))),
        "expected": _expected(tiny_model_dir, small_vocab),
        "root": root,
    }


@pytest.mark.parametrize("fmt", ["parquet", "tfrecord", "parquet_noxla"])
def test_every_document_once_with_model_outputs(runs, fmt):
    _, emb = runs[fmt]
    expected = runs["expected"]
    assert emb.ids == sorted(expected)  # each non-empty doc exactly once
    for row, doc_id in enumerate(emb.ids):
        ids, truncated, pooled, sequence = expected[doc_id]
        assert emb.num_tokens[row] == len(ids)
        assert bool(emb.truncated[row]) == truncated
        np.testing.assert_allclose(emb.pooled_output[row], pooled, atol=1e-5)
        # One row per real token: no padding rows were written.
        assert emb.sequence_output[row].shape == sequence.shape
        np.testing.assert_allclose(emb.sequence_output[row], sequence,
                                   atol=1e-5)


def test_long_document_is_truncated_to_max_seq_length(runs):
    _, emb = runs["parquet"]
    row = emb.ids.index("doc-6")
    assert emb.truncated[row] and emb.num_tokens[row] == MAX_SEQ
    assert int(emb.truncated.sum()) == 1


def test_parquet_and_tfrecord_hold_the_same_rows(runs):
    _, a = runs["parquet"]
    _, b = runs["tfrecord"]
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.num_tokens, b.num_tokens)
    np.testing.assert_array_equal(a.truncated, b.truncated)
    np.testing.assert_array_equal(a.pooled_output, b.pooled_output)
    for x, y in zip(a.sequence_output, b.sequence_output):
        np.testing.assert_array_equal(x, y)


def test_empty_documents_are_counted_as_skipped(runs):
    summary, _ = runs["parquet"]
    c = summary.counts
    assert c["documents_read"] == len(E2E_TEXTS)
    assert c["documents_skipped_empty"] == 2  # "" and whitespace-only
    assert c["documents_embedded"] == len(E2E_TEXTS) - 2
    assert c["documents_failed"] == 0
    assert c["documents_truncated"] == 1
    expected_tokens = sum(len(v[0]) for v in runs["expected"].values())
    assert c["tokens_embedded"] == expected_tokens
    assert summary.reconciled


def test_summary_json_and_output_listing(runs):
    summary, _ = runs["parquet"]
    written = json.loads(
        (runs["root"] / "pq" / "emb-summary.json").read_text("utf-8"))
    assert written["counts"] == summary.counts
    assert written["reconciled"] is True
    assert written["outputs"]["embeddings"] == summary.outputs["embeddings"]
    assert all(p.endswith(".parquet") for p in written["outputs"]["embeddings"])


def test_parquet_schema_is_explicit(runs, tiny_model_dir):
    _, _ = runs["parquet"]
    files = sorted((runs["root"] / "pq").glob("emb-*-of-*.parquet"))
    schema = pq.read_schema(files[0])
    assert str(schema.field("pooled_output").type) == \
        "fixed_size_list<item: float>[32]"
    assert str(schema.field("sequence_output").type) == \
        "list<item: fixed_size_list<item: float>[32]>"
    assert str(schema.field("num_tokens").type) == "int32"


def test_model_loaded_once_per_process_with_many_threads(
        tmp_path, tiny_model_dir):
    """Four worker threads, many bundles: one model load in this process."""
    corpus = tmp_path / "many.txt"
    corpus.write_text("".join(f"第{i}篇文档，测试模型只加载一次。\n"
                              for i in range(60)), encoding="utf-8")
    before = model_load.load_count()
    summary = _run(corpus, tmp_path / "out" / "emb", tiny_model_dir,
                   "--direct_num_workers", "4",
                   "--direct_running_mode", "multi_threading",
                   "--outputs", "pooled")
    assert summary.counts["documents_embedded"] == 60
    assert model_load.load_count() - before == 1
    assert summary.model_loads == 1


def test_plain_text_ids_and_pooled_only(tmp_path, tiny_model_dir):
    corpus = tmp_path / "lines.txt"
    corpus.write_text("今天天气很好。\n\n客服回复很及时。\n", encoding="utf-8")
    summary = _run(corpus, tmp_path / "out" / "emb", tiny_model_dir,
                   "--outputs", "pooled")
    emb = load_embeddings(str(tmp_path / "out" / "emb-*.parquet"))
    # Ids derived from the file name and the content, not the line number.
    assert emb.ids == sorted(f"lines.txt:{content_hash(t)[:16]}"
                             for t in ("今天天气很好。", "客服回复很及时。"))
    assert emb.sequence_output is None and emb.pooled_output.shape == (2, 32)
    assert summary.counts["documents_skipped_empty"] == 1


def test_bad_json_lines_become_dead_letters(tmp_path, tiny_model_dir):
    corpus = tmp_path / "mixed.jsonl"
    corpus.write_text(
        '{"id": "ok", "text": "今天天气很好"}\n'
        '{"id": "broken", "text": \n'
        '{"id": "no-text"}\n'
        '{"id": "number", "text": 42}\n'
        '["not", "an", "object"]\n', encoding="utf-8")
    summary = _run(corpus, tmp_path / "out" / "emb", tiny_model_dir)
    c = summary.counts
    assert (c["documents_read"], c["documents_embedded"],
            c["documents_failed"]) == (5, 1, 4)
    assert summary.reconciled
    errors = [json.loads(line) for path in summary.outputs["errors"]
              for line in Path(path).read_text("utf-8").splitlines()]
    reasons = sorted((e["line"], e["reason"].split(":")[0]) for e in errors)
    assert reasons == [(2, "malformed JSON"), (3, "missing text field 'text'"),
                       (4, "text field 'text' is int, not a string"),
                       (5, "JSON line is not an object")]
    assert all(e["source"].endswith("mixed.jsonl") for e in errors)


def test_undecodable_line_is_a_dead_letter(tmp_path, tiny_model_dir):
    corpus = tmp_path / "bytes.txt"
    corpus.write_bytes("今天天气很好\n".encode() + b"\xff\xfe bad\n")
    summary = _run(corpus, tmp_path / "out" / "emb", tiny_model_dir)
    assert summary.counts["documents_embedded"] == 1
    assert summary.counts["documents_failed"] == 1
    error = json.loads(Path(summary.outputs["errors"][0]).read_text("utf-8"))
    assert error["reason"].startswith("not valid UTF-8")
    assert error["line"] == 2


def test_help_documents_every_option(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--input", "--input_format", "--id_field", "--text_field",
                 "--output", "--model", "--vocab_file", "--do_lower_case",
                 "--format", "--max_seq_length", "--batch_size", "--outputs",
                 "--num_shards", "--runner"):
        assert flag in text, flag


def test_clear_errors_for_bad_usage(tmp_path, tiny_model_dir, capsys):
    assert main(["--input", str(tmp_path / "nothing-*.txt"),
                 "--output", str(tmp_path / "o"),
                 "--model", tiny_model_dir]) == 2
    assert "matched no files" in capsys.readouterr().err
    corpus = tmp_path / "c.txt"
    corpus.write_text("你好\n", encoding="utf-8")
    assert main(["--input", str(corpus), "--output", str(tmp_path / "o"),
                 "--model", str(tmp_path)]) == 2
    assert "not a SavedModel" in capsys.readouterr().err
    assert main(["--input", str(corpus)]) == 2
    assert "--output is required" in capsys.readouterr().err


def test_model_loaded_once_per_process_with_two_processes(
        tmp_path, tiny_model_dir):
    """Two worker processes, many small batches: at most one load each."""
    corpus = tmp_path / "many.txt"
    corpus.write_text("".join(f"第{i}篇文档，多进程测试。\n" for i in range(120)),
                      encoding="utf-8")
    summary = _run(corpus, tmp_path / "out" / "emb", tiny_model_dir,
                   "--direct_num_workers", "2",
                   "--direct_running_mode", "multi_processing",
                   "--outputs", "pooled")
    assert summary.counts["documents_embedded"] == 120
    assert 1 <= summary.model_loads <= 2
    emb = load_embeddings(str(tmp_path / "out" / "emb-*.parquet"))
    assert sorted(emb.ids) == sorted(
        f"many.txt:{content_hash(f'第{i}篇文档，多进程测试。')[:16]}"
        for i in range(120))


def test_models_that_do_not_fit_fail_before_the_run(tmp_path, tiny_model_dir,
                                                    capsys):
    import tensorflow as tf
    corpus = tmp_path / "c.txt"
    corpus.write_text("你好\n", encoding="utf-8")
    not_bert = tf.Module()
    not_bert.f = tf.function(lambda x: x * 2, input_signature=[
        tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(not_bert, str(tmp_path / "not_bert"))
    args = ["--input", str(corpus), "--output", str(tmp_path / "o")]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n你\n好\n", encoding="utf-8")
    assert main(args + ["--model", str(tmp_path / "not_bert"),
                        "--vocab_file", str(vocab)]) == 2
    err = capsys.readouterr().err
    assert "has no BERT interface" in err
    assert len(err.strip().splitlines()) == 1
    assert main(args + ["--model", tiny_model_dir,
                        "--vocab_file", str(vocab)]) == 2
    err = capsys.readouterr().err
    assert "the vocabulary has 6 entries" in err
    assert len(err.strip().splitlines()) == 1


def test_run_takes_bucket_boundaries_from_an_analysis_report(
        tmp_path, tiny_model_dir, e2e_corpus, capsys):
    from apache_beam.options.pipeline_options import PipelineOptions
    from pipeline.options import EmbedOptions
    from pipeline.run import resolve_job
    report = tmp_path / "analysis.json"
    report.write_text(json.dumps({"recommended_bucket_boundaries": [8, 16]}))
    base = ["--input", str(e2e_corpus), "--output", str(tmp_path / "o"),
            "--model", tiny_model_dir]
    config = resolve_job(PipelineOptions(
        base + ["--analysis", str(report)]).view_as(EmbedOptions)).config
    assert list(config.batch.bucket_boundaries) == [8, 16]
    config = resolve_job(PipelineOptions(
        base + ["--analysis", str(report), "--bucket_boundaries", "4,40"]
    ).view_as(EmbedOptions)).config
    assert list(config.batch.bucket_boundaries) == [4, 40]
    summary = _run(e2e_corpus, tmp_path / "out" / "emb", tiny_model_dir,
                   "--analysis", str(report))
    assert summary.reconciled
    assert summary.counts["documents_embedded"] == len(E2E_TEXTS) - 2
    assert main(base + ["--analysis", str(tmp_path / "missing.json")]) == 2
    assert "not a readable analysis report" in capsys.readouterr().err


def test_analysis_report_with_unusable_boundaries_is_a_usage_error(
        tmp_path, tiny_model_dir, e2e_corpus, capsys):
    report = tmp_path / "analysis.json"
    report.write_text(json.dumps({"recommended_bucket_boundaries": [16, 8]}))
    assert main(["--input", str(e2e_corpus), "--output", str(tmp_path / "o"),
                 "--model", tiny_model_dir, "--analysis", str(report)]) == 2
    assert "not a readable analysis report" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # argparse rejects the flag
        main(["--input", str(e2e_corpus), "--output", str(tmp_path / "o"),
              "--model", tiny_model_dir, "--bucket_boundaries", "8,8"])
    assert exited.value.code == 2
    assert "positive, increasing integers" in capsys.readouterr().err
