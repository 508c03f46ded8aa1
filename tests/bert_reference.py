"""Independent NumPy (float64) reference forward pass of BERT.

Deliberately shares no code with ``model/bert.py``: it is a second,
straightforward implementation used to check the TensorFlow encoder and the
exported SavedModel.  It reads weights keyed by Google's original BERT
checkpoint names and computes per-example, loop-based attention so that it
differs structurally from the batched TensorFlow version.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU: x * Phi(x), with Phi from math.erf."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
               eps: float) -> np.ndarray:
    """LayerNorm over the last axis (biased variance, like BERT)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _softmax(x: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class ReferenceBert:
    """float64 BERT forward pass from a Google-named weight dict."""

    def __init__(self, weights: Mapping[str, np.ndarray], num_layers: int,
                 num_heads: int, layer_norm_eps: float = 1e-12) -> None:
        """Keep float64 copies of the weights and the architecture sizes."""
        self.w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.eps = layer_norm_eps

    def _linear(self, x: np.ndarray, prefix: str) -> np.ndarray:
        """Dense layer with kernel [in, out]."""
        return x @ self.w[prefix + "/kernel"] + self.w[prefix + "/bias"]

    def _ln(self, x: np.ndarray, prefix: str) -> np.ndarray:
        """LayerNorm with gamma/beta stored under prefix."""
        return layer_norm(x, self.w[prefix + "/gamma"], self.w[prefix + "/beta"],
                          self.eps)

    def _embeddings(self, ids: np.ndarray, segments: np.ndarray) -> np.ndarray:
        """One example's [S, H] embeddings after LayerNorm."""
        e = "bert/embeddings/"
        x = (self.w[e + "word_embeddings"][ids]
             + self.w[e + "token_type_embeddings"][segments]
             + self.w[e + "position_embeddings"][: len(ids)])
        return self._ln(x, e + "LayerNorm")

    def _self_attention(self, x: np.ndarray, mask: np.ndarray,
                        prefix: str) -> np.ndarray:
        """Multi-head attention for one example; padded keys are excluded."""
        q = self._linear(x, prefix + "/self/query")
        k = self._linear(x, prefix + "/self/key")
        v = self._linear(x, prefix + "/self/value")
        size = x.shape[-1] // self.num_heads
        keep = mask.astype(bool)
        heads = []
        for h in range(self.num_heads):
            cols = slice(h * size, (h + 1) * size)
            scores = q[:, cols] @ k[:, cols].T / math.sqrt(size)
            scores = np.where(keep[None, :], scores, -np.inf)
            if not keep.any():  # no real key: attend uniformly (no NaNs)
                scores = np.zeros_like(scores)
            heads.append(_softmax(scores) @ v[:, cols])
        return self._linear(np.concatenate(heads, axis=-1),
                            prefix + "/output/dense")

    def _layer(self, x: np.ndarray, mask: np.ndarray, index: int) -> np.ndarray:
        """One transformer block (post-LayerNorm)."""
        p = f"bert/encoder/layer_{index}"
        x = self._ln(x + self._self_attention(x, mask, p + "/attention"),
                     p + "/attention/output/LayerNorm")
        inner = gelu(self._linear(x, p + "/intermediate/dense"))
        return self._ln(x + self._linear(inner, p + "/output/dense"),
                        p + "/output/LayerNorm")

    def encode_one(self, ids: np.ndarray, mask: np.ndarray,
                   segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Encode one example: returns (pooled [H], sequence [S, H])."""
        x = self._embeddings(np.asarray(ids), np.asarray(segments))
        for index in range(self.num_layers):
            x = self._layer(x, np.asarray(mask), index)
        pooled = np.tanh(self._linear(x[0], "bert/pooler/dense"))
        return pooled, x

    def layers_one(self, ids: np.ndarray, mask: np.ndarray,
                   segments: np.ndarray) -> list[np.ndarray]:
        """Each transformer layer's [S, H] output for one example, first
        layer first (what TF Hub calls ``encoder_outputs``)."""
        x = self._embeddings(np.asarray(ids), np.asarray(segments))
        layers = []
        for index in range(self.num_layers):
            x = self._layer(x, np.asarray(mask), index)
            layers.append(x)
        return layers

    def __call__(self, ids: np.ndarray, mask: np.ndarray,
                 segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Encode a [B, S] batch: returns (pooled [B, H], sequence [B, S, H])."""
        outs = [self.encode_one(i, m, s) for i, m, s in zip(ids, mask, segments)]
        return (np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs]))
