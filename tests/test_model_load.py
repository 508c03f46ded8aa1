"""Tests for ``model.load``: interface detection, tokenizer settings, errors,
non-local paths and TF Hub handles.

Every model is built here from one tiny set of random weights, so each
supported interface (list call, dict call, ``serving_default`` signature, a
Keras-style call with a ``training`` argument) is checked against the
independent NumPy reference.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from model import load as model_load
from model.bert import BertConfig, BertEncoder
from model.export import export_bert_saved_model
from model.errors import ModelFormatError, ModelInputError, SequenceLengthError
from model.handles import is_hub_handle, resolve_model_path
from model.load import BertSavedModel, load_bert_saved_model
from model.variables import (ModelLimits, check_max_seq_length,
                             infer_hidden_size, read_model_limits)
from model.vocab import (TokenizerSettings, read_tokenizer_settings,
                         tokenizer_settings_with_overrides)
from tests.bert_reference import ReferenceBert
from tests.conftest import SPECIALS

TINY = BertConfig(vocab_size=120, hidden_size=32, num_layers=2, num_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
VOCAB = SPECIALS + [f"w{i}" for i in range(TINY.vocab_size - len(SPECIALS))]
NAMES = ("input_word_ids", "input_mask", "segment_ids")
HUB_HANDLE = "https://tfhub.dev/tensorflow/bert_zh_L-12_H-768_A-12/1"


def _specs(dtype=tf.int32) -> list[tf.TensorSpec]:
    """[batch, seq] specs named like the BERT inputs."""
    return [tf.TensorSpec([None, None], dtype, name=n) for n in NAMES]


class _DictBert(tf.Module):
    """Newer-Hub style: dict in, dict out; vocab and do_lower_case are
    attached below the root, the vocab file is not called vocab.txt."""

    def __init__(self, encoder: BertEncoder, vocab_path: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.tokenizer_files = tf.Module()
        self.tokenizer_files.vocab = tf.saved_model.Asset(vocab_path)
        self.tokenizer_files.do_lower_case = tf.Variable(False,
                                                         trainable=False)

    @tf.function(input_signature=[dict(zip(NAMES, _specs()))])
    def __call__(self, inputs):
        pooled, sequence = self.encoder(*(inputs[n] for n in NAMES))
        return {"pooled_output": pooled, "sequence_output": sequence,
                "encoder_outputs": [sequence, sequence]}


class _SignatureOnlyBert(tf.Module):
    """Only a serving_default signature (int64 inputs); root not callable;
    carries a vocab asset but no do_lower_case variable."""

    def __init__(self, encoder: BertEncoder, vocab_path: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.vocab_holder = tf.Module()
        self.vocab_holder.file = tf.saved_model.Asset(vocab_path)

    @tf.function(input_signature=_specs(tf.int64))
    def serve(self, input_word_ids, input_mask, segment_ids):
        pooled, sequence = self.encoder(input_word_ids, input_mask, segment_ids)
        return {"pooled_output": pooled, "sequence_output": sequence}


class _TrainingArgBert(tf.Module):
    """Keras-style list call with a ``training`` argument; training=True
    shifts the outputs, so a loader that forgets training=False is caught.
    Has no vocab asset."""

    def __init__(self, encoder: BertEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    @tf.function
    def __call__(self, inputs, training=None):
        pooled, sequence = self.encoder(*inputs)
        if training:
            pooled, sequence = pooled + 100.0, sequence + 100.0
        return [pooled, sequence]


class _NoXlaBert(tf.Module):
    """List call whose graph holds string ops, which XLA cannot compile;
    they add zero, so the outputs are the encoder's."""

    def __init__(self, encoder: BertEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    @tf.function(input_signature=[_specs()])
    def __call__(self, inputs):
        pooled, sequence = self.encoder(*inputs)
        digits = tf.strings.length(tf.strings.as_string(inputs[0]))
        zero = 0.0 * tf.cast(tf.reduce_max(digits), tf.float32)
        return [pooled + zero, sequence]


class _Doubler(tf.Module):
    """A SavedModel that is not BERT at all."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def __call__(self, x):
        return {"y": 2.0 * x}


@pytest.fixture(scope="module")
def weights(random_bert_weights) -> dict[str, np.ndarray]:
    return random_bert_weights(TINY, seed=2024)


@pytest.fixture(scope="module")
def encoder(weights) -> BertEncoder:
    enc = BertEncoder(TINY)
    enc.set_weights(weights)
    return enc


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vocab")
    for name in ("vocab_zh.txt", "vocab.txt"):
        (path / name).write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, weights, encoder, vocab_dir) -> dict[str, str]:
    """One SavedModel per interface (and a non-BERT one), same weights."""
    root = tmp_path_factory.mktemp("load_models")
    paths = {"list": export_bert_saved_model(
        str(root / "list"), TINY, VOCAB, do_lower_case=False, weights=weights)}
    dict_model = _DictBert(encoder, str(vocab_dir / "vocab_zh.txt"))
    tf.saved_model.save(dict_model, str(root / "dict"))
    sig_model = _SignatureOnlyBert(encoder, str(vocab_dir / "vocab.txt"))
    tf.saved_model.save(sig_model, str(root / "signature"),
                        signatures={"serving_default": sig_model.serve})
    keras_like = _TrainingArgBert(encoder)
    for training in (False, True):
        keras_like.__call__.get_concrete_function(_specs(), training=training)
    tf.saved_model.save(keras_like, str(root / "training_arg"))
    tf.saved_model.save(_NoXlaBert(encoder), str(root / "no_xla"))
    doubler = _Doubler()
    tf.saved_model.save(doubler, str(root / "not_bert"),
                        signatures={"serving_default": doubler.__call__})
    for name in ("dict", "signature", "training_arg", "no_xla", "not_bert"):
        paths[name] = str(root / name)
    return paths


@pytest.fixture(scope="module")
def reference(weights) -> ReferenceBert:
    return ReferenceBert(weights, TINY.num_layers, TINY.num_heads,
                         TINY.layer_norm_eps)


def _batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two padded rows with different lengths and both segment ids."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, TINY.vocab_size, (2, 11)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    segments = np.zeros_like(ids)
    segments[0, 5:] = 1
    return ids, mask, segments


def _assert_single_line_error(excinfo, *fragments: str) -> None:
    """The error is one line and mentions every fragment."""
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("kind,interface", [
    ("list", "list"), ("dict", "dict"), ("signature", "signature"),
    ("training_arg", "list")])
def test_interfaces_match_reference(models, reference, kind, interface):
    model = load_bert_saved_model(models[kind])
    assert model.interface == interface
    ids, mask, segments = _batch()
    pooled, sequence = model(ids, mask, segments)
    assert pooled.dtype == np.float32 and sequence.dtype == np.float32
    assert pooled.shape == (2, TINY.hidden_size)
    assert sequence.shape == (2, 11, TINY.hidden_size)
    ref_pooled, ref_sequence = reference(ids, mask, segments)
    np.testing.assert_allclose(pooled, ref_pooled, atol=1e-4, rtol=0)
    real = mask.astype(bool)
    np.testing.assert_allclose(sequence[real], ref_sequence[real], atol=1e-4,
                               rtol=0)


@pytest.mark.parametrize("kind", ["list", "dict", "signature",
                                  "training_arg"])
def test_xla_compiled_model_matches_reference_and_compiles_per_shape(
        models, reference, kind):
    model = load_bert_saved_model(models[kind], jit_compile=True)
    assert model.jit_compile
    before = model_load.compile_stats().shapes
    ids, mask, segments = _batch()
    for _ in range(2):  # the second call reuses the compiled shape
        pooled, sequence = model(ids, mask, segments)
    ref_pooled, ref_sequence = reference(ids, mask, segments)
    np.testing.assert_allclose(pooled, ref_pooled, atol=1e-4, rtol=0)
    real = mask.astype(bool)
    np.testing.assert_allclose(sequence[real], ref_sequence[real], atol=1e-4,
                               rtol=0)
    model(ids[:1, :5], mask[:1, :5], segments[:1, :5])  # a new shape
    assert model.jit_compile
    assert model_load.compile_stats().shapes - before == 2


def test_xla_agrees_with_plain_tensorflow(models):
    plain = load_bert_saved_model(models["list"])
    compiled = load_bert_saved_model(models["list"], jit_compile=True)
    batch = _batch()
    for got, want in zip(compiled(*batch), plain(*batch)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_model_xla_cannot_compile_runs_without_it(models, reference, caplog):
    model = load_bert_saved_model(models["no_xla"], jit_compile=True)
    ids, mask, segments = _batch()
    with caplog.at_level(logging.WARNING, logger="model.load"):
        pooled, _ = model(ids, mask, segments)
    assert not model.jit_compile
    assert "running it without XLA" in caplog.text
    np.testing.assert_allclose(pooled, reference(ids, mask, segments)[0],
                               atol=1e-4, rtol=0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="model.load"):
        model(ids, mask, segments)
    assert "XLA" not in caplog.text  # warned once


def _bad_batch(kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_batch()`` spoilt one way; every kind is one the wrapper rejects
    itself, whatever TensorFlow on this CPU would do with it."""
    ids, mask, segments = _batch()
    if kind == "rank_3":
        return ids[None], mask[None], segments[None]
    if kind == "rank_1":
        return ids[0], mask[0], segments[0]
    if kind == "narrow_mask":  # plain TF with oneDNN broadcasts this
        return ids, mask[:, :4], segments
    if kind == "short_segments":
        return ids, mask, segments[:1]
    if kind == "empty":
        return ids[:, :0], mask[:, :0], segments[:, :0]
    if kind == "float_ids":
        return ids.astype(np.float32), mask, segments
    if kind == "float_mask":
        return ids, mask.astype(np.float64), segments
    if kind == "id_too_large":
        ids[0, 3] = TINY.vocab_size
    elif kind == "negative_id":
        ids[1, 2] = -1
    elif kind == "mask_value_2":
        mask[0, 0] = 2
    elif kind == "segment_too_large":
        segments[0, 1] = TINY.type_vocab_size
    elif kind == "too_long":  # one column beyond the position table
        width = TINY.max_position_embeddings + 1
        ids, mask, segments = (np.resize(a, (2, width))
                               for a in (ids, mask, segments))
    else:
        raise AssertionError(kind)
    return ids, mask, segments


BAD_INPUTS = {
    "rank_3": "input_word_ids must be a 2-D [batch, seq_length] array, got "
              "shape [1, 2, 11]",
    "rank_1": "must be a 2-D",
    "narrow_mask": "input_mask [2, 4]",
    "short_segments": "segment_ids [1, 11]",
    "empty": "empty input of shape [2, 0]",
    "float_ids": "input_word_ids must hold integers, got float32",
    "float_mask": "input_mask must hold integers, got float64",
    "id_too_large": f"input_word_ids must lie in [0, {TINY.vocab_size})",
    "negative_id": "input_word_ids must lie in",
    "mask_value_2": "input_mask must lie in [0, 2)",
    "segment_too_large": f"segment_ids must lie in [0, {TINY.type_vocab_size})",
    "too_long": f"sequence length {TINY.max_position_embeddings + 1} exceeds "
                f"the model's {TINY.max_position_embeddings} positions",
}


@pytest.mark.parametrize("jit_compile", [False, True], ids=["plain", "xla"])
@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_is_our_error_and_keeps_xla_on(models, reference, caplog,
                                                 kind, jit_compile):
    """Our own one-line error on every CPU, before TensorFlow runs; under
    XLA the bad input neither turns XLA off nor reaches its fallback, and
    the next good batch still runs through XLA."""
    model = load_bert_saved_model(models["list"], jit_compile=jit_compile)
    before = model_load.compile_stats().shapes
    with caplog.at_level(logging.WARNING, logger="model.load"):
        with pytest.raises(ModelInputError) as err:
            model(*_bad_batch(kind))
    _assert_single_line_error(err, BAD_INPUTS[kind])
    assert "XLA" not in caplog.text
    assert model.jit_compile == jit_compile
    assert model_load.compile_stats().shapes == before  # nothing compiled
    batch = _batch()
    pooled, _ = model(*batch)
    assert model.jit_compile == jit_compile
    np.testing.assert_allclose(pooled, reference(*batch)[0], atol=1e-4,
                               rtol=0)


def test_xla_failure_on_an_input_it_cannot_check_keeps_xla_on(models,
                                                              caplog):
    """Limits unknown (nothing to check a too-long batch against): XLA
    fails on it, but it compiles a well-formed batch of this model, so the
    input is blamed and XLA stays on."""
    model = BertSavedModel(models["list"], tf.saved_model.load(models["list"]),
                           jit_compile=True, limits=ModelLimits())
    with caplog.at_level(logging.WARNING, logger="model.load"):
        with pytest.raises(ModelInputError) as err:
            model(*_bad_batch("too_long"))
    _assert_single_line_error(err, "XLA compiles", "fails on input shape "
                              f"[2, {TINY.max_position_embeddings + 1}]")
    assert model.jit_compile
    assert "without XLA" not in caplog.text
    model(*_batch())
    assert model.jit_compile


@pytest.mark.parametrize("kind", ["list", "dict", "signature",
                                  "training_arg"])
def test_read_model_limits(models, kind):
    limits = read_model_limits(models[kind])
    assert (limits.vocab_size, limits.type_vocab_size,
            limits.max_positions) == (TINY.vocab_size, TINY.type_vocab_size,
                                      TINY.max_position_embeddings)
    assert "position_embeddings" in limits.position_table
    assert load_bert_saved_model(models[kind]).limits == limits


class _KerasStyleTables(tf.Module):
    """Tables under Keras-style attribute paths that do not say what they
    are (``layer_with_weights-N/embeddings``); only the variables' own
    names do, as in TF Hub's Keras BERT encoders."""

    def __init__(self) -> None:
        super().__init__()
        for index, (name, rows) in enumerate([
                ("word_embeddings", 50), ("position_embedding", 40),
                ("type_embeddings", 3), ("dense", 8)]):
            layer = tf.Module()
            layer.embeddings = tf.Variable(tf.zeros([rows, 8]),
                                           name=f"{name}/embeddings")
            setattr(self, f"layer_with_weights-{index}", layer)


def test_read_model_limits_from_variable_names_and_unknown(tmp_path):
    tf.saved_model.save(_KerasStyleTables(), str(tmp_path / "keras_style"))
    limits = read_model_limits(str(tmp_path / "keras_style"))
    assert (limits.vocab_size, limits.type_vocab_size,
            limits.max_positions) == (50, 3, 40)
    assert limits.position_table.startswith("position_embedding/embeddings")
    unnamed = tf.Module()
    unnamed.table = tf.Variable(tf.zeros([40, 8]), name="table")
    tf.saved_model.save(unnamed, str(tmp_path / "unnamed"))
    assert read_model_limits(str(tmp_path / "unnamed")) == ModelLimits()
    # Nothing known: nothing to exceed.
    check_max_seq_length(str(tmp_path / "unnamed"), 4096)


def test_max_seq_length_beyond_the_position_table(models):
    positions = TINY.max_position_embeddings
    assert check_max_seq_length(models["list"], positions).max_positions == \
        positions
    for too_long in (positions + 1, 2 * positions):
        with pytest.raises(SequenceLengthError) as err:
            check_max_seq_length(models["list"], too_long)
        _assert_single_line_error(
            err, f"--max_seq_length {too_long} exceeds the model's "
            f"{positions} positions", f"use --max_seq_length {positions}")


def test_handler_refuses_a_longer_max_seq_length(models):
    from transforms.batch import BatchSettings
    from transforms.infer import BertModelHandler, InferSettings
    positions = TINY.max_position_embeddings
    assert BertModelHandler(InferSettings(models["list"]), BatchSettings(
        max_seq_length=positions)).load_model()
    for jit_compile in (False, True):
        infer = InferSettings(models["list"], jit_compile=jit_compile)
        handler = BertModelHandler(infer, BatchSettings(
            max_seq_length=positions + 1, step_padding=infer.xla))
        with pytest.raises(ValueError, match=f"max_seq_length {positions + 1}"
                           f" exceeds the model's {positions} positions"):
            handler.load_model()


@pytest.mark.parametrize("extra", [[], ["--long_text", "chunk"]],
                         ids=["truncate", "chunk"])
def test_cli_rejects_max_seq_length_beyond_the_model(models, tmp_path,
                                                     capsys, extra):
    from pipeline.run import main
    corpus = tmp_path / "in.txt"
    corpus.write_text("w1 w2 w3\n", encoding="utf-8")
    out = tmp_path / "out"
    code = main(["--input", str(corpus), "--output", str(out / "emb"),
                 "--model", models["list"], "--max_seq_length", "128",
                 *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.splitlines() == [err]
    assert err.startswith("error: --max_seq_length 128 exceeds the model's "
                          f"{TINY.max_position_embeddings} positions (")
    assert not out.exists()


def test_analyze_rejects_max_seq_length_beyond_the_model(models, tmp_path,
                                                         capsys):
    from pipeline.analyze import main
    corpus = tmp_path / "in.txt"
    corpus.write_text("w1 w2 w3\n", encoding="utf-8")
    assert main(["--input", str(corpus), "--model", models["list"],
                 "--max_seq_length", "128",
                 "--output", str(tmp_path / "report.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert err.startswith("error: --max_seq_length 128 exceeds the model's")
    assert not (tmp_path / "report.json").exists()


def test_bert_saved_model_wraps_restored_object(models):
    restored = tf.saved_model.load(models["dict"])
    model = BertSavedModel("somewhere", restored)
    assert model.interface == "dict" and model.model_dir == "somewhere"
    with pytest.raises(ModelFormatError):
        BertSavedModel("nowhere", tf.Module())


def test_tokenizer_settings_from_root_attributes(models):
    settings = read_tokenizer_settings(models["list"])
    assert settings == TokenizerSettings(
        os.path.join(models["list"], "assets", "vocab.txt"), False)


def test_tokenizer_settings_from_nested_vocab_asset(models):
    settings = read_tokenizer_settings(models["dict"])
    assert Path(settings.vocab_path).name == "vocab_zh.txt"
    assert Path(settings.vocab_path).read_text(
        encoding="utf-8").splitlines() == VOCAB
    assert settings.do_lower_case is False  # the nested variable is found


def test_missing_lower_case_flag_defaults_to_true(models, caplog):
    caplog.set_level(logging.INFO, logger="model.load")
    settings = read_tokenizer_settings(models["signature"])
    assert settings.do_lower_case is True
    assert Path(settings.vocab_path).read_text(
        encoding="utf-8").splitlines() == VOCAB
    assert "assuming do_lower_case=True" in caplog.text


def test_missing_vocab(models, vocab_dir):
    assert read_tokenizer_settings(models["training_arg"]) is None
    with pytest.raises(ModelFormatError) as err:
        tokenizer_settings_with_overrides(models["training_arg"])
    _assert_single_line_error(err, "--vocab_file")
    override = str(vocab_dir / "vocab.txt")
    assert tokenizer_settings_with_overrides(
        models["training_arg"], vocab_file=override) == TokenizerSettings(
            override, True)


def test_overrides_beat_model_settings(models, vocab_dir):
    override = str(vocab_dir / "vocab_zh.txt")
    settings = tokenizer_settings_with_overrides(
        models["list"], vocab_file=override, do_lower_case=True)
    assert settings == TokenizerSettings(override, True)
    assert tokenizer_settings_with_overrides(models["list"]).do_lower_case is False


def test_non_bert_saved_model_is_rejected(models):
    with pytest.raises(ModelFormatError) as err:
        load_bert_saved_model(models["not_bert"])
    _assert_single_line_error(err, "no BERT interface", "serving_default",
                              models["not_bert"])


def test_directory_that_is_no_saved_model(tmp_path):
    (tmp_path / "readme.txt").write_text("not a model")
    for function in (load_bert_saved_model, read_tokenizer_settings,
                     lambda path: infer_hidden_size(path, 10)):
        with pytest.raises(ModelFormatError) as err:
            function(str(tmp_path))
        _assert_single_line_error(err, "not a SavedModel directory")
        with pytest.raises(ModelFormatError) as err:
            function(str(tmp_path / "missing"))
        _assert_single_line_error(err, "does not exist")


def test_corrupt_saved_model_pb(tmp_path):
    (tmp_path / "saved_model.pb").write_bytes(b"\xff\x00 definitely not a proto")
    with pytest.raises(ModelFormatError) as err:
        load_bert_saved_model(str(tmp_path))
    _assert_single_line_error(err, "saved_model.pb")


@pytest.mark.parametrize("kind", ["list", "dict", "signature"])
def test_infer_hidden_size(models, kind):
    assert infer_hidden_size(models[kind], TINY.vocab_size) == TINY.hidden_size


def test_vocab_size_mismatch_is_an_error(models):
    with pytest.raises(ModelFormatError) as err:
        infer_hidden_size(models["list"], TINY.vocab_size - 1)
    _assert_single_line_error(err, f"{TINY.vocab_size - 1} entries",
                              f"[{TINY.vocab_size}, {TINY.hidden_size}]")


def copy_tree_with_gfile(src: str, dst: str) -> None:
    """Copy a local directory tree to any TensorFlow file system."""
    for root, _, files in tf.io.gfile.walk(src):
        relative = os.path.relpath(root, src)
        target = dst if relative == "." else f"{dst}/{relative}"
        tf.io.gfile.makedirs(target)
        for name in files:
            tf.io.gfile.copy(os.path.join(root, name), f"{target}/{name}",
                             overwrite=True)


def test_non_local_file_system_path(models, reference):
    """A ram:// path stands in for gs://: everything goes through
    TensorFlow's file systems, nothing through local paths."""
    remote = "ram://bert_models/list_model"
    copy_tree_with_gfile(models["list"], remote)
    settings = read_tokenizer_settings(remote)
    assert settings == TokenizerSettings(f"{remote}/assets/vocab.txt", False)
    with tf.io.gfile.GFile(settings.vocab_path) as handle:
        assert handle.read().splitlines() == VOCAB
    assert infer_hidden_size(remote, TINY.vocab_size) == TINY.hidden_size
    model = load_bert_saved_model(remote)
    ids, mask, segments = _batch()
    np.testing.assert_allclose(model(ids, mask, segments)[0],
                               reference(ids, mask, segments)[0], atol=1e-4,
                               rtol=0)


def test_load_count_and_log(models, caplog):
    caplog.set_level(logging.INFO, logger="model.load")
    before = model_load.load_count()
    load_bert_saved_model(models["list"])
    assert model_load.load_count() == before + 1
    assert "list interface" in caplog.text


def test_plain_paths_are_not_hub_handles(models):
    for path in (models["list"], "gs://bucket/models/bert_zh", "relative/dir"):
        assert not is_hub_handle(path)
        assert resolve_model_path(path) == path
    for handle in (HUB_HANDLE, "https://www.kaggle.com/models/tensorflow/"
                   "bert/tensorFlow2/zh-l-12-h-768-a-12/4",
                   "gs://bucket/bert.tar.gz"):
        assert is_hub_handle(handle)


@pytest.fixture
def no_network(monkeypatch):
    """Make any URL fetch fail, so a test proves it ran offline."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_hub_handle_from_prefilled_cache(models, reference, tmp_path,
                                         monkeypatch, no_network):
    pytest.importorskip("tensorflow_hub")
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    # TF Hub caches a handle's model under the SHA-1 of the handle.
    cached = tmp_path / hashlib.sha1(HUB_HANDLE.encode("utf-8")).hexdigest()
    shutil.copytree(models["list"], cached)
    assert resolve_model_path(HUB_HANDLE) == str(cached)
    assert read_tokenizer_settings(HUB_HANDLE).vocab_path == str(
        cached / "assets" / "vocab.txt")
    assert infer_hidden_size(HUB_HANDLE, TINY.vocab_size) == TINY.hidden_size
    model = load_bert_saved_model(HUB_HANDLE)
    ids, mask, segments = _batch()
    np.testing.assert_allclose(model(ids, mask, segments)[0],
                               reference(ids, mask, segments)[0], atol=1e-4,
                               rtol=0)


def test_uncached_hub_handle_offline_is_a_clear_error(tmp_path, monkeypatch,
                                                      no_network):
    pytest.importorskip("tensorflow_hub")
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelFormatError) as err:
        load_bert_saved_model(HUB_HANDLE)
    _assert_single_line_error(err, "cannot resolve TF Hub handle", HUB_HANDLE)


def test_hub_handle_without_tensorflow_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_hub", None)  # import fails
    with pytest.raises(ModelFormatError) as err:
        read_tokenizer_settings(HUB_HANDLE)
    _assert_single_line_error(err, "pip install tensorflow_hub")
