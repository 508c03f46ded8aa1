"""bfloat16 on GPUs: the encoder re-traced with bfloat16 matrix products.

TensorFlow's ``--precision bfloat16`` on CPUs is oneDNN's graph rewrite,
which GPUs do not get: a restored SavedModel's graph is float32 and stays
so.  For GPU workers this module reads the SavedModel's weights and traces
``model.bert.BertEncoder`` again with every matrix product (the dense
layers and both attention products) computed in bfloat16 with bfloat16
copies of the kernels, and everything else (embeddings, LayerNorm,
softmax, GELU, biases, residual sums) in float32, so the outputs stay
float32 and the numerically sensitive steps keep their range and
precision.  Under ``--xla on`` the re-trace is compiled by XLA like the
float32 model (``bench.gpu`` measured it on an H200: 1.83x float32 and
1.34x PyTorch's bfloat16 ``BertModel`` in model calls).

It works on models in this project's layout (written by ``model.export``,
including those ``model.convert`` made from Google or Hugging Face
checkpoints): their root has an ``encoder`` whose weights are keyed by
Google checkpoint names and an ``assets.extra/bert_config.json``.  Other
SavedModels raise ``ModelFormatError`` and the engine runs them in
float32.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import tensorflow as tf

from model.bert import CONFIG_FILENAME, BertConfig, BertEncoder
from model.errors import ModelFormatError
from model.load import check_inputs
from model.signature import INPUT_NAMES
from model.variables import ModelLimits, read_model_limits

_LOG = logging.getLogger(__name__)

_INPUT_SPECS = [tf.TensorSpec([None, None], tf.int32, name=name)
                for name in INPUT_NAMES]


class Bfloat16Encoder(BertEncoder):
    """``BertEncoder`` whose matrix products run in bfloat16 (float32
    accumulation and results), from bfloat16 copies of the kernels made
    once."""

    def __init__(self, config: BertConfig, weights: dict[str, np.ndarray]
                 ) -> None:
        super().__init__(config, name="bert_encoder_bf16")
        self.set_weights(weights)
        self._kernels = {
            name[:-len("/kernel")]: tf.Variable(
                tf.cast(variable, tf.bfloat16), trainable=False,
                name=name + "_bf16")
            for name, variable in self.weight_variables.items()
            if name.endswith("/kernel")}

    def _matmul(self, a: tf.Tensor, b: tf.Tensor,
                transpose_b: bool = False) -> tf.Tensor:
        """Attention's products: operands rounded to bfloat16."""
        product = tf.matmul(tf.cast(a, tf.bfloat16), tf.cast(b, tf.bfloat16),
                            transpose_b=transpose_b)
        return tf.cast(product, tf.float32)

    def _dense(self, x: tf.Tensor, prefix: str) -> tf.Tensor:
        """``x @ kernel + bias`` with the bfloat16 kernel; bias in
        float32."""
        product = tf.matmul(tf.cast(x, tf.bfloat16), self._kernels[prefix])
        return tf.cast(product, tf.float32) + self._w(f"{prefix}/bias")


def _read_config(model_dir: str) -> BertConfig:
    path = f"{model_dir.rstrip('/')}/assets.extra/{CONFIG_FILENAME}"
    if not tf.io.gfile.exists(path):
        raise ModelFormatError(
            f"{model_dir}: no assets.extra/{CONFIG_FILENAME}, so not a model "
            "of model.export / model.convert; bfloat16 on a GPU needs one")
    with tf.io.gfile.GFile(path, "r") as handle:
        return BertConfig.from_json(handle.read())


def read_weights(model_dir: str) -> tuple[BertConfig, dict[str, np.ndarray]]:
    """The architecture and weights (Google checkpoint names) of a model
    in this project's layout; ModelFormatError for any other model."""
    config = _read_config(model_dir)
    restored = tf.saved_model.load(model_dir)
    variables = getattr(restored, "bert_weights", None) or getattr(
        getattr(restored, "encoder", None), "weight_variables", None)
    if variables is None:
        raise ModelFormatError(f"{model_dir}: the SavedModel has no "
                               "bert_weights or encoder.weight_variables "
                               "to re-trace")
    try:
        weights = {str(name): variable.numpy()
                   for name, variable in variables.items()}
    except AttributeError as err:
        raise ModelFormatError(f"{model_dir}: encoder.weight_variables is "
                               f"not a dict of variables ({err})") from err
    return config, weights


class Bfloat16BertModel:
    """The re-traced encoder with ``BertSavedModel``'s call:
    ``model(input_word_ids, input_mask, segment_ids) -> (pooled, sequence)``
    as float32 numpy arrays; inputs are checked against ``limits`` first
    (``model.load.check_inputs``)."""

    engine = "tensorflow"
    precision = "bfloat16"

    def __init__(self, model_dir: str, encoder: Bfloat16Encoder,
                 limits: ModelLimits = ModelLimits(),
                 jit_compile: bool = False) -> None:
        self.model_dir = model_dir
        self.encoder = encoder
        self.limits = limits
        self.jit_compile = jit_compile
        self.notes: list[str] = []
        self._call = tf.function(
            lambda ids, mask, segments: encoder(ids, mask, segments),
            input_signature=_INPUT_SPECS, jit_compile=jit_compile)
        self._call_layers = tf.function(encoder.encode,
                                        input_signature=_INPUT_SPECS,
                                        jit_compile=jit_compile)

    def concrete_function(self) -> Any:
        """The traced graph (dynamic batch and length), for inspection."""
        return self._call.get_concrete_function()

    def __call__(self, input_word_ids: np.ndarray, input_mask: np.ndarray,
                 segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        arrays = check_inputs(dict(zip(INPUT_NAMES, (
            input_word_ids, input_mask, segment_ids))), self.limits)
        pooled, sequence = self._call(*(tf.constant(arrays[name], tf.int32)
                                        for name in INPUT_NAMES))
        return (np.asarray(pooled, np.float32),
                np.asarray(sequence, np.float32))

    def call_with_layers(self, input_word_ids: np.ndarray,
                         input_mask: np.ndarray, segment_ids: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """``__call__``'s outputs plus every layer's ``[B, S, H]`` tokens
        (``encoder_outputs``, first layer first), for ``--pooling
        first_last_avg``."""
        arrays = check_inputs(dict(zip(INPUT_NAMES, (
            input_word_ids, input_mask, segment_ids))), self.limits)
        pooled, sequence, layers = self._call_layers(
            *(tf.constant(arrays[name], tf.int32) for name in INPUT_NAMES))
        return (np.asarray(pooled, np.float32),
                np.asarray(sequence, np.float32),
                [np.asarray(layer, np.float32) for layer in layers])


def load_bfloat16_model(model_dir: str, jit_compile: bool = False
                        ) -> Bfloat16BertModel:
    """The SavedModel at ``model_dir`` re-traced for bfloat16 matrix
    products (see the module docstring), compiled by XLA (once per input
    shape) with ``jit_compile``; ModelFormatError for models not in this
    project's layout."""
    started = time.perf_counter()
    config, weights = read_weights(model_dir)
    model = Bfloat16BertModel(model_dir, Bfloat16Encoder(config, weights),
                              read_model_limits(model_dir), jit_compile)
    _LOG.info("Re-traced %s with bfloat16 matrix products in %.1f s",
              model_dir, time.perf_counter() - started)
    return model
