"""Pooling: the model's outputs for a padded batch in, one vector per row out.

``--pooling`` picks how a document's sentence vector (the ``pooled_output``
column) is made from what BERT returns:

``cls``
    The model's own ``pooled_output`` (tanh of a dense layer on ``[CLS]``),
    as before this option existed: the default.
``mean``
    The mean of ``sequence_output`` over the document's real tokens, the
    ``[CLS]`` and ``[SEP]`` rows included and padding excluded (what
    bert-as-service's ``REDUCE_MEAN`` and sentence-transformers' mean
    pooling compute).
``first_last_avg``
    The mean over real tokens of the average of the first and the last
    transformer layers' token outputs (``encoder_outputs[0]`` and
    ``encoder_outputs[-1]`` of TF Hub's BERT encoders; the embedding layer
    is not used).  Only models that return ``encoder_outputs`` offer it.

``--normalize`` then scales each vector to unit L2 length (an all-zero
vector stays zero), so that a dot product is the cosine.  Everything here
is pure NumPy on arrays, apart from Beam and TensorFlow.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

POOLINGS = ("cls", "mean", "first_last_avg")
DEFAULT_POOLING = "cls"


def needs_layers(pooling: str) -> bool:
    """Whether ``pooling`` needs the model's per-layer ``encoder_outputs``
    (not just ``pooled_output`` and ``sequence_output``)."""
    return pooling == "first_last_avg"


def check_pooling(pooling: str) -> str:
    """``pooling`` once it is one of ``POOLINGS``; else ``ValueError``."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, "
                         f"got {pooling!r}")
    return pooling


def masked_mean(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[B, S, H]`` token vectors, ``[B, S]`` mask (1 real, 0 padding) ->
    ``[B, H]`` float32 mean over each row's real tokens.

    Sums in float64 so the result does not depend on how much padding a
    batch carries; a row without real tokens (never produced by the
    tokenizer) gives zeros rather than NaN.
    """
    weights = np.asarray(mask, dtype=np.float64)[:, :, None]
    total = (np.asarray(tokens, dtype=np.float64) * weights).sum(axis=1)
    count = np.maximum(weights.sum(axis=1), 1.0)
    return (total / count).astype(np.float32)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows of ``vectors`` (``[..., H]``) scaled to unit L2 length, float32;
    all-zero rows stay zero."""
    values = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(values, axis=-1, keepdims=True)
    return (values / np.where(norms > 0.0, norms, 1.0)).astype(np.float32)


def pool(pooling: str, pooled: np.ndarray, sequence: np.ndarray,
         mask: np.ndarray, layers: Optional[Sequence[np.ndarray]] = None,
         normalize: bool = False) -> np.ndarray:
    """The ``[B, H]`` float32 sentence vectors of a padded batch.

    ``pooled`` is the model's ``pooled_output`` ``[B, H]``, ``sequence``
    its ``sequence_output`` ``[B, S, H]``, ``mask`` the ``input_mask``
    ``[B, S]`` and ``layers`` its ``encoder_outputs`` (each ``[B, S, H]``,
    first layer first; needed by ``first_last_avg`` only).
    """
    check_pooling(pooling)
    if pooling == "cls":
        vectors = np.asarray(pooled, dtype=np.float32)
    elif pooling == "mean":
        vectors = masked_mean(sequence, mask)
    else:
        if not layers:
            raise ValueError("first_last_avg pooling needs the model's "
                             "encoder_outputs, and it returned none")
        first = np.asarray(layers[0], dtype=np.float64)
        last = np.asarray(layers[-1], dtype=np.float64)
        vectors = masked_mean((first + last) / 2.0, mask)
    return l2_normalize(vectors) if normalize else vectors


def mean_of_vectors(vectors: np.ndarray, normalize: bool = False
                    ) -> np.ndarray:
    """One ``[H]`` float32 vector for ``[N, H]`` rows (a document's chunk
    vectors): their mean, scaled to unit length when ``normalize``."""
    mean = np.asarray(vectors, dtype=np.float64).mean(axis=0)
    return l2_normalize(mean) if normalize else mean.astype(np.float32)
