"""A BERT encoder written directly against TensorFlow 2 low-level ops.

The encoder mirrors the architecture of Google's original BERT (and of the
TF Hub ``bert_zh_L-12_H-768_A-12`` model) closely enough that weights can be
moved between them by name: every variable is keyed by the name it has in
Google's original TF1 checkpoints (``bert/encoder/layer_0/...``).  Keeping
those names lets a real checkpoint be loaded with ``set_weights`` and lets
tests compare against an independent reference implementation.

Only inference is supported (no dropout), which is all the embedding
pipeline needs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

# Added to attention logits of padded keys.  Large enough that exp() of the
# shifted logit underflows to exactly 0 in float32, small enough that adding
# it to ordinary logits cannot overflow to -inf (which would give NaN for a
# row whose keys are all padding).
_MASK_NEGATIVE = -1e9

# The file name of a ``BertConfig`` (``to_json``) that models written by
# ``model.export`` keep under ``assets.extra/`` (the bfloat16 re-trace reads
# it back).
CONFIG_FILENAME = "bert_config.json"

# Keys of Google's bert_config.json that have no effect on inference with
# this encoder (dropout only applies in training; the rest are metadata of
# the released Chinese checkpoint).
_IGNORED_GOOGLE_KEYS = frozenset(
    {
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "directionality",
        "pooler_fc_size",
        "pooler_num_attention_heads",
        "pooler_num_fc_layers",
        "pooler_size_per_head",
        "pooler_type",
    }
)

# Google's bert_config.json name -> BertConfig field name.
_GOOGLE_ALIASES = {
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture hyper-parameters of a BERT encoder.

    Defaults are those of BERT-Base; only ``vocab_size`` must be given.
    """

    vocab_size: int
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        """Reject sizes that cannot form a valid encoder."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (
                    isinstance(value, bool) or not isinstance(value, int)
                    or value <= 0):
                raise ValueError(f"BertConfig.{field.name} must be a positive "
                                 f"int, got {value!r}")
        if not self.layer_norm_eps > 0 or not self.initializer_range >= 0:
            raise ValueError("layer_norm_eps must be > 0 and initializer_range "
                             ">= 0")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})")

    @property
    def head_size(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a plain dict using this class's field names."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Serialise to JSON (stable key order, human readable)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "BertConfig":
        """Parse JSON written by ``to_json`` or a Google ``bert_config.json``."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BertConfig":
        """Build a config from our field names or Google's bert_config keys.

        Google's ``num_hidden_layers``/``num_attention_heads`` are mapped to
        our names, ``hidden_act`` must be ``"gelu"`` (the only activation this
        encoder implements), dropout probabilities and checkpoint metadata are
        ignored, and any other unknown key raises ``ValueError`` so typos do
        not silently fall back to BERT-Base defaults.
        """
        field_names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            if key == "hidden_act":
                if value != "gelu":
                    raise ValueError(
                        f"Unsupported hidden_act {value!r}; only 'gelu' (exact "
                        "erf GELU) is implemented")
                continue
            if key in _IGNORED_GOOGLE_KEYS:
                continue
            name = _GOOGLE_ALIASES.get(key, key)
            if name not in field_names:
                unknown.append(key)
                continue
            if name in kwargs:
                raise ValueError(f"Config key {name!r} given more than once "
                                 f"(directly and via {key!r})")
            kwargs[name] = value
        if unknown:
            raise ValueError(f"Unknown BERT config keys: {sorted(unknown)}")
        if "vocab_size" not in kwargs:
            raise ValueError("BERT config is missing 'vocab_size'")
        return cls(**kwargs)


def _layer_prefix(index: int) -> str:
    """Checkpoint name prefix of transformer layer ``index``."""
    return f"bert/encoder/layer_{index}"


def bert_weight_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """Map every weight name (Google checkpoint naming) to its shape.

    The dict order is the canonical weight order used for initialisation,
    so a given seed always yields the same weights.
    """
    h, i = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "bert/embeddings/word_embeddings": (config.vocab_size, h),
        "bert/embeddings/token_type_embeddings": (config.type_vocab_size, h),
        "bert/embeddings/position_embeddings":
            (config.max_position_embeddings, h),
        "bert/embeddings/LayerNorm/gamma": (h,),
        "bert/embeddings/LayerNorm/beta": (h,),
    }
    for layer in range(config.num_layers):
        p = _layer_prefix(layer)
        for proj in ("query", "key", "value"):
            shapes[f"{p}/attention/self/{proj}/kernel"] = (h, h)
            shapes[f"{p}/attention/self/{proj}/bias"] = (h,)
        shapes[f"{p}/attention/output/dense/kernel"] = (h, h)
        shapes[f"{p}/attention/output/dense/bias"] = (h,)
        shapes[f"{p}/attention/output/LayerNorm/gamma"] = (h,)
        shapes[f"{p}/attention/output/LayerNorm/beta"] = (h,)
        shapes[f"{p}/intermediate/dense/kernel"] = (h, i)
        shapes[f"{p}/intermediate/dense/bias"] = (i,)
        shapes[f"{p}/output/dense/kernel"] = (i, h)
        shapes[f"{p}/output/dense/bias"] = (h,)
        shapes[f"{p}/output/LayerNorm/gamma"] = (h,)
        shapes[f"{p}/output/LayerNorm/beta"] = (h,)
    shapes["bert/pooler/dense/kernel"] = (h, h)
    shapes["bert/pooler/dense/bias"] = (h,)
    return shapes


