"""The GPU bfloat16 path (``model.bf16_graph``), checked for graph
correctness on the CPU: its matrix products are bfloat16 in the graph,
its outputs float32 and close to float32's.  Its speed needs a GPU and is
not measured here."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import tensorflow as tf

from model import engines
from model.self_check import ACCURACY_TARGETS, compare_engines, probe_batches
from model.bf16_graph import Bfloat16BertModel, load_bfloat16_model
from model.engines import AUTO, EngineSpec, Hardware, load_engine
from model.errors import ModelFormatError
from model.load import BertSavedModel, load_bert_saved_model

GPU_BF16 = Hardware(frozenset({"avx2"}), ("NVIDIA A100",), True, True)
_MATMULS = {"MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"}


@pytest.fixture(scope="module")
def bert_like(tmp_path_factory, small_vocab):
    """A small model with BERT's initialisation (std 0.02)."""
    from model.bert import BertConfig
    from model.export import export_bert_saved_model
    config = BertConfig(vocab_size=len(small_vocab), hidden_size=256,
                        num_layers=2, num_heads=4, intermediate_size=1024,
                        max_position_embeddings=128)
    return export_bert_saved_model(
        str(tmp_path_factory.mktemp("bf16") / "model"), config, small_vocab,
        seed=5)


def test_every_matrix_product_is_bfloat16(bert_like):
    graph = load_bfloat16_model(bert_like).concrete_function().graph
    matmuls = [op for op in graph.get_operations() if op.type in _MATMULS]
    # 6 dense layers and 2 attention products per layer, and the pooler.
    assert len(matmuls) == 2 * 8 + 1
    assert {op.inputs[0].dtype for op in matmuls} == {tf.bfloat16}
    assert {op.inputs[1].dtype for op in matmuls} == {tf.bfloat16}
    # Softmax and LayerNorm stay float32.
    assert {op.outputs[0].dtype for op in graph.get_operations()
            if op.type in ("Softmax", "Rsqrt", "Erf")} == {tf.float32}


def test_outputs_are_float32_and_close_to_float32(bert_like):
    model = load_bfloat16_model(bert_like)
    reference = load_bert_saved_model(bert_like)
    batches = probe_batches(bert_like)
    pooled, sequence = model(*batches[0])
    assert pooled.dtype == sequence.dtype == np.float32
    stats = compare_engines(reference, model, batches)
    assert stats.meets(ACCURACY_TARGETS["bfloat16"]), stats.summary()
    assert stats.max_abs_pooled > 0  # not float32 in disguise


def test_xla_compiles_the_retrace_in_bfloat16(bert_like):
    """``--xla on`` on a GPU worker: the re-trace compiled by XLA keeps its
    bfloat16 products (in the HLO XLA is given) and gives the outputs of
    the graph it compiles."""
    compiled = load_bfloat16_model(bert_like, jit_compile=True)
    plain = load_bfloat16_model(bert_like)
    assert compiled.jit_compile and not plain.jit_compile
    ids, mask, segments = probe_batches(bert_like)[0]
    hlo = compiled._call.experimental_get_compiler_ir(
        *(tf.constant(a) for a in (ids, mask, segments)))(stage="hlo")
    assert re.search(r"bf16\[[0-9,]+\]\{[0-9,]+\} dot\(", hlo)
    for got, want in zip(compiled(ids, mask, segments),
                         plain(ids, mask, segments)):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=2e-2)
    _, _, layers = compiled.call_with_layers(ids, mask, segments)
    assert len(layers) == 2


def test_layers_for_first_last_avg(bert_like):
    """``--pooling first_last_avg`` on a GPU worker: the re-trace returns
    every layer too, close to the float32 model's encoder_outputs, its
    last layer its sequence output."""
    model = load_bfloat16_model(bert_like)
    reference = load_bert_saved_model(bert_like)
    ids, mask, segments = probe_batches(bert_like)[0]
    pooled, sequence, layers = model.call_with_layers(ids, mask, segments)
    want_pooled, _, want_layers = reference.call_with_layers(ids, mask,
                                                             segments)
    assert len(layers) == len(want_layers) == 2
    assert all(layer.dtype == np.float32 for layer in layers)
    np.testing.assert_array_equal(layers[-1], sequence)
    np.testing.assert_array_equal(pooled, model(ids, mask, segments)[0])
    real = mask.astype(bool)
    for got, want in zip(layers, want_layers):
        cosine = np.sum(got[real] * want[real], -1) / (
            np.linalg.norm(got[real], axis=-1)
            * np.linalg.norm(want[real], axis=-1))
        assert cosine.min() > 0.99


def test_other_layouts_are_refused(tmp_path):
    module = tf.Module()
    module.v = tf.Variable(1.0)
    tf.saved_model.save(module, str(tmp_path / "plain"))
    with pytest.raises(ModelFormatError, match="bert_config.json"):
        load_bfloat16_model(str(tmp_path / "plain"))


def test_gpu_worker_runs_the_bfloat16_retrace(bert_like, monkeypatch,
                                              caplog):
    """The engine's GPU branch (a GPU is faked; the graph runs on the
    CPU): bfloat16 by name loads the re-trace; auto keeps it after the
    self-check, or runs float32 when the target is missed."""
    from model import self_check
    caplog.set_level(logging.INFO, logger="model.engines")
    named = load_engine(EngineSpec(bert_like, engines.TENSORFLOW,
                                   "bfloat16"), GPU_BF16)
    assert isinstance(named, Bfloat16BertModel)
    assert named.engine_choice.device == "gpu"
    assert not named.jit_compile
    compiled = load_engine(EngineSpec(bert_like, engines.TENSORFLOW,
                                      "bfloat16", jit_compile=True), GPU_BF16)
    assert isinstance(compiled, Bfloat16BertModel) and compiled.jit_compile
    monkeypatch.setattr(engines, "gpus_compute_bfloat16", lambda: True)
    kept = load_engine(EngineSpec(bert_like, AUTO, AUTO), GPU_BF16)
    assert isinstance(kept, Bfloat16BertModel)
    assert "self-check" in kept.engine_choice.precision_reason
    monkeypatch.setitem(self_check.ACCURACY_TARGETS, "bfloat16", 1.5)
    refused = load_engine(EngineSpec(bert_like, AUTO, AUTO), GPU_BF16)
    assert isinstance(refused, BertSavedModel)
    assert refused.engine_choice.precision == "float32"
    assert "misses its accuracy target" in caplog.text
    monkeypatch.setattr(engines, "gpus_compute_bfloat16", lambda: False)
    older = load_engine(EngineSpec(bert_like, AUTO, AUTO), GPU_BF16)
    assert older.engine_choice.precision == "float32"
    assert "no native bfloat16" in older.engine_choice.precision_reason
