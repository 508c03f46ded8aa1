"""Tests for the BERT encoder, its SavedModel export and the demo model.

The exported model is checked against the independent NumPy reference in
``bert_reference.py`` using tiny configurations so the file stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from model.bert import BertConfig, BertEncoder, bert_weight_shapes
from model.demo import DEMO_CONFIG, demo_vocab, ensure_demo_model
from model.export import export_bert_saved_model
from model.runtime import default_cache_dir
from tests.bert_reference import ReferenceBert

TINY = BertConfig(vocab_size=200, hidden_size=32, num_layers=2, num_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
TINY_VOCAB = ["[PAD]"] + [f"tok{i}" for i in range(1, TINY.vocab_size)]


def _random_batch(rng: np.random.Generator, lengths: list[int], seq_len: int,
                  vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded int32 (ids, mask, segments) with the given real lengths."""
    batch = len(lengths)
    ids = np.zeros((batch, seq_len), np.int32)
    mask = np.zeros((batch, seq_len), np.int32)
    segments = np.zeros((batch, seq_len), np.int32)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(1, vocab_size, length)
        mask[row, :length] = 1
        split = rng.integers(0, length + 1)
        segments[row, split:length] = 1
    return ids, mask, segments


def _call(model, ids, mask, segments) -> tuple[np.ndarray, np.ndarray]:
    """Hub-style list call on a loaded SavedModel -> NumPy outputs."""
    pooled, sequence = model([tf.constant(ids), tf.constant(mask),
                              tf.constant(segments)])
    return pooled.numpy(), sequence.numpy()


@pytest.fixture(scope="module")
def weights(random_bert_weights) -> dict[str, np.ndarray]:
    return random_bert_weights(TINY, seed=1234)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, weights) -> str:
    target = str(tmp_path_factory.mktemp("export") / "tiny_bert")
    return export_bert_saved_model(target, TINY, TINY_VOCAB, weights=weights)


@pytest.fixture(scope="module")
def loaded(export_dir):
    return tf.saved_model.load(export_dir)


@pytest.fixture(scope="module")
def reference(weights) -> ReferenceBert:
    return ReferenceBert(weights, TINY.num_layers, TINY.num_heads,
                         TINY.layer_norm_eps)


@pytest.mark.parametrize("lengths,seq_len", [
    ([1], 1),
    ([7], 7),
    ([3, 16, 9], 16),
    ([33, 1, 20, 33, 5], 33),
    ([64, 10], 64),
])
def test_saved_model_matches_reference(loaded, reference, lengths, seq_len):
    rng = np.random.default_rng(seq_len)
    ids, mask, segments = _random_batch(rng, lengths, seq_len, TINY.vocab_size)
    pooled, sequence = _call(loaded, ids, mask, segments)
    ref_pooled, ref_sequence = reference(ids, mask, segments)
    assert pooled.shape == (len(lengths), TINY.hidden_size)
    assert sequence.shape == (len(lengths), seq_len, TINY.hidden_size)
    assert pooled.dtype == np.float32 and sequence.dtype == np.float32
    np.testing.assert_allclose(pooled, ref_pooled, atol=1e-4, rtol=0)
    real = mask.astype(bool)
    np.testing.assert_allclose(sequence[real], ref_sequence[real], atol=1e-4,
                               rtol=0)


def test_random_init_matches_reference():
    encoder = BertEncoder(TINY, seed=3)
    ref = ReferenceBert(encoder.get_weights(), TINY.num_layers, TINY.num_heads)
    ids, mask, segments = _random_batch(np.random.default_rng(0), [5, 12], 12,
                                        TINY.vocab_size)
    pooled, sequence = encoder(ids, mask, segments)
    ref_pooled, ref_sequence = ref(ids, mask, segments)
    np.testing.assert_allclose(pooled.numpy(), ref_pooled, atol=1e-4, rtol=0)
    real = mask.astype(bool)
    np.testing.assert_allclose(sequence.numpy()[real], ref_sequence[real],
                               atol=1e-4, rtol=0)


