"""The OpenVINO engine: same outputs as TensorFlow, the IR cache, bfloat16
accuracy, and a whole pipeline run on it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("openvino", reason="openvino is not installed")

from model import openvino_engine  # noqa: E402
from model.accuracy import read_texts  # noqa: E402
from model.load import load_bert_saved_model  # noqa: E402
from model.openvino_engine import (OpenVINOBertModel, bf16_note,  # noqa: E402
                                   load_openvino_model)
from model.self_check import (ACCURACY_TARGETS, compare_engines,  # noqa: E402
                              token_batches)
from tests.conftest import E2E_TEXTS, SHARED_ASSETS  # noqa: E402

REAL_VOCAB = SHARED_ASSETS / "bert_zh" / "vocab.txt"
REAL_CORPUS = SHARED_ASSETS / "corpus" / "zh_public_domain.jsonl"


def _batches(seed: int = 0, vocab_size: int = 120):
    """Padded batches of several shapes: rows of different lengths, so
    padding and masking are exercised."""
    rng = np.random.default_rng(seed)
    for batch, width in ((1, 2), (3, 7), (5, 16), (2, 33)):
        lengths = rng.integers(2, width + 1, batch)
        lengths[0] = width
        ids = rng.integers(104, vocab_size, (batch, width)).astype(np.int32)
        ids[:, 0] = 101
        mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
        yield ids * mask, mask, np.zeros_like(ids)


def test_float32_matches_tensorflow(tiny_model_dir, small_vocab):
    model = load_openvino_model(tiny_model_dir, "float32")
    reference = load_bert_saved_model(tiny_model_dir)
    assert model.precision == "float32"
    for ids, mask, segments in _batches(vocab_size=len(small_vocab)):
        pooled, sequence = model(ids, mask, segments)
        want_pooled, want_sequence = reference(ids, mask, segments)
        assert pooled.dtype == sequence.dtype == np.float32
        assert sequence.shape == want_sequence.shape
        np.testing.assert_allclose(pooled, want_pooled, atol=1e-4, rtol=0)
        real = mask.astype(bool)
        np.testing.assert_allclose(sequence[real], want_sequence[real],
                                   atol=1e-4, rtol=0)


def test_bad_input_is_our_one_line_error(tiny_model_dir, small_vocab):
    """What TensorFlow's wrapper refuses, this engine refuses too: above
    all an id past the word table, which OpenVINO would embed as zeros."""
    from model.errors import ModelInputError
    model = load_openvino_model(tiny_model_dir, "float32")
    assert model.limits.vocab_size == len(small_vocab)
    ids = np.ones((2, 4), np.int32)
    for args in ((ids, ids[:, :3], ids), (ids[0], ids[0], ids[0]),
                 (ids[:0], ids[:0], ids[:0]),
                 (ids.astype(np.float32), ids, ids),
                 (ids + len(small_vocab), ids, np.zeros_like(ids)),
                 (ids, ids, ids + 5), (ids, ids * 2, np.zeros_like(ids)),
                 (np.ones((1, 129), np.int32),) * 3):
        with pytest.raises(ModelInputError) as err:
            model(*args)
        assert "\n" not in str(err.value)


def test_only_the_two_bert_outputs_are_kept(tiny_model_dir, small_vocab):
    """The exported signature also returns encoder_outputs (every layer):
    the converted model keeps only pooled_output and sequence_output, so
    no call copies the layers out."""
    import openvino as ov
    raw = {n for port in ov.convert_model(tiny_model_dir).outputs
           for n in port.get_names()}
    assert "encoder_outputs" in raw
    model = openvino_engine.convert(tiny_model_dir)
    assert [sorted(port.get_names()) for port in model.outputs] in (
        [["pooled_output"], ["sequence_output"]],
        [["sequence_output"], ["pooled_output"]])
    compiled = OpenVINOBertModel(tiny_model_dir, openvino_engine._compile(
        ov.Core(), model, "float32", None), "float32")
    reference = load_bert_saved_model(tiny_model_dir)
    for ids, mask, segments in _batches(vocab_size=len(small_vocab)):
        pooled, sequence = compiled(ids, mask, segments)
        want_pooled, want_sequence = reference(ids, mask, segments)
        np.testing.assert_allclose(pooled, want_pooled, atol=1e-4)
        real = mask.astype(bool)
        np.testing.assert_allclose(sequence[real], want_sequence[real],
                                   atol=1e-4)


def test_a_tf_hub_handle_is_resolved_first(tiny_model_dir, tmp_path,
                                           monkeypatch):
    """A handle (here from a pre-filled TF Hub cache, no network) runs on
    OpenVINO like its directory, instead of failing over to TensorFlow."""
    import hashlib
    import shutil
    pytest.importorskip("tensorflow_hub")
    handle = "https://tfhub.dev/tensorflow/bert_zh_L-12_H-768_A-12/1"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    shutil.copytree(tiny_model_dir, tmp_path / hashlib.sha1(
        handle.encode("utf-8")).hexdigest())
    model = load_openvino_model(handle, "float32")
    ids, mask, segments = next(_batches(seed=2))
    np.testing.assert_allclose(model(ids, mask, segments)[0],
                               load_bert_saved_model(tiny_model_dir)(
                                   ids, mask, segments)[0], atol=1e-4)


def test_the_ir_is_converted_once_and_cached(tiny_model_dir, monkeypatch):
    digest = openvino_engine.model_digest(tiny_model_dir)
    entry = openvino_engine.ir_cache_dir(digest)
    load_openvino_model(tiny_model_dir, "float32")
    assert sorted(os.listdir(entry))[:3] == ["info.json", "model.bin",
                                             "model.xml"]
    info = json.loads(open(os.path.join(entry, "info.json")).read())
    assert info["digest"] == digest
    assert info["openvino"] == openvino_engine.openvino_version()
    # No half-built entries are left beside it.
    assert not [n for n in os.listdir(os.path.dirname(entry))
                if n.startswith(".")]

    def no_conversion(model_dir):
        raise AssertionError("converted again")

    monkeypatch.setattr(openvino_engine, "convert", no_conversion)
    again = load_openvino_model(tiny_model_dir, "float32")
    ids, mask, segments = next(_batches())
    np.testing.assert_allclose(again(ids, mask, segments)[0],
                               load_bert_saved_model(tiny_model_dir)(
                                   ids, mask, segments)[0], atol=1e-4)


def test_cache_key_follows_the_weights(tmp_path, small_vocab,
                                       tiny_model_dir):
    from model.bert import BertConfig
    from model.export import export_bert_saved_model
    config = BertConfig(vocab_size=len(small_vocab), hidden_size=32,
                        num_layers=2, num_heads=4, intermediate_size=64,
                        max_position_embeddings=128)
    other = export_bert_saved_model(str(tmp_path / "other"), config,
                                    small_vocab, seed=8)
    assert openvino_engine.model_digest(other) != \
        openvino_engine.model_digest(tiny_model_dir)
    ids, mask, segments = next(_batches(seed=1))
    a = load_openvino_model(tiny_model_dir, "float32")(ids, mask, segments)
    b = load_openvino_model(other, "float32")(ids, mask, segments)
    assert not np.allclose(a[0], b[0])
    np.testing.assert_allclose(b[0], load_bert_saved_model(other)(
        ids, mask, segments)[0], atol=1e-4)


def test_a_second_publisher_keeps_the_first_entry(tmp_path, tiny_model_dir):
    model = openvino_engine.convert(tiny_model_dir)
    target = str(tmp_path / "entry")
    assert openvino_engine.save_ir(model, target, {"n": 1})
    assert not openvino_engine.save_ir(model, target, {"n": 2})
    assert json.loads((tmp_path / "entry" / "info.json").read_text()) == \
        {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_an_unwritable_cache_only_costs_the_conversion(
        tmp_path, tiny_model_dir, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("BERT_ZH_EMBED_CACHE", str(blocker))
    model = load_openvino_model(tiny_model_dir, "float32")
    assert "cannot cache the OpenVINO IR" in caplog.text
    ids, mask, segments = next(_batches())
    assert model(ids, mask, segments)[0].shape == (1, 32)


def test_models_on_tensorflow_file_systems_are_converted(tiny_model_dir):
    """A gs:// model is copied locally before conversion (tested on
    TensorFlow's in-memory ram:// file system)."""
    import tensorflow as tf
    remote = "ram://models/tiny_bert"
    for root, _, files in tf.io.gfile.walk(tiny_model_dir):
        rel = os.path.relpath(root, tiny_model_dir)
        target = remote if rel == "." else f"{remote}/{rel}"
        tf.io.gfile.makedirs(target)
        for name in files:
            tf.io.gfile.copy(os.path.join(root, name), f"{target}/{name}",
                             overwrite=True)
    model = openvino_engine.convert(remote)
    compiled = OpenVINOBertModel(remote, openvino_engine._compile(
        __import__("openvino").Core(), model, "float32", None), "float32")
    ids, mask, segments = next(_batches())
    np.testing.assert_allclose(compiled(ids, mask, segments)[0],
                               load_bert_saved_model(tiny_model_dir)(
                                   ids, mask, segments)[0], atol=1e-4)


