"""``--pooling cls|mean|first_last_avg`` and ``--normalize``: the pure
functions, the pipeline's vectors (truncated and chunked runs, document
vectors) against NumPy from the model's own outputs, ``embed_texts``, the
fingerprint, and the launch errors.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import tensorflow as tf

from model.bert import _MASK_NEGATIVE, BertConfig, BertEncoder
from model.files import hash_files, variables_files
from pipeline.embed import embed_texts
from pipeline.fingerprint import model_fingerprint
from pipeline.read_embeddings import load_embeddings, load_index
from pipeline.run import main, run
from tests.conftest import E2E_TEXTS
from transforms.pooling import (l2_normalize, masked_mean, mean_of_vectors,
                                pool)
from transforms.records import Document
from transforms.tokenize import TokenizeDocuments, TokenizeSettings

MAX_SEQ = 12  # 10 wordpieces per chunk
TEXTS = [t for t in E2E_TEXTS if t.strip()]
NAMES = ("input_word_ids", "input_mask", "segment_ids")


# --- pure functions ------------------------------------------------------


def test_masked_mean_ignores_padding_whatever_it_holds():
    rng = np.random.default_rng(0)
    lengths = [1, 3, 7, 7]
    tokens = rng.standard_normal((4, 7, 5)).astype(np.float32) + 3.0
    mask = (np.arange(7)[None, :] < np.array(lengths)[:, None]).astype(
        np.int32)
    got = masked_mean(tokens, mask)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(got[row], tokens[row, :n].mean(axis=0),
                                   rtol=1e-6)
    # Padding rows full of garbage change nothing.
    garbage = np.where(mask[:, :, None] == 1, tokens, 1e6)
    np.testing.assert_array_equal(masked_mean(garbage, mask), got)
    assert got.dtype == np.float32


def test_l2_normalize_unit_rows_and_zero_rows():
    rows = np.array([[3.0, 4.0], [0.0, 0.0], [-1e-20, 1e-20]], np.float32)
    got = l2_normalize(rows)
    np.testing.assert_allclose(got[0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(got[1], [0.0, 0.0])
    np.testing.assert_allclose(np.linalg.norm(got[2]), 1.0, rtol=1e-6)
    assert not np.isnan(got).any()


def test_pool_kinds():
    rng = np.random.default_rng(1)
    pooled = rng.standard_normal((2, 4)).astype(np.float32)
    first, last = rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(pool("cls", pooled, last, mask), pooled)
    np.testing.assert_allclose(pool("mean", pooled, last, mask),
                               masked_mean(last, mask), rtol=1e-6)
    np.testing.assert_allclose(
        pool("first_last_avg", pooled, last, mask, [first, last]),
        [((first[0, :2] + last[0, :2]) / 2).mean(0),
         ((first[1] + last[1]) / 2).mean(0)], rtol=1e-5)
    unit = pool("mean", pooled, last, mask, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="encoder_outputs"):
        pool("first_last_avg", pooled, last, mask, [])
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool("max", pooled, last, mask)


def test_mean_of_vectors():
    rows = np.array([[1.0, 0.0], [0.0, 3.0]], np.float32)
    np.testing.assert_allclose(mean_of_vectors(rows), [0.5, 1.5])
    np.testing.assert_allclose(mean_of_vectors(rows, normalize=True),
                               np.array([0.5, 1.5]) / np.hypot(0.5, 1.5),
                               rtol=1e-6)


# --- fingerprint ---------------------------------------------------------


def test_fingerprint_keeps_old_runs_and_tells_poolings_apart(
        tiny_model_dir):
    vocab = f"{tiny_model_dir}/assets/vocab.txt"
    args = (tiny_model_dir, vocab, True, 16)
    # What the fingerprint was before --pooling existed: runs made then
    # keep theirs (an incremental run must not re-embed everything).
    settings = json.dumps({"do_lower_case": True, "max_seq_length": 16,
                           "long_text": "truncate", "chunk_stride": None,
                           "precision": "float32"}, sort_keys=True)
    old = hashlib.blake2b(digest_size=16)
    old.update(settings.encode())
    old.update(hash_files(variables_files(tiny_model_dir)).encode())
    old.update(hash_files([vocab], with_names=False).encode())
    assert model_fingerprint(*args) == old.hexdigest()
    assert model_fingerprint(*args, pooling="cls") == old.hexdigest()
    prints = {model_fingerprint(*args, pooling=p, normalize=n)
              for p in ("cls", "mean", "first_last_avg")
              for n in (False, True)}
    assert len(prints) == 6


# --- pipeline runs: vectors against NumPy --------------------------------


def _corpus(root) -> str:
    path = root / "c.jsonl"
    path.write_text("".join(
        json.dumps({"id": f"d{i}", "text": t}, ensure_ascii=False) + "\n"
        for i, t in enumerate(E2E_TEXTS)), encoding="utf-8")
    return str(path)


def _run(root, model_dir, *flags) -> object:
    summary = run(["--input", _corpus(root), "--output", str(root / "emb"),
                   "--model", model_dir, "--max_seq_length", str(MAX_SEQ),
                   "--batch_size", "3", "--engine", "tensorflow",
                   "--precision", "float32", *flags])
    assert summary.reconciled and summary.status != "failed"
    return summary


def _mean_reference(sequence: list[np.ndarray], normalize: bool
                    ) -> np.ndarray:
    """NumPy: each row's token vectors ([CLS] and [SEP] included) averaged,
    then scaled to unit length when asked."""
    means = np.stack([s.astype(np.float64).mean(axis=0) for s in sequence])
    if normalize:
        means /= np.linalg.norm(means, axis=1, keepdims=True)
    return means


@pytest.mark.parametrize("long_text, normalize", [
    ("truncate", True), ("truncate", False), ("chunk", True),
    ("chunk", False)])
def test_mean_pooling_in_runs(tmp_path, tiny_model_dir, long_text,
                              normalize):
    flags = ["--pooling", "mean", "--long_text", long_text]
    if normalize:
        flags.append("--normalize")
    if long_text == "chunk":
        flags += ["--document_vectors", "--chunk_stride", "8"]
    _run(tmp_path, tiny_model_dir, *flags)
    emb = load_embeddings(str(tmp_path / "emb-[0-9]*.parquet"))
    assert len(emb) >= len(TEXTS)
    if long_text == "truncate":
        assert emb.truncated.any()  # some rows were cut to MAX_SEQ
    else:
        assert (emb.num_chunks > 1).any()
    np.testing.assert_allclose(
        emb.pooled_output, _mean_reference(emb.sequence_output, normalize),
        atol=1e-5)
    manifest = json.loads((tmp_path / "emb-manifest.json").read_text())
    assert manifest["options"]["pooling"] == "mean"
    assert manifest["options"]["normalize"] is normalize
    if long_text == "chunk":
        docs = load_index(str(tmp_path / "emb-manifest.json"), "documents")
        for row, doc_id in enumerate(docs.ids):
            mine = [i for i, d in enumerate(emb.doc_ids) if d == doc_id]
            expected = emb.pooled_output[mine].astype(np.float64).mean(0)
            if normalize:
                expected /= np.linalg.norm(expected)
            np.testing.assert_allclose(docs.pooled_output[row], expected,
                                       atol=1e-5)
        if normalize:
            np.testing.assert_allclose(
                np.linalg.norm(docs.pooled_output, axis=1), 1.0, atol=1e-5)


def test_default_pooling_is_the_models_pooled_output(tmp_path,
                                                     tiny_model_dir):
    _run(tmp_path, tiny_model_dir, "--outputs", "pooled", "--xla", "off")
    emb = load_embeddings(str(tmp_path / "emb-[0-9]*.parquet"))
    vectors = embed_texts(TEXTS, model=tiny_model_dir,
                          max_seq_length=MAX_SEQ)
    model = tf.saved_model.load(tiny_model_dir)
    tokenize = TokenizeDocuments(_vocab(tiny_model_dir), True,
                                 TokenizeSettings(MAX_SEQ))
    tokenize.setup()
    for i, text in enumerate(E2E_TEXTS):
        if not text.strip():
            continue
        (doc,) = tokenize.process(Document(f"d{i}", text))
        ids = tf.constant([doc.input_word_ids], tf.int32)
        pooled, _ = model([ids, tf.ones_like(ids), tf.zeros_like(ids)])
        np.testing.assert_allclose(emb.pooled_output[emb.ids.index(f"d{i}")],
                                   pooled[0], atol=1e-5)
        np.testing.assert_allclose(vectors[TEXTS.index(text)], pooled[0],
                                   atol=1e-5)


def _vocab(model_dir: str) -> list[str]:
    with open(f"{model_dir}/assets/vocab.txt", encoding="utf-8") as handle:
        return handle.read().splitlines()


# --- embed_texts ---------------------------------------------------------


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_embed_texts_batch_equals_each_text_alone(tiny_model_dir, pooling):
    """A batch of different lengths (padding) gives every text the vector
    it gets alone."""
    together = embed_texts(TEXTS, model=tiny_model_dir, max_seq_length=32,
                           pooling=pooling, normalize=True, batch_size=8)
    assert together.shape == (len(TEXTS), 32)
    assert together.dtype == np.float32
    for i, text in enumerate(TEXTS):
        alone = embed_texts([text], model=tiny_model_dir, max_seq_length=32,
                            pooling=pooling, normalize=True)
        np.testing.assert_allclose(together[i], alone[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0,
                               atol=1e-5)


def test_embed_texts_refuses_what_it_cannot_embed(tiny_model_dir):
    with pytest.raises(ValueError, match="text 1 has no tokens"):
        embed_texts(["你好", "  "], model=tiny_model_dir)
    with pytest.raises(TypeError, match="list of str"):
        embed_texts("你好", model=tiny_model_dir)
    assert embed_texts([], model=tiny_model_dir).shape == (0, 32)


# --- first_last_avg: a model that returns encoder_outputs ----------------


class _LayeredBert(tf.Module):
    """TF Hub's newer encoder interface: dict in, dict out with
    ``encoder_outputs`` (each transformer layer's tokens)."""

    def __init__(self, encoder: BertEncoder, vocab_path: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.vocab_file = tf.saved_model.Asset(vocab_path)
        self.do_lower_case = tf.Variable(True, trainable=False)

    @tf.function(input_signature=[{
        n: tf.TensorSpec([None, None], tf.int32, name=n) for n in NAMES}])
    def __call__(self, inputs):
        enc, hidden = self.encoder, self.encoder.config.hidden_size
        ids = inputs["input_word_ids"]
        mask = tf.cast(inputs["input_mask"], tf.float32)
        batch, width = tf.shape(ids)[0], tf.shape(ids)[1]
        bias = ((1.0 - mask) * _MASK_NEGATIVE)[:, None, None, :]
        x = tf.reshape(enc._embed(ids, inputs["segment_ids"]), [-1, hidden])
        layers = []
        for index in range(enc.config.num_layers):
            x = enc._layer(x, bias, batch, width, index)
            layers.append(tf.reshape(x, [batch, width, hidden]))
        pooled = tf.tanh(enc._dense(layers[-1][:, 0], "bert/pooler/dense"))
        return {"pooled_output": pooled, "sequence_output": layers[-1],
                "encoder_outputs": layers}


def _save_tiny(root, small_vocab, wrapper, num_layers: int, seed: int
               ) -> str:
    """A tiny BERT (hidden 32) wrapped by ``wrapper`` saved under ``root``
    with the small vocabulary as its asset; returns the SavedModel path."""
    vocab = root / "vocab.txt"
    vocab.write_text("".join(t + "\n" for t in small_vocab), encoding="utf-8")
    config = BertConfig(vocab_size=len(small_vocab), hidden_size=32,
                        num_layers=num_layers, num_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    path = str(root / "model")
    tf.saved_model.save(wrapper(BertEncoder(config, seed=seed), str(vocab)),
                        path)
    return path


@pytest.fixture(scope="module")
def layered_model_dir(tmp_path_factory, small_vocab) -> str:
    return _save_tiny(tmp_path_factory.mktemp("layered"), small_vocab,
                      _LayeredBert, num_layers=3, seed=3)


def _first_last_reference(model_dir: str, token_ids: np.ndarray
                          ) -> np.ndarray:
    """NumPy from the model's encoder_outputs for one unpadded input."""
    model = tf.saved_model.load(model_dir)
    ids = tf.constant([token_ids], tf.int32)
    out = model({"input_word_ids": ids, "input_mask": tf.ones_like(ids),
                 "segment_ids": tf.zeros_like(ids)})
    layers = [np.asarray(layer[0], np.float64)
              for layer in out["encoder_outputs"]]
    assert len(layers) == 3
    return ((layers[0] + layers[-1]) / 2).mean(axis=0)


@pytest.mark.parametrize("long_text, normalize", [
    ("truncate", False), ("chunk", True)])
def test_first_last_avg_in_runs(tmp_path, layered_model_dir, small_vocab,
                                long_text, normalize):
    flags = ["--pooling", "first_last_avg", "--long_text", long_text,
             "--outputs", "pooled"]
    if normalize:
        flags.append("--normalize")
    if long_text == "chunk":
        flags.append("--document_vectors")
    _run(tmp_path, layered_model_dir, *flags)
    emb = load_embeddings(str(tmp_path / "emb-[0-9]*.parquet"))
    tokenize = TokenizeDocuments(small_vocab, True,
                                 TokenizeSettings(MAX_SEQ, long_text))
    tokenize.setup()
    expected = {}
    for i, text in enumerate(E2E_TEXTS):
        for doc in tokenize.process(Document(f"d{i}", text)):
            vector = _first_last_reference(layered_model_dir,
                                           doc.input_word_ids)
            if normalize:
                vector /= np.linalg.norm(vector)
            expected[doc.id] = vector
    assert sorted(expected) == sorted(emb.ids)
    for row, row_id in enumerate(emb.ids):
        np.testing.assert_allclose(emb.pooled_output[row], expected[row_id],
                                   atol=1e-5)
    if long_text == "chunk":
        assert (emb.num_chunks > 1).any()
        docs = load_index(str(tmp_path / "emb-manifest.json"), "documents")
        for row, doc_id in enumerate(docs.ids):
            chunks = np.stack([v for k, v in expected.items()
                               if k.split("#")[0] == doc_id])
            mean = chunks.mean(axis=0)
            np.testing.assert_allclose(docs.pooled_output[row],
                                       mean / np.linalg.norm(mean),
                                       atol=1e-5)


def test_first_last_avg_embed_texts(layered_model_dir, small_vocab):
    vectors = embed_texts(TEXTS, model=layered_model_dir,
                          max_seq_length=MAX_SEQ, pooling="first_last_avg")
    tokenize = TokenizeDocuments(small_vocab, True, TokenizeSettings(MAX_SEQ))
    tokenize.setup()
    for i, text in enumerate(TEXTS):
        (doc,) = tokenize.process(Document("x", text))
        np.testing.assert_allclose(
            vectors[i], _first_last_reference(layered_model_dir,
                                              doc.input_word_ids),
            atol=1e-5)


# --- first_last_avg on the models model.export / model.convert write -----


def _first_last_from_signature(model, token_ids: np.ndarray) -> np.ndarray:
    """NumPy from the encoder_outputs of an exported model's serving
    signature (stacked [layers, batch, seq, hidden]) for one input."""
    ids = tf.constant([token_ids], tf.int32)
    out = model.signatures["serving_default"](
        input_word_ids=ids, input_mask=tf.ones_like(ids),
        segment_ids=tf.zeros_like(ids))
    layers = np.asarray(out["encoder_outputs"], np.float64)[:, 0]
    assert layers.shape == (2, len(token_ids), 32)
    return ((layers[0] + layers[-1]) / 2).mean(axis=0)


@pytest.mark.parametrize("xla", ["off", "on"])
def test_first_last_avg_with_an_exported_model(tmp_path, tiny_model_dir,
                                               small_vocab, xla):
    """The exported model returns encoder_outputs (from its serving
    signature; the pipeline keeps its list call for everything else):
    runs, with and without XLA, and embed_texts give NumPy's
    first_last_avg of those layers."""
    model = tf.saved_model.load(tiny_model_dir)
    _run(tmp_path, tiny_model_dir, "--pooling", "first_last_avg",
         "--outputs", "pooled", "--normalize", "--xla", xla)
    emb = load_embeddings(str(tmp_path / "emb-[0-9]*.parquet"))
    vectors = embed_texts(TEXTS, model=tiny_model_dir,
                          max_seq_length=MAX_SEQ, pooling="first_last_avg",
                          normalize=True)
    tokenize = TokenizeDocuments(small_vocab, True, TokenizeSettings(MAX_SEQ))
    tokenize.setup()
    seen = 0
    for i, text in enumerate(E2E_TEXTS):
        for doc in tokenize.process(Document(f"d{i}", text)):
            want = _first_last_from_signature(model, doc.input_word_ids)
            want /= np.linalg.norm(want)
            np.testing.assert_allclose(
                emb.pooled_output[emb.ids.index(doc.id)], want, atol=1e-5)
            np.testing.assert_allclose(vectors[TEXTS.index(text)], want,
                                       atol=1e-5)
            seen += 1
    assert seen == len(TEXTS) == len(emb.ids)
    # Not the mean of the last layer alone (a pooling mix-up).
    mean = embed_texts(TEXTS, model=tiny_model_dir, max_seq_length=MAX_SEQ,
                       pooling="mean", normalize=True)
    assert np.abs(mean - vectors).max() > 1e-3


class _ListOnlyBert(tf.Module):
    """TF Hub's legacy interface (``bert_zh_L-12_H-768_A-12/1``): a list
    call returning [pooled, sequence] and nothing else."""

    def __init__(self, encoder: BertEncoder, vocab_path: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.vocab_file = tf.saved_model.Asset(vocab_path)
        self.do_lower_case = tf.Variable(True, trainable=False)

    @tf.function(input_signature=[[
        tf.TensorSpec([None, None], tf.int32, name=n) for n in NAMES]])
    def __call__(self, inputs):
        return list(self.encoder(*inputs))


@pytest.fixture(scope="module")
def list_only_model_dir(tmp_path_factory, small_vocab) -> str:
    return _save_tiny(tmp_path_factory.mktemp("list_only"), small_vocab,
                      _ListOnlyBert, num_layers=2, seed=5)


# --- launch errors -------------------------------------------------------


@pytest.mark.parametrize("model, flags, message", [
    ("list_only", ["--pooling", "first_last_avg"],
     "needs a model that returns encoder_outputs"),
    ("exported", ["--pooling", "mean", "--outputs", "sequence"],
     "need pooled in"),
    ("exported", ["--normalize", "--outputs", "sequence"], "need pooled in"),
])
def test_pooling_usage_errors(tmp_path, tiny_model_dir, list_only_model_dir,
                              capsys, model, flags, message):
    corpus = tmp_path / "c.txt"
    corpus.write_text("你好\n", encoding="utf-8")
    model_dir = {"list_only": list_only_model_dir,
                 "exported": tiny_model_dir}[model]
    assert main(["--input", str(corpus), "--output", str(tmp_path / "o"),
                 "--model", model_dir, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(message in line for line in err)
    assert [line for line in err if line.startswith("error:")] == [
        line for line in err if message in line]
    assert not list(tmp_path.glob("o-*"))