def test_serving_signature_agrees_with_list_call(loaded):
    ids, mask, segments = _random_batch(np.random.default_rng(5), [4, 9], 9,
                                        TINY.vocab_size)
    pooled, sequence = _call(loaded, ids, mask, segments)
    serve = loaded.signatures["serving_default"]
    out = serve(input_word_ids=tf.constant(ids), input_mask=tf.constant(mask),
                segment_ids=tf.constant(segments))
    assert set(out) == {"pooled_output", "sequence_output", "encoder_outputs"}
    np.testing.assert_allclose(out["pooled_output"].numpy(), pooled, atol=1e-6)
    np.testing.assert_allclose(out["sequence_output"].numpy(), sequence,
                               atol=1e-6)
    # The layers, stacked: a signature's outputs are tensors, not lists.
    layers = out["encoder_outputs"].numpy()
    assert layers.shape == (TINY.num_layers, 2, 9, TINY.hidden_size)
    np.testing.assert_allclose(layers[-1], sequence, atol=1e-6)


def test_signature_returns_every_layer(loaded, reference):
    """``encoder_outputs``, as TF Hub's dict-interface encoders name them:
    each transformer layer's tokens, first layer first, the last one
    ``sequence_output``, equal to the NumPy reference layer by layer."""
    ids, mask, segments = _random_batch(np.random.default_rng(8), [5, 12, 1],
                                        12, TINY.vocab_size)
    out = loaded.signatures["serving_default"](
        input_word_ids=tf.constant(ids), input_mask=tf.constant(mask),
        segment_ids=tf.constant(segments))
    layers = out["encoder_outputs"].numpy()
    assert layers.shape == (TINY.num_layers,) + ids.shape + (
        TINY.hidden_size,)
    np.testing.assert_allclose(layers[-1], out["sequence_output"].numpy(),
                               atol=1e-6)
    for row in range(len(ids)):
        real = mask[row].astype(bool)
        want = reference.layers_one(ids[row], mask[row], segments[row])
        assert len(want) == TINY.num_layers
        for got, expected in zip(layers, want):
            np.testing.assert_allclose(got[row][real], expected[real],
                                       atol=1e-4, rtol=0)
    assert not np.allclose(layers[0], layers[-1])  # really other layers


def test_vocab_asset_and_config(loaded, export_dir):
    asset_path = loaded.vocab_file.asset_path.numpy().decode("utf-8")
    assert Path(asset_path).parent == Path(export_dir) / "assets"
    assert Path(asset_path).name == "vocab.txt"
    assert Path(asset_path).read_text(encoding="utf-8").splitlines() == TINY_VOCAB
    config_path = Path(export_dir) / "assets.extra" / "bert_config.json"
    assert BertConfig.from_json(config_path.read_text()) == TINY
    assert not [p for p in os.listdir(Path(export_dir).parent)
                if p != "tiny_bert"], "staging directory left behind"


def test_variables_are_tracked(loaded):
    assert loaded.do_lower_case.trainable is False
    assert loaded.do_lower_case.dtype == tf.bool
    restored = loaded.encoder.weight_variables
    assert set(restored) == set(bert_weight_shapes(TINY))
    assert all(v.trainable for v in restored.values())


def test_loaded_model_offers_the_reusable_savedmodel_api(loaded, export_dir):
    """What hub.KerasLayer(trainable=True) reads from the root: variables and
    trainable_variables (every encoder weight, nothing else),
    regularization_losses, and a training argument on __call__; gradients
    of the restored call reach every weight."""
    encoder = {id(v) for v in loaded.encoder.weight_variables.values()}
    assert len(encoder) == len(bert_weight_shapes(TINY))
    assert [id(v) for v in loaded.variables] == [
        id(v) for v in loaded.trainable_variables]
    assert {id(v) for v in loaded.trainable_variables} == encoder
    assert len(loaded.trainable_variables) == len(encoder)
    assert list(loaded.regularization_losses) == []
    ids, mask, segments = (tf.constant(a) for a in _random_batch(
        np.random.default_rng(3), [6, 9], 9, TINY.vocab_size))
    inference = loaded([ids, mask, segments])
    for training in (True, False):  # no dropout: both modes alike
        outputs = loaded([ids, mask, segments], training=training)
        for got, want in zip(outputs, inference):
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)
    with tf.GradientTape() as tape:
        pooled, sequence = loaded([ids, mask, segments], training=True)
        loss = tf.reduce_sum(pooled ** 2) + tf.reduce_sum(sequence ** 2)
    grads = tape.gradient(loss, loaded.trainable_variables)
    assert all(g is not None for g in grads)
    assert all(float(tf.norm(tf.convert_to_tensor(g))) > 0 for g in grads)
    # The weights keep Google's names in the checkpoint keys, where
    # model.load.infer_hidden_size looks for the embedding table.
    keys = tf.train.load_checkpoint(
        os.path.join(export_dir, "variables", "variables")
    ).get_variable_to_shape_map()
    assert any("word_embeddings" in k and v == [TINY.vocab_size,
                                                TINY.hidden_size]
               for k, v in keys.items())


