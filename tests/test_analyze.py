"""Corpus analysis: the tf.Transform report against lengths computed here."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from pipeline.analyze import (CANDIDATE_LENGTHS, QUANTILE_PERCENTS, main,
                              recommend_bucket_boundaries,
                              recommend_max_seq_length, resolve_analysis, run)
from transforms.tokenization import UNK_TOKEN, BertWordPieceTokenizer

MAX_SEQ_LENGTH = 64
NUM_BUCKETS = 4
# A CJK ideograph that is not in the small vocabulary: one [UNK] each.
UNKNOWN_CHAR = "龘"
REPORT_KEYS = {
    "documents", "empty_documents", "failed_documents",
    "token_length_quantiles", "mean_tokens", "max_tokens", "max_seq_length",
    "truncated_documents", "truncated_share", "unk_rate",
    "length_coverage_target", "recommended_max_seq_length",
    "recommended_max_seq_length_coverage", "num_buckets",
    "recommended_bucket_boundaries", "token_length_histogram",
    "vocab_file", "do_lower_case"}


def _corpus_texts() -> list[str]:
    """Chinese lines of many lengths, some [UNK]s, empty and blank lines."""
    rng = random.Random(5)
    alphabet = "今天天气很好我们去公园散步这家酒店的服务非常房间干净"
    texts = []
    for i in range(240):
        length = rng.choice([rng.randint(1, 40), rng.randint(40, 120)])
        chars = [rng.choice(alphabet) for _ in range(length)]
        if i % 7 == 0:
            chars[rng.randrange(length)] = UNKNOWN_CHAR
        texts.append("".join(chars))
    texts += ["", "   \t ", "Python version 3.11, café!", UNKNOWN_CHAR * 3]
    return texts


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory, small_vocab) -> Path:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(small_vocab) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def analysis(tmp_path_factory, vocab_file):
    """One analysis run over a text file plus a JSONL file (with one
    malformed line), and the per-document values computed directly."""
    folder = tmp_path_factory.mktemp("corpus")
    texts = _corpus_texts()
    half = len(texts) // 2
    (folder / "a.txt").write_text("\n".join(texts[:half]) + "\n",
                                  encoding="utf-8")
    with (folder / "b.jsonl").open("w", encoding="utf-8") as handle:
        for i, text in enumerate(texts[half:]):
            handle.write(json.dumps({"id": f"b{i}", "body": text},
                                    ensure_ascii=False) + "\n")
        handle.write("{not json\n")
    report_path = folder / "report.json"
    report = run([
        "--input", str(folder / "*.txt"), "--input", str(folder / "*.jsonl"),
        "--text_field", "body", "--vocab_file", str(vocab_file),
        "--max_seq_length", str(MAX_SEQ_LENGTH),
        "--num_buckets", str(NUM_BUCKETS), "--output", str(report_path)])
    return report, report_path, _expected(texts, vocab_file)


def _expected(texts: list[str], vocab_file: Path) -> dict:
    """Lengths and [UNK] counts straight from our tokenizer."""
    vocab = vocab_file.read_text(encoding="utf-8").splitlines()
    tokenizer = BertWordPieceTokenizer(vocab, do_lower_case=True)
    pieces = [tokenizer.tokenize(t) for t in texts]
    nonempty = [p for p in pieces if p]
    return {
        "documents": len(texts),
        "empty": len(texts) - len(nonempty),
        "lengths": np.array([len(p) + 2 for p in nonempty]),
        "unk": sum(p.count(UNK_TOKEN) for p in pieces),
        "wordpieces": sum(len(p) for p in pieces),
    }


def test_counts_match_the_tokenizer_exactly(analysis):
    report, _, expected = analysis
    lengths = expected["lengths"]
    assert report["documents"] == expected["documents"]
    assert report["empty_documents"] == expected["empty"] == 2
    assert report["failed_documents"] == 1  # the malformed JSONL line
    assert report["max_tokens"] == lengths.max()
    assert report["mean_tokens"] == pytest.approx(lengths.mean())
    truncated = int(np.sum(lengths > MAX_SEQ_LENGTH))
    assert 0 < truncated < len(lengths)
    assert report["truncated_documents"] == truncated
    assert report["truncated_share"] == pytest.approx(truncated / len(lengths))
    assert expected["unk"] > 0
    assert report["unk_rate"] == pytest.approx(
        expected["unk"] / expected["wordpieces"])


def test_quantiles_are_within_the_approximation_tolerance(analysis):
    report, _, expected = analysis
    lengths = expected["lengths"]
    quantiles = report["token_length_quantiles"]
    assert list(quantiles) == [f"p{p}" for p in QUANTILE_PERCENTS]
    values = list(quantiles.values())
    assert values == sorted(values)
    tolerance = 0.01 + 1 / len(lengths)
    for percent in QUANTILE_PERCENTS:
        value = quantiles[f"p{percent}"]
        rank = percent / 100
        # value is a rank-`rank` quantile: about that share lies below it.
        assert np.mean(lengths < value) <= rank + tolerance, percent
        assert np.mean(lengths <= value) >= rank - tolerance, percent


def test_recommendations_follow_the_rules(analysis):
    report, _, expected = analysis
    lengths = expected["lengths"]
    covering = [n for n in CANDIDATE_LENGTHS if np.mean(lengths <= n) >= 0.99]
    assert report["recommended_max_seq_length"] == covering[0]
    assert report["recommended_max_seq_length_coverage"] == pytest.approx(
        np.mean(lengths <= covering[0]))
    boundaries = report["recommended_bucket_boundaries"]
    assert boundaries, "a corpus of many lengths gets boundaries"
    assert boundaries == sorted(set(boundaries))
    assert len(boundaries) <= NUM_BUCKETS - 1
    assert all(b > 0 and b % 8 == 0 for b in boundaries)
    assert boundaries[-1] <= report["recommended_max_seq_length"]


def test_json_file_holds_the_report(analysis):
    report, report_path, _ = analysis
    written = json.loads(report_path.read_text(encoding="utf-8"))
    assert written == report
    assert set(written) == REPORT_KEYS
    assert written["max_seq_length"] == MAX_SEQ_LENGTH


def test_corpus_of_only_empty_documents(tmp_path, vocab_file):
    (tmp_path / "blank.txt").write_text("\n  \n\t\n", encoding="utf-8")
    report = run(["--input", str(tmp_path / "blank.txt"),
                  "--vocab_file", str(vocab_file)])
    assert report["documents"] == report["empty_documents"] == 3
    assert report["token_length_quantiles"] == {}
    assert report["mean_tokens"] is None
    assert report["truncated_share"] == 0.0
    assert report["recommended_bucket_boundaries"] == []


def test_input_matching_nothing_is_a_clear_error(tmp_path, capsys):
    code = main(["--input", str(tmp_path / "missing-*.txt")])
    assert code == 2
    err = capsys.readouterr().err
    assert "matched no files" in err and "missing-*.txt" in err


def test_tokenizer_settings_come_from_the_model_with_overrides(
        tmp_path, tiny_model_dir, vocab_file):
    (tmp_path / "a.txt").write_text("今天\n", encoding="utf-8")
    pattern = str(tmp_path / "a.txt")
    config, demo = resolve_analysis_from(["--input", pattern,
                                        "--model", tiny_model_dir])
    assert not demo and config.do_lower_case
    assert config.vocab_path.startswith(tiny_model_dir)
    config, _ = resolve_analysis_from(["--input", pattern, "--model",
                                     tiny_model_dir, "--do_lower_case",
                                     "false", "--vocab_file",
                                     str(vocab_file)])
    assert not config.do_lower_case
    assert config.vocab_path == str(vocab_file)


def resolve_analysis_from(argv: list[str]):
    """``resolve_analysis`` on parsed flags, as ``run`` calls it."""
    from apache_beam.options.pipeline_options import PipelineOptions
    return resolve_analysis(PipelineOptions(argv))


def test_max_seq_length_recommendation_rule():
    n = len(CANDIDATE_LENGTHS)
    # 100 documents; 98 fit in 32 tokens, all 100 in 64.
    fits = [98] + [100] * (n - 1)
    assert recommend_max_seq_length(fits, 100) == (64, 1.0)
    assert recommend_max_seq_length(fits, 100, coverage=0.98) == (32, 0.98)
    # Nothing reaches the target: capped at 512.
    assert recommend_max_seq_length([10] * n, 100) == (512, 0.1)


def test_bucket_boundary_rule():
    quantiles = [3.0, 9.0, 15.0, 16.0, 90.0, 300.0]
    # Rounded up to multiples of 8 and deduplicated; 304 > 128 dropped.
    assert recommend_bucket_boundaries(quantiles, 7, 128) == [8, 16, 96]
    assert recommend_bucket_boundaries(quantiles, 3, 128) == [8, 16]
    assert recommend_bucket_boundaries(quantiles, 1, 128) == []
    assert recommend_bucket_boundaries([float("nan")], 4, 128) == []