def test_compile_settings():
    from model.runtime import usable_cores
    assert openvino_engine.compile_config("bfloat16") == {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS":
        usable_cores(), "INFERENCE_PRECISION_HINT": "bf16"}
    assert openvino_engine.compile_config("float32", 3)[
        "INFERENCE_NUM_THREADS"] == 3
    # An int8 model keeps what is not quantized in float32.
    assert openvino_engine.compile_config("int8")[
        "INFERENCE_PRECISION_HINT"] == "f32"


def test_bfloat16_without_hardware_is_reported():
    amx = frozenset({"amx_bf16", "avx512f"})
    assert bf16_note("float32", "f32", frozenset()) == ("float32", None)
    assert bf16_note("bfloat16", "bf16", amx) == ("bfloat16", None)
    precision, warning = bf16_note("bfloat16", "f32", frozenset({"avx2"}))
    assert precision == "float32" and "runs float32 instead" in warning
    precision, warning = bf16_note("bfloat16", "bf16", frozenset({"avx512f"}))
    assert precision == "bfloat16" and "emulates it" in warning


# --- bfloat16 accuracy on a BERT-scale model ---------------------------------


@pytest.fixture(scope="module")
def bert_scale(tmp_path_factory):
    """2 layers of BERT-Base's width, BERT's initialisation (normal, std
    0.02, as real checkpoints' scale), the real Chinese vocabulary where
    available; and real documents tokenized with it."""
    from model.bert import BertConfig
    from model.export import export_bert_saved_model
    from tests.conftest import build_small_vocab
    from model.vocab import load_vocab
    if REAL_VOCAB.exists():
        vocab = load_vocab(str(REAL_VOCAB))
        texts = read_texts([str(REAL_CORPUS)], limit=200, seed=3) \
            if REAL_CORPUS.exists() else list(E2E_TEXTS)
    else:
        vocab = build_small_vocab(E2E_TEXTS)
        texts = list(E2E_TEXTS)
    config = BertConfig(vocab_size=len(vocab), hidden_size=768, num_layers=2,
                        num_heads=12, intermediate_size=3072,
                        max_position_embeddings=128)
    path = export_bert_saved_model(
        str(tmp_path_factory.mktemp("bert_scale") / "model"), config, vocab,
        seed=11)
    return path, token_batches(texts, vocab, True, 128)