def _initial_value(name: str, shape: tuple[int, ...], config: BertConfig,
                   seed: tuple[int, int]) -> tf.Tensor:
    """BERT's initialisation for one weight, chosen from its name.

    LayerNorm gamma -> ones, LayerNorm beta and biases -> zeros, everything
    else (kernels and embedding tables) -> truncated normal with
    ``initializer_range`` stddev.  Stateless RNG keeps it reproducible.
    """
    if name.endswith("/gamma"):
        return tf.ones(shape, tf.float32)
    if name.endswith("/beta") or name.endswith("/bias"):
        return tf.zeros(shape, tf.float32)
    return tf.random.stateless_truncated_normal(
        shape, seed=seed, stddev=config.initializer_range, dtype=tf.float32)


def _layer_norm(x: tf.Tensor, gamma: tf.Variable, beta: tf.Variable,
                eps: float) -> tf.Tensor:
    """Layer normalisation over the last axis."""
    mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
    return (x - mean) * tf.math.rsqrt(variance + eps) * gamma + beta


def _gelu(x: tf.Tensor) -> tf.Tensor:
    """Exact (erf based) GELU, as used by the TF Hub BERT encoders."""
    return 0.5 * x * (1.0 + tf.math.erf(x * (1.0 / math.sqrt(2.0))))