MODELS_DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
_CARD_MARKER = ("<!-- model card usage: tests/test_model_export.py runs this "
                "verbatim -->")
_CARD_MODEL = '"/path/to/saved_model"'
# Runs before the card's snippet: skips (exit 0 with a note) where the
# fine-tuning extras cannot be imported.
_CARD_PRELUDE = """\
import json, sys
try:
    import tensorflow_hub, tf_keras
except ImportError as err:
    print(json.dumps({"skip": f"{type(err).__name__}: {err}"}))
    sys.exit(0)
"""
# Runs after it: a two-class classifier on pooled_output, two training
# steps, and a report of what hub.KerasLayer exposed and what changed.
_CARD_EPILOGUE = """
import numpy as np
logits = tf.keras.layers.Dense(2)(pooled_output)
classifier = tf.keras.Model([input_word_ids, input_mask, segment_ids], logits)
classifier.compile(
    optimizer=tf.keras.optimizers.Adam(1e-3),
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
before = [w.numpy().copy() for w in bert_layer.trainable_weights]
rng = np.random.default_rng(0)
ids = rng.integers(1, int(sys.argv[1]), (8, max_seq_length)).astype(np.int32)
mask = np.ones_like(ids)
segments = np.zeros_like(ids)
segments[:, max_seq_length // 2:] = 1
labels = np.array([0, 1] * 4)
for _ in range(2):
    classifier.train_on_batch([ids, mask, segments], labels)
print(json.dumps({
    "legacy_keras": isinstance(bert_layer, tf_keras.layers.Layer),
    "trainable": [[w.name, list(w.shape)] for w in bert_layer.trainable_weights],
    "non_trainable": len(bert_layer.non_trainable_weights),
    "changed": [bool(np.any(w.numpy() != b))
                for w, b in zip(bert_layer.trainable_weights, before)],
}))
"""


def _card_snippet() -> str:
    """The usage snippet of the model card (docs/models.md), verbatim."""
    text = MODELS_DOC.read_text(encoding="utf-8")
    assert text.count(_CARD_MARKER) == 1
    after = text.split(_CARD_MARKER, 1)[1].lstrip("\n")
    assert after.startswith("```python\n")
    return after[len("```python\n"):].split("```", 1)[0]