def test_bfloat16_keeps_cosine_to_float32(bert_scale):
    path, batches = bert_scale
    model = load_openvino_model(path, "bfloat16")
    stats = compare_engines(load_bert_saved_model(path), model, batches)
    assert stats.documents >= len(E2E_TEXTS) - 2
    assert stats.meets(ACCURACY_TARGETS["bfloat16"]), stats.summary()
    if model.precision == "bfloat16":
        assert stats.max_abs_pooled > 0  # it really ran bfloat16


# --- a whole run on OpenVINO ---------------------------------------------------


def test_pipeline_on_openvino_writes_what_tensorflow_writes(
        tmp_path, e2e_corpus, tiny_model_dir, caplog):
    import logging
    from pipeline.read_embeddings import load_embeddings
    from pipeline.run import run
    caplog.set_level(logging.INFO, logger="model.engines")
    summaries = {}
    for engine in ("openvino", "tensorflow"):
        summaries[engine] = run([
            "--input", str(e2e_corpus), "--output",
            str(tmp_path / engine / "emb"), "--model", tiny_model_dir,
            "--max_seq_length", "32", "--batch_size", "3", "--engine", engine,
            "--precision", "float32", "--xla", "off",
            "--runner", "DirectRunner"])
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith("Inference engine:")]
    assert [line.split(",")[0] for line in lines] == [
        "Inference engine: openvino", "Inference engine: tensorflow"]
    a = load_embeddings(str(tmp_path / "openvino" / "emb-*-of-*.parquet"))
    b = load_embeddings(str(tmp_path / "tensorflow" / "emb-*-of-*.parquet"))
    assert a.ids == b.ids and len(a.ids) == len(E2E_TEXTS) - 2
    np.testing.assert_array_equal(a.num_tokens, b.num_tokens)
    np.testing.assert_array_equal(a.truncated, b.truncated)
    np.testing.assert_allclose(a.pooled_output, b.pooled_output, atol=1e-4)
    for x, y in zip(a.sequence_output, b.sequence_output):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, atol=1e-4)
    ov, tf_ = summaries["openvino"], summaries["tensorflow"]
    assert ov.counts == tf_.counts and ov.reconciled
    assert ov.model_loads == 1
    # Same vectors, same fingerprint: engines are interchangeable.
    assert ov.model_fingerprint == tf_.model_fingerprint