class BertEncoder(tf.Module):
    """BERT transformer encoder returning ``(pooled, sequence)`` outputs.

    Variables live in ``self.weight_variables`` keyed by Google checkpoint
    names, which makes checkpoint import/export a plain dict operation.
    """

    def __init__(self, config: BertConfig, seed: int = 0,
                 name: str | None = None) -> None:
        """Create all variables with BERT's random initialisation.

        Args:
          config: architecture sizes.
          seed: seed for the (stateless, hence reproducible) initialiser.
          name: optional tf.Module name.
        """
        super().__init__(name=name)
        self.config = config
        variables: dict[str, tf.Variable] = {}
        for index, (key, shape) in enumerate(bert_weight_shapes(config).items()):
            value = _initial_value(key, shape, config, (seed, index))
            variables[key] = tf.Variable(value, name=key, trainable=True)
        self.weight_variables = variables

    def _w(self, key: str) -> tf.Variable:
        """Variable by its Google checkpoint name."""
        return self.weight_variables[key]

    def _matmul(self, a: tf.Tensor, b: tf.Tensor,
                transpose_b: bool = False) -> tf.Tensor:
        """Every matrix product of the encoder goes through here, so that a
        subclass can change how they are computed (``bench.precision``
        rounds their operands to bfloat16 to estimate its accuracy)."""
        return tf.matmul(a, b, transpose_b=transpose_b)

    def _dense(self, x: tf.Tensor, prefix: str) -> tf.Tensor:
        """``x @ kernel + bias`` for the dense layer stored under ``prefix``."""
        return self._matmul(x, self._w(f"{prefix}/kernel")) + self._w(f"{prefix}/bias")

    def _norm(self, x: tf.Tensor, prefix: str) -> tf.Tensor:
        """LayerNorm with the gamma/beta stored under ``prefix``."""
        return _layer_norm(x, self._w(f"{prefix}/gamma"), self._w(f"{prefix}/beta"),
                           self.config.layer_norm_eps)

    def _embed(self, word_ids: tf.Tensor, segment_ids: tf.Tensor) -> tf.Tensor:
        """Word + position + token-type embeddings, then LayerNorm: [B, S, H]."""
        seq_len = tf.shape(word_ids)[1]
        tf.debugging.assert_less_equal(
            seq_len, tf.constant(self.config.max_position_embeddings, tf.int32),
            message="sequence length exceeds max_position_embeddings")
        words = tf.gather(self._w("bert/embeddings/word_embeddings"), word_ids)
        types = tf.gather(self._w("bert/embeddings/token_type_embeddings"),
                          segment_ids)
        positions = self._w("bert/embeddings/position_embeddings")[:seq_len]
        return self._norm(words + types + positions[tf.newaxis],
                          "bert/embeddings/LayerNorm")

    def _split_heads(self, x: tf.Tensor, batch: tf.Tensor,
                     seq_len: tf.Tensor) -> tf.Tensor:
        """[B*S, H] -> [B, heads, S, head_size]."""
        cfg = self.config
        x = tf.reshape(x, [batch, seq_len, cfg.num_heads, cfg.head_size])
        return tf.transpose(x, [0, 2, 1, 3])

    def _attention(self, x: tf.Tensor, mask_bias: tf.Tensor, batch: tf.Tensor,
                   seq_len: tf.Tensor, prefix: str) -> tf.Tensor:
        """Multi-head self-attention on flat [B*S, H] input; returns [B*S, H].

        ``mask_bias`` is [B, 1, 1, S]: 0 for real keys, a large negative
        number for padding, so padded keys receive (numerically) zero weight.
        """
        cfg = self.config
        q = self._split_heads(self._dense(x, f"{prefix}/self/query"), batch, seq_len)
        k = self._split_heads(self._dense(x, f"{prefix}/self/key"), batch, seq_len)
        v = self._split_heads(self._dense(x, f"{prefix}/self/value"), batch, seq_len)
        scores = self._matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(cfg.head_size))
        probs = tf.nn.softmax(scores + mask_bias, axis=-1)
        context = tf.transpose(self._matmul(probs, v), [0, 2, 1, 3])
        context = tf.reshape(context, [-1, cfg.hidden_size])
        return self._dense(context, f"{prefix}/output/dense")

    def _layer(self, x: tf.Tensor, mask_bias: tf.Tensor, batch: tf.Tensor,
               seq_len: tf.Tensor, index: int) -> tf.Tensor:
        """One post-LayerNorm transformer block on flat [B*S, H] input."""
        p = _layer_prefix(index)
        attended = self._attention(x, mask_bias, batch, seq_len, f"{p}/attention")
        x = self._norm(attended + x, f"{p}/attention/output/LayerNorm")
        hidden = _gelu(self._dense(x, f"{p}/intermediate/dense"))
        return self._norm(self._dense(hidden, f"{p}/output/dense") + x,
                          f"{p}/output/LayerNorm")

    def __call__(self, input_word_ids: tf.Tensor, input_mask: tf.Tensor,
                 segment_ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Encode a batch.

        Args:
          input_word_ids: int32 [B, S] token ids.
          input_mask: int32 [B, S], 1 for real tokens and 0 for padding.
          segment_ids: int32 [B, S] token type ids.

        Returns:
          ``(pooled_output [B, H], sequence_output [B, S, H])`` float32.
        """
        pooled, sequence, _ = self.encode(input_word_ids, input_mask,
                                          segment_ids)
        return pooled, sequence

    def encode(self, input_word_ids: tf.Tensor, input_mask: tf.Tensor,
               segment_ids: tf.Tensor
               ) -> tuple[tf.Tensor, tf.Tensor, list[tf.Tensor]]:
        """``__call__``'s outputs plus ``encoder_outputs``: every
        transformer layer's ``[B, S, H]`` token outputs, first layer first
        (the last one is ``sequence_output``; the embedding layer is not
        included), as TF Hub's BERT encoders return them."""
        word_ids = tf.cast(input_word_ids, tf.int32)
        segment_ids = tf.cast(segment_ids, tf.int32)
        mask = tf.cast(input_mask, tf.float32)
        shape = tf.shape(word_ids)
        batch, seq_len = shape[0], shape[1]
        hidden = self.config.hidden_size
        mask_bias = ((1.0 - mask) * _MASK_NEGATIVE)[:, tf.newaxis, tf.newaxis, :]
        x = tf.reshape(self._embed(word_ids, segment_ids), [-1, hidden])
        layers = []
        for index in range(self.config.num_layers):
            x = self._layer(x, mask_bias, batch, seq_len, index)
            layers.append(tf.reshape(x, [batch, seq_len, hidden]))
        sequence = layers[-1]
        pooled = tf.tanh(self._dense(sequence[:, 0], "bert/pooler/dense"))
        return pooled, sequence, layers

    def get_weights(self) -> dict[str, np.ndarray]:
        """Copy all weights out as NumPy arrays keyed by Google names."""
        return {key: var.numpy() for key, var in self.weight_variables.items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Assign every weight from ``weights`` (keys = Google names).

        The key set and every shape must match exactly; otherwise a
        ``ValueError`` lists all missing, unexpected and mismatched keys and
        no variable is modified.
        """
        expected = {k: tuple(v.shape) for k, v in self.weight_variables.items()}
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        mismatched = [
            f"{key}: expected {expected[key]}, got {tuple(np.shape(weights[key]))}"
            for key in sorted(set(expected) & set(weights))
            if tuple(np.shape(weights[key])) != expected[key]
        ]
        problems = []
        if missing:
            problems.append(f"missing keys: {missing}")
        if unexpected:
            problems.append(f"unexpected keys: {unexpected}")
        if mismatched:
            problems.append(f"shape mismatches: {mismatched}")
        if problems:
            raise ValueError("Cannot set BERT weights; " + "; ".join(problems))
        for key, var in self.weight_variables.items():
            var.assign(np.asarray(weights[key], dtype=np.float32))