def test_model_card_snippet_fine_tunes_every_weight(tmp_path):
    """The model card's snippet, run verbatim (only the model path filled
    in) under TF_USE_LEGACY_KERAS=1, builds a trainable hub.KerasLayer that
    exposes every BERT weight; two training steps of a classifier on top
    change them all."""
    config = BertConfig(vocab_size=64, hidden_size=16, num_layers=1,
                        num_heads=2, intermediate_size=32,
                        max_position_embeddings=128)
    model_dir = export_bert_saved_model(
        str(tmp_path / "m"), config,
        ["[PAD]"] + [f"t{i}" for i in range(1, config.vocab_size)])
    snippet = _card_snippet()
    assert snippet.count(_CARD_MODEL) == 1
    script = tmp_path / "card.py"
    script.write_text(_CARD_PRELUDE
                      + snippet.replace(_CARD_MODEL, repr(model_dir))
                      + _CARD_EPILOGUE, encoding="utf-8")
    # The variable must be set before TensorFlow is imported: a fresh
    # interpreter.
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
    done = subprocess.run([sys.executable, str(script), str(config.vocab_size)],
                          env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(f"fine-tuning extras not importable: {report['skip']}")
    assert report["legacy_keras"]
    shapes = bert_weight_shapes(config)
    exposed = {name.split(":")[0]: tuple(shape)
               for name, shape in report["trainable"]}
    assert exposed == shapes
    assert report["non_trainable"] == 0
    assert all(report["changed"]) and len(report["changed"]) == len(shapes)


@pytest.mark.parametrize("lower", [True, False])
def test_do_lower_case_round_trip(tmp_path, lower):
    path = export_bert_saved_model(str(tmp_path / "m"), TINY, TINY_VOCAB,
                                   do_lower_case=lower)
    assert bool(tf.saved_model.load(path).do_lower_case.numpy()) is lower


def test_vocab_file_path_is_accepted(tmp_path):
    vocab_path = tmp_path / "my_tokens.txt"
    vocab_path.write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    path = export_bert_saved_model(str(tmp_path / "m"), TINY, str(vocab_path))
    assert (Path(path) / "assets" / "vocab.txt").read_text(
        encoding="utf-8").splitlines() == TINY_VOCAB


def test_padding_invariance(loaded):
    rng = np.random.default_rng(11)
    ids, mask, segments = _random_batch(rng, [10], 10, TINY.vocab_size)
    alone_pooled, alone_seq = _call(loaded, ids, mask, segments)

    padded = [np.pad(a, ((0, 0), (0, 30))) for a in (ids, mask, segments)]
    pad_pooled, pad_seq = _call(loaded, *padded)
    np.testing.assert_allclose(pad_pooled, alone_pooled, atol=1e-5, rtol=0)
    np.testing.assert_allclose(pad_seq[:, :10], alone_seq, atol=1e-5, rtol=0)

    others = _random_batch(rng, [40, 3], 40, TINY.vocab_size)
    batched = [np.concatenate([o[:1], p, o[1:]])
               for o, p in zip(others, padded)]
    batch_pooled, batch_seq = _call(loaded, *batched)
    np.testing.assert_allclose(batch_pooled[1], alone_pooled[0], atol=1e-5,
                               rtol=0)
    np.testing.assert_allclose(batch_seq[1, :10], alone_seq[0], atol=1e-5,
                               rtol=0)


def test_too_long_sequence_fails(loaded):
    n = TINY.max_position_embeddings + 1
    ones = tf.ones([1, n], tf.int32)
    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded([ones, ones, tf.zeros([1, n], tf.int32)])


def test_weight_names_follow_google_checkpoint():
    names = set(BertEncoder(TINY).get_weights())
    assert "bert/embeddings/word_embeddings" in names
    assert "bert/encoder/layer_1/attention/self/query/kernel" in names
    assert "bert/encoder/layer_0/attention/output/LayerNorm/gamma" in names
    assert "bert/encoder/layer_1/output/LayerNorm/beta" in names
    assert "bert/pooler/dense/kernel" in names
    assert len(names) == 5 + 16 * TINY.num_layers + 2


def test_init_is_seeded_and_follows_bert_scheme():
    a, b = BertEncoder(TINY, seed=7).get_weights(), BertEncoder(TINY, seed=7).get_weights()
    c = BertEncoder(TINY, seed=8).get_weights()
    kernel = "bert/encoder/layer_0/intermediate/dense/kernel"
    np.testing.assert_array_equal(a[kernel], b[kernel])
    assert not np.array_equal(a[kernel], c[kernel])
    assert np.abs(a[kernel]).max() <= 2 * TINY.initializer_range + 1e-6
    assert np.all(a["bert/pooler/dense/bias"] == 0)
    assert np.all(a["bert/embeddings/LayerNorm/gamma"] == 1)
    assert np.all(a["bert/embeddings/LayerNorm/beta"] == 0)


def test_get_set_weights_round_trip(weights):
    encoder = BertEncoder(TINY, seed=0)
    encoder.set_weights(weights)
    got = encoder.get_weights()
    assert set(got) == set(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(got[name], value)
    other = BertEncoder(TINY, seed=99)
    other.set_weights(got)
    ids, mask, segments = _random_batch(np.random.default_rng(2), [6], 6,
                                        TINY.vocab_size)
    np.testing.assert_array_equal(encoder(ids, mask, segments)[0].numpy(),
                                  other(ids, mask, segments)[0].numpy())


def test_set_weights_errors_name_the_keys(weights):
    encoder = BertEncoder(TINY)
    before = encoder.get_weights()
    bad = dict(weights)
    del bad["bert/pooler/dense/bias"]
    bad["cls/predictions/output_bias"] = np.zeros(3, np.float32)
    bad["bert/embeddings/word_embeddings"] = np.zeros((5, 32), np.float32)
    with pytest.raises(ValueError) as err:
        encoder.set_weights(bad)
    message = str(err.value)
    assert "missing keys" in message and "bert/pooler/dense/bias" in message
    assert "unexpected keys" in message and "cls/predictions/output_bias" in message
    assert "bert/embeddings/word_embeddings: expected (200, 32), got (5, 32)" in message
    after = encoder.get_weights()
    for name in before:  # a failed set_weights must not modify anything
        np.testing.assert_array_equal(before[name], after[name])


def test_vocab_size_mismatch_raises(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        export_bert_saved_model(str(tmp_path / "m"), TINY, TINY_VOCAB[:-1])
    assert not (tmp_path / "m").exists()


def test_existing_export_dir_is_not_overwritten(export_dir):
    with pytest.raises(FileExistsError):
        export_bert_saved_model(export_dir, TINY, TINY_VOCAB)


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    import model.export as export_module

    def crash(module, config, target):
        Path(target, "partial.bin").write_bytes(b"x")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(export_module, "_save", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        export_bert_saved_model(str(tmp_path / "m"), TINY, TINY_VOCAB)
    assert os.listdir(tmp_path) == []


def test_config_json_and_google_keys():
    assert BertConfig.from_json(TINY.to_json()) == TINY
    google = {
        "attention_probs_dropout_prob": 0.1, "directionality": "bidi",
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
        "initializer_range": 0.02, "intermediate_size": 3072,
        "max_position_embeddings": 512, "num_attention_heads": 12,
        "num_hidden_layers": 12, "pooler_fc_size": 768,
        "pooler_num_attention_heads": 12, "pooler_num_fc_layers": 3,
        "pooler_size_per_head": 128, "pooler_type": "first_token_transform",
        "type_vocab_size": 2, "vocab_size": 21128,
    }
    assert BertConfig.from_json(json.dumps(google)) == BertConfig(vocab_size=21128)
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig.from_dict({**google, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="Unknown"):
        BertConfig.from_dict({"vocab_size": 10, "hiden_size": 8})
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(vocab_size=10, hidden_size=30, num_heads=4)


def test_demo_vocab_layout():
    vocab = demo_vocab()
    assert vocab == demo_vocab()
    assert len(vocab) == len(set(vocab)) == DEMO_CONFIG.vocab_size
    assert vocab[0] == "[PAD]" and vocab[1] == "[unused1]" and vocab[99] == "[unused99]"
    assert vocab[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = set(vocab)
    assert {"中", "文", "。", "，", "“", "…", "a", "##z", "##9", "the"} <= tokens
    assert all(chr(c) in tokens for c in range(0x4E00, 0xA000))
    assert all(t == t.lower() for t in vocab if not t.startswith("["))
    assert " " not in tokens and all(t.strip() == t and t for t in vocab)


def test_default_cache_dir(monkeypatch):
    monkeypatch.setenv("BERT_ZH_EMBED_CACHE", "/some/where")
    assert default_cache_dir() == "/some/where"
    monkeypatch.delenv("BERT_ZH_EMBED_CACHE")
    assert default_cache_dir() == os.path.expanduser("~/.cache/bert_zh_embed")


def test_ensure_demo_model_builds_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="model.demo")
    path = ensure_demo_model(str(tmp_path))
    assert "Built" in caplog.text
    pb = Path(path) / "saved_model.pb"
    mtime = pb.stat().st_mtime_ns
    caplog.clear()
    assert ensure_demo_model(str(tmp_path)) == path
    assert "Reusing" in caplog.text
    assert pb.stat().st_mtime_ns == mtime
    assert os.listdir(tmp_path) == [os.path.basename(path)]

    model = tf.saved_model.load(path)
    assert bool(model.do_lower_case.numpy()) is True
    ids = tf.constant([[101, 2000, 3000, 102, 0]], tf.int32)
    mask = tf.constant([[1, 1, 1, 1, 0]], tf.int32)
    pooled, sequence = model([ids, mask, tf.zeros_like(ids)])
    assert pooled.shape == (1, DEMO_CONFIG.hidden_size)
    assert sequence.shape == (1, 5, DEMO_CONFIG.hidden_size)
