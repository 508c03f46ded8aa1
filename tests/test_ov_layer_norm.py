"""LayerNorms rewritten as OpenVINO's MVN (``model.ov_layer_norm``): every
spelling of LayerNorm becomes one MVN with the same results, anything that
is not a LayerNorm is left alone, output names survive, and the engine's
converted BERT runs no LayerNorm op by op."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

pytest.importorskip("openvino", reason="openvino is not installed")
tf = pytest.importorskip("tensorflow")

import openvino as ov  # noqa: E402

from model.ov_layer_norm import fuse_layer_norms  # noqa: E402

H = 16
RNG = np.random.default_rng(3)
GAMMA = tf.constant(RNG.uniform(0.5, 1.5, H).astype(np.float32))
BETA = tf.constant(RNG.normal(0, 0.5, H).astype(np.float32))
KERNEL = tf.constant(RNG.normal(0, 0.3, (H, H)).astype(np.float32))


def _moments(x, axes=(-1,)):
    return tf.nn.moments(x, axes=list(axes), keepdims=True)


def reference_bert(x):
    """``model.bert``'s spelling (Google's reference BERT's too)."""
    mean, var = _moments(x)
    return (x - mean) * tf.math.rsqrt(var + 1e-12) * GAMMA + BETA


_KERAS = tf.keras.layers.LayerNormalization(
    epsilon=1e-6, gamma_initializer=tf.constant_initializer(GAMMA.numpy()),
    beta_initializer=tf.constant_initializer(BETA.numpy()))
_KERAS.build((None, None, H))


def keras_layer(x):
    """Keras 3's ``LayerNormalization``: ``x * inv - mean * inv + beta``."""
    return _KERAS(x)


def divide_by_sqrt(x):
    mean = tf.reduce_mean(x, [-1], keepdims=True)
    centred = x - mean
    var = tf.reduce_mean(centred * centred, [-1], keepdims=True)
    return centred / tf.sqrt(var + 1e-5) * GAMMA + BETA


def power_two(x):
    mean = tf.reduce_mean(x, [-1], keepdims=True)
    centred = x - mean
    var = tf.reduce_mean(tf.pow(centred, 2.0), [-1], keepdims=True)
    return centred * tf.math.rsqrt(var + 1e-5)


def scaled_after(x):
    """A scalar factor and a second shift after the LayerNorm: still one."""
    return reference_bert(x) * 0.5 - BETA


# Not LayerNorms: moments over another axis, a residual mixed into the
# centring, a shift by the mean alone.
def other_axis(x):
    mean, var = _moments(x, axes=(1,))
    return (x - mean) * tf.math.rsqrt(var + 1e-12) * GAMMA + BETA


def unbalanced(x):
    mean, var = _moments(x)
    r = tf.math.rsqrt(var + 1e-12)
    return x * r - 0.5 * mean * r


def centred_only(x):
    mean, _ = _moments(x)
    return x - mean


def _convert(body, name: str = "out"):
    """``body`` then a matrix product, converted; returns (model, fn)."""
    @tf.function(input_signature=[tf.TensorSpec([None, None, H],
                                                tf.float32)])
    def fn(x):
        return {name: tf.matmul(body(x), KERNEL)}
    return ov.convert_model(fn), fn


def _ops(model) -> Counter:
    return Counter(op.get_type_name() for op in model.get_ops())


def _run(model, x):
    compiled = ov.Core().compile_model(model, "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(x)[0]


@pytest.mark.parametrize("body", [reference_bert, keras_layer,
                                  divide_by_sqrt, power_two, scaled_after])
def test_each_spelling_becomes_one_mvn_with_the_same_results(body):
    model, fn = _convert(body)
    before = _ops(model)
    fused = fuse_layer_norms(model)
    after = _ops(model)
    # OpenVINO's converter already fuses some spellings itself.
    assert fused == before["ReduceMean"] // 2
    assert after["ReduceMean"] == 0 and after["MVN"] == 1
    x = RNG.normal(2.0, 3.0, (3, 5, H)).astype(np.float32)
    want = fn(x)["out"].numpy()
    np.testing.assert_allclose(_run(model, x), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("body", [other_axis, unbalanced, centred_only])
def test_what_is_not_a_layer_norm_is_left_alone(body):
    model, fn = _convert(body)
    before = _ops(model)
    assert fuse_layer_norms(model) == 0
    assert _ops(model) == before
    x = RNG.normal(2.0, 3.0, (3, 5, H)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), fn(x)["out"].numpy(),
                               rtol=1e-4, atol=1e-4)


def test_a_layer_norm_that_is_an_output_keeps_its_name():
    """BERT's last LayerNorm is ``sequence_output`` itself."""
    @tf.function(input_signature=[tf.TensorSpec([None, None, H],
                                                tf.float32)])
    def fn(x):
        return {"sequence_output": reference_bert(x)}
    model = ov.convert_model(fn)
    assert fuse_layer_norms(model) == 1
    assert [sorted(o.get_names()) for o in model.outputs] == [
        ["sequence_output"]]
    x = RNG.normal(0.0, 2.0, (2, 4, H)).astype(np.float32)
    compiled = ov.Core().compile_model(model, "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_allclose(compiled(x)["sequence_output"],
                               fn(x)["sequence_output"].numpy(),
                               rtol=1e-4, atol=1e-4)


def test_the_engine_runs_bert_without_op_by_op_layer_norms(
        tmp_path, small_vocab, random_bert_weights):
    """A BERT with LayerNorm weights that matter (``random_bert_weights``):
    after conversion every one of its 2L+1 LayerNorms is an MVN, and its
    outputs still match TensorFlow's."""
    from model.bert import BertConfig
    from model.export import export_bert_saved_model
    from model.load import load_bert_saved_model
    from model.openvino_engine import OpenVINOBertModel, _compile, convert
    config = BertConfig(vocab_size=len(small_vocab), hidden_size=32,
                        num_layers=2, num_heads=4, intermediate_size=64,
                        max_position_embeddings=64)
    path = export_bert_saved_model(
        str(tmp_path / "bert"), config, small_vocab,
        weights=random_bert_weights(config, seed=5))
    model = convert(path)
    ops = _ops(model)
    assert ops["MVN"] == 2 * config.num_layers + 1
    assert ops["ReduceMean"] == 0
    engine = OpenVINOBertModel(path, _compile(ov.Core(), model, "float32",
                                              None), "float32")
    reference = load_bert_saved_model(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(104, len(small_vocab), (3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    pooled, sequence = engine(ids * mask, mask, np.zeros_like(ids))
    want_pooled, want_sequence = reference(ids * mask, mask,
                                           np.zeros_like(ids))
    np.testing.assert_allclose(pooled, want_pooled, atol=1e-4)
    real = mask.astype(bool)
    np.testing.assert_allclose(sequence[real], want_sequence[real],
                               atol=1e-4)
