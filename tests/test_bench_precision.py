"""The pieces of ``bench.precision`` that its accuracy figure rests on.

The benchmark's bfloat16 estimate is only as good as two facts checked
here: every matrix product of the encoder goes through the one hook that
the emulation overrides, and the emulated encoder carries the SavedModel's
own weights (so that it differs from float32 by rounding alone).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from bench.precision import _emulated_encoder, centred_cosines, cosines
from model.bert import BertConfig, BertEncoder
from model.load import load_bert_saved_model
from model.export import export_bert_saved_model
from tests.conftest import random_padded_batch

TINY = BertConfig(vocab_size=120, hidden_size=32, num_layers=2, num_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
VOCAB = ["[PAD]"] + [f"tok{i}" for i in range(1, TINY.vocab_size)]


def _batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return random_padded_batch(TINY.vocab_size, [5, 17, 30], seed)


def test_every_matmul_goes_through_the_hook():
    calls = []

    class Counting(BertEncoder):
        def _matmul(self, a, b, transpose_b=False):
            calls.append(transpose_b)
            return super()._matmul(a, b, transpose_b=transpose_b)

    Counting(TINY)(*_batch())
    # Per layer: query, key, value, attention output, two feed-forward
    # dense layers and the two attention products; plus the pooler.
    assert len(calls) == TINY.num_layers * 8 + 1
    assert sum(calls) == TINY.num_layers  # q @ k^T, once per layer


def test_emulated_bfloat16_rounds_the_same_weights(tmp_path):
    path = str(tmp_path / "tiny")
    export_bert_saved_model(path, TINY, VOCAB, seed=3)
    reference = load_bert_saved_model(path)
    emulated = _emulated_encoder(path)
    batch = _batch()
    pooled, sequence = reference(*batch)
    pooled_bf16, sequence_bf16 = (t.numpy() for t in emulated(*batch))
    assert not np.array_equal(pooled, pooled_bf16)  # rounding happened
    # Same weights: only bfloat16 rounding (8 bits of mantissa) apart.
    assert cosines(pooled, pooled_bf16).min() > 0.999
    real = batch[1].astype(bool)
    assert cosines(sequence[real], sequence_bf16[real]).min() > 0.999
    # A model with other weights is far off, so the check above can fail.
    other = str(tmp_path / "other")
    export_bert_saved_model(other, TINY, VOCAB, seed=4)
    pooled_other, _ = load_bert_saved_model(other)(*batch)
    assert cosines(pooled_other, pooled_bf16).min() < 0.99


def test_emulation_needs_a_model_of_ours(tmp_path):
    class Foreign(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def __call__(self, x):
            return x

    path = str(tmp_path / "foreign")
    tf.saved_model.save(Foreign(), path)
    assert _emulated_encoder(path) is None


def test_centring_exposes_what_a_shared_component_hides():
    rng = np.random.default_rng(0)
    shared = np.full(64, 10.0)
    reference = shared + rng.normal(size=(50, 64))
    noisy = reference + 0.3 * rng.normal(size=(50, 64))
    assert cosines(reference, noisy).min() > 0.999
    assert centred_cosines(reference, noisy).mean() < 0.98
    assert centred_cosines(reference, reference) == pytest.approx(
        np.ones(50))
