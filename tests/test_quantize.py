"""``python -m model.quantize`` end to end on a tiny model, and the runs
that use its int8 model."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("openvino", reason="openvino is not installed")
pytest.importorskip("nncf", reason="nncf (the int8 extra) is not installed")

from model import openvino_engine  # noqa: E402
from model.self_check import cosines  # noqa: E402
from model.load import load_bert_saved_model  # noqa: E402
from model.quantize import main  # noqa: E402
from pipeline.run import EXIT_USAGE, run  # noqa: E402
from pipeline.run import main as run_main  # noqa: E402
from tests.conftest import E2E_TEXTS  # noqa: E402

SAMPLES, EVAL = 24, 12


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """Documents made of the tiny vocabulary's text, of varied lengths."""
    texts = [t for t in E2E_TEXTS if t.strip()]
    path = tmp_path_factory.mktemp("calibration") / "calibration.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for i in range(SAMPLES + EVAL + 4):
            text = texts[i % len(texts)] + texts[(3 * i + 1) % len(texts)][
                :i % 17]
            handle.write(json.dumps({"id": f"c{i}", "text": text},
                                    ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, calibration, tiny_model_dir):
    out = tmp_path_factory.mktemp("int8") / "tiny_int8"
    code = main(["--model", tiny_model_dir, "--calibration",
                 str(calibration), "--samples", str(SAMPLES),
                 "--eval_samples", str(EVAL), "--max_seq_length", "32",
                 "--output", str(out)])
    assert code == 0
    return out


def test_the_tool_writes_an_int8_ir_and_what_it_was_made_from(
        quantized, calibration, tiny_model_dir):
    assert (quantized / "model.xml").exists()
    assert (quantized / "model.bin").exists()
    info = json.loads((quantized / "int8.json").read_text())
    assert info["source_digest"] == \
        openvino_engine.model_digest(tiny_model_dir)
    assert info["calibration"]["documents"] == SAMPLES
    assert info["calibration"]["files"] == [str(calibration)]
    assert info["calibration"]["smooth_quant"] is False
    # Which preset meets the target depends on the CPU's int8 kernels
    # (AMX/VNNI or AVX2); the order they are tried in is tested below.
    assert info["calibration"]["preset"] in ("performance", "mixed")
    accuracy = info["accuracy"]
    assert accuracy["documents"] == EVAL
    assert min(accuracy["pooled_cosine_min"],
               accuracy["mean_pooled_cosine_min"]) >= accuracy["target"]
    # The IR really holds quantized operations.
    assert "FakeQuantize" in (quantized / "model.xml").read_text() or \
        "FakeConvert" in (quantized / "model.xml").read_text()


def test_the_int8_model_runs_close_to_float32(quantized, tiny_model_dir):
    model = openvino_engine.load_openvino_model(
        tiny_model_dir, "int8", int8_model=str(quantized))
    assert model.precision == "int8"
    ids = np.array([[101, 110, 120, 130, 140, 102]], np.int32)
    args = (ids, np.ones_like(ids), np.zeros_like(ids))
    pooled, _ = model(*args)
    want, _ = load_bert_saved_model(tiny_model_dir)(*args)
    assert cosines(pooled, want)[0] >= 0.99
    assert not np.array_equal(pooled, want)


def test_an_int8_worker_never_imports_tensorflow(quantized, tiny_model_dir):
    """int8.json records the model's input limits, so an int8 worker (with
    no converted IR of the float model on its machine) reads neither them
    nor int8.json through TensorFlow."""
    from model.variables import read_model_limits
    from tests.test_openvino_engine import run_without_tensorflow
    info = json.loads((quantized / "int8.json").read_text())
    want = read_model_limits(tiny_model_dir).__dict__
    assert info["limits"] == want
    entry = openvino_engine.ir_cache_dir(
        openvino_engine.model_digest(tiny_model_dir))
    import shutil
    shutil.rmtree(entry, ignore_errors=True)  # as on a fresh worker
    got = run_without_tensorflow(tiny_model_dir, "openvino", "int8",
                                 str(quantized))
    assert got["precision"] == "int8" and got["limits"] == want
    model = openvino_engine.load_openvino_model(
        tiny_model_dir, "int8", int8_model=str(quantized))
    ids = np.array([[101, 104, 105, 102]], np.int32)
    np.testing.assert_allclose(got["pooled"], model(
        ids, np.ones_like(ids), np.zeros_like(ids))[0][0], atol=1e-6)


def test_an_int8_model_on_a_tensorflow_file_system(quantized,
                                                  tiny_model_dir):
    """A gs:// int8 model (tested on TensorFlow's ram:// file system) is
    checked where it is and copied locally for OpenVINO to read."""
    import tensorflow as tf
    remote = "ram://int8/tiny_int8"
    tf.io.gfile.makedirs(remote)
    for path in quantized.iterdir():
        tf.io.gfile.copy(str(path), f"{remote}/{path.name}", overwrite=True)
    assert openvino_engine.find_int8_model(tiny_model_dir, remote) == remote
    model = openvino_engine.load_openvino_model(tiny_model_dir, "int8",
                                                int8_model=remote)
    local = openvino_engine.load_openvino_model(
        tiny_model_dir, "int8", int8_model=str(quantized))
    ids = np.array([[101, 110, 120, 102]], np.int32)
    args = (ids, np.ones_like(ids), np.zeros_like(ids))
    np.testing.assert_array_equal(model(*args)[0], local(*args)[0])


def test_a_run_with_int8(quantized, tiny_model_dir, e2e_corpus, tmp_path):
    common = ["--input", str(e2e_corpus), "--model", tiny_model_dir,
              "--max_seq_length", "32", "--runner", "DirectRunner"]
    int8 = run(common + ["--output", str(tmp_path / "a" / "emb"),
                         "--precision", "int8", "--int8_model",
                         str(quantized)])
    assert int8.reconciled
    assert int8.counts["documents_embedded"] == len(E2E_TEXTS) - 2
    f32 = run(common + ["--output", str(tmp_path / "b" / "emb"),
                        "--precision", "float32"])
    # int8 vectors are other vectors: an incremental run must not mix them.
    assert int8.model_fingerprint != f32.model_fingerprint


def test_int8_of_another_model_is_refused(quantized, tmp_path, e2e_corpus,
                                          small_vocab, capsys):
    from model.bert import BertConfig
    from model.export import export_bert_saved_model
    config = BertConfig(vocab_size=len(small_vocab), hidden_size=32,
                        num_layers=2, num_heads=4, intermediate_size=64,
                        max_position_embeddings=128)
    other = export_bert_saved_model(str(tmp_path / "other"), config,
                                    small_vocab, seed=99)
    assert run_main(["--input", str(e2e_corpus), "--output",
                     str(tmp_path / "o"), "--model", other,
                     "--max_seq_length", "32", "--precision", "int8",
                     "--int8_model", str(quantized)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quantized from another model" in err[0]


def test_default_output_is_the_cache_a_run_finds(tmp_path, calibration,
                                                 small_vocab, e2e_corpus,
                                                 monkeypatch):
    from model.bert import BertConfig
    from model.export import export_bert_saved_model
    monkeypatch.setenv("BERT_ZH_EMBED_CACHE", str(tmp_path / "cache"))
    config = BertConfig(vocab_size=len(small_vocab), hidden_size=32,
                        num_layers=1, num_heads=4, intermediate_size=64,
                        max_position_embeddings=64)
    model = export_bert_saved_model(str(tmp_path / "m"), config, small_vocab,
                                    seed=3)
    args = ["--model", model, "--calibration", str(calibration),
            "--samples", "8", "--eval_samples", "4", "--max_seq_length", "32"]
    assert main(args) == 0
    cached = openvino_engine.default_int8_dir(
        openvino_engine.model_digest(model))
    assert (tmp_path / "cache") in __import__("pathlib").Path(
        cached).parents
    summary = run(["--input", str(e2e_corpus), "--output",
                   str(tmp_path / "out" / "emb"), "--model", model,
                   "--max_seq_length", "32", "--precision", "int8"])
    assert summary.reconciled
    assert main(args) == 2  # never overwrites a quantized model


def test_a_model_below_the_target_is_not_written(tmp_path, calibration,
                                                 tiny_model_dir, capsys):
    out = tmp_path / "bad"
    assert main(["--model", tiny_model_dir, "--calibration",
                 str(calibration), "--samples", "8", "--eval_samples", "4",
                 "--max_seq_length", "32", "--min_cosine", "1.01",
                 "--output", str(out)]) == 1
    assert not out.exists() and not list(tmp_path.glob(".bad*"))
    assert "misses --min_cosine 1.01" in capsys.readouterr().err


def test_the_faster_preset_is_kept_only_when_accurate(
        tmp_path, calibration, tiny_model_dir, monkeypatch):
    """When the symmetric (``performance``) int8 model misses the target,
    the asymmetric (``mixed``) one is made, checked and written instead,
    and ``int8.json`` says which."""
    import dataclasses

    from model import quantize
    real = quantize.compare_engines
    presets = []
    original = quantize._quantize

    def record(model, items, preset):
        presets.append(preset)
        return original(model, items, preset)

    def first_misses(reference, candidate, batches):
        stats = real(reference, candidate, batches)
        if len(presets) == 1:
            return dataclasses.replace(stats, pooled_cosine_min=0.5)
        return stats
    monkeypatch.setattr(quantize, "_quantize", record)
    monkeypatch.setattr(quantize, "compare_engines", first_misses)
    out = tmp_path / "int8"
    assert main(["--model", tiny_model_dir, "--calibration",
                 str(calibration), "--samples", "8", "--eval_samples", "4",
                 "--max_seq_length", "32", "--output", str(out)]) == 0
    assert presets == ["performance", "mixed"]
    info = json.loads((out / "int8.json").read_text())
    assert info["calibration"]["preset"] == "mixed"
    assert info["accuracy"]["pooled_cosine_min"] > 0.5


def test_an_accurate_performance_model_is_kept(tmp_path, calibration,
                                              tiny_model_dir, monkeypatch):
    """Symmetric activations (the faster preset) are tried first and kept
    when they meet the target: the asymmetric model is not made."""
    from model import quantize
    presets = []
    original = quantize._quantize

    def record(model, items, preset):
        presets.append(preset)
        return original(model, items, preset)
    monkeypatch.setattr(quantize, "_quantize", record)
    out = tmp_path / "int8"
    assert main(["--model", tiny_model_dir, "--calibration",
                 str(calibration), "--samples", "8", "--eval_samples", "4",
                 "--max_seq_length", "32", "--min_cosine", "0.5",
                 "--output", str(out)]) == 0
    assert presets == ["performance"]
    info = json.loads((out / "int8.json").read_text())
    assert info["calibration"]["preset"] == "performance"


def test_without_nncf_the_tool_says_how_to_get_it(monkeypatch, capsys,
                                                  tiny_model_dir):
    monkeypatch.setitem(sys.modules, "nncf", None)
    assert main(["--model", tiny_model_dir, "--calibration", "x.jsonl"]) == 2
    assert "pip install 'bert-zh-embed[int8]'" in capsys.readouterr().err
