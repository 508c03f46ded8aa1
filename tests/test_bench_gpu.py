"""``bench.gpu``: our graphs lowered here, compiled where the GPU is.

Its figures are only ours if the programs it carries are our encoder with
our weights: every program's parameters must match, in order, the
arguments XLA is given; both sides must make the same weights; the real
batches must be our tokenizer's.  Where JAX is installed the programs are
also compiled and run on the CPU against TensorFlow's own outputs.
"""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest

from bench import gpu

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
_ARG = re.compile(r"%arg\d+: tensor<([0-9x]+)x(i32|f32|bf16)>")
_DTYPES = {"i32": "int32", "f32": "float32", "bf16": "bfloat16"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gpu") / "bundle")
    gpu.export(path, docs=40, batch_docs=16, reference_docs=20, seed=3,
               fixed_shapes=((4, 32),), **TINY)
    return gpu.Bundle(path)


def test_weights_are_made_alike_by_name_in_any_order():
    shapes = {"a/kernel": [3, 4], "a/bias": [4], "n/gamma": [4],
              "n/beta": [4], "emb/word_embeddings": [5, 4]}
    one = gpu.bert_like(shapes, seed=7)
    other = gpu.bert_like(dict(reversed(list(shapes.items()))), seed=7)
    for name in shapes:
        np.testing.assert_array_equal(one[name], other[name])
    assert (one["n/gamma"] == 1).all() and not one["a/bias"].any()
    assert 0.01 < one["emb/word_embeddings"].std() < 0.04
    assert not np.array_equal(one["a/kernel"],
                              gpu.bert_like(shapes, seed=8)["a/kernel"])


def test_every_program_takes_the_inputs_then_its_weights(bundle):
    shapes = bundle.meta["shapes"]
    assert {"float32/4x32", "bfloat16/4x32"} <= set(bundle.meta["programs"])
    for key in bundle.meta["programs"]:
        precision, shape = key.split("/")
        batch, width = map(int, shape.split("x"))
        text, params = bundle.program(precision, batch, width)
        main = text[text.index("func.func @main"):]
        args = _ARG.findall(main[:main.index("{")])
        want = [(f"{batch}x{width}", "int32")] * 3 + [
            ("x".join(map(str, shapes[name])), dtype)
            for name, dtype in params]
        assert [(dims, _DTYPES[t]) for dims, t in args] == want
        kernels = {dtype for name, dtype in params
                   if name.endswith("/kernel")}
        assert kernels == {precision}  # bf16 copies only in the bf16 graph


def test_real_batches_are_our_tokenizer_sorted_and_padded(bundle):
    lengths = []
    for batch in bundle.batches:
        ids, mask = batch["ids"], batch["mask"]
        assert ids.shape[1] % gpu.WIDTH_STEP == 0
        real = mask.sum(1)
        assert (ids[mask == 0] == 0).all() and (ids[:, 0] == ids[0, 0]).all()
        lengths.extend(real.tolist())
    assert lengths == sorted(lengths) and len(lengths) >= 30
    assert bundle.reference["pooled"].shape == (20, TINY["hidden_size"])


def test_report_names_the_ratios():
    result = {"machine": {"device": "gpu: X", "cuda": "13.0",
                          **{k: "1" for k in ("python", "jax", "jaxlib",
                                              "torch", "transformers",
                                              "tensorflow")}},
              "matmul_gflops": {"torch 2048x768x3072": 1000.0},
              "fixed": {"ours bfloat16": {"4x32": 10.0},
                        "torch bfloat16": {"4x32": 5.0}},
              "real": {"ours bfloat16": 300.0, "torch bfloat16": 200.0},
              "accuracy": {}}
    meta = {"tensorflow": "2", "corpus": "c", "max_seq_length": 128,
            "batch_docs": 8,
            "flops_per_token": {"real": 1e9}}
    text = "\n".join(gpu.report(result, meta))
    assert "ours bfloat16 / torch bfloat16: 1.50x" in text
    assert "30.0%" in text  # 300 tokens/s x 1 GFLOP / 1,000 GFLOP/s


@pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                    reason="JAX is not installed (bench-only)")
def test_programs_compiled_by_xla_give_tensorflows_outputs(bundle, tmp_path):
    result = gpu.run(bundle, seconds=0.01, rounds=1, engines=("ours",))
    check = result["accuracy"]["ours float32 vs TensorFlow float32 (CPU)"]
    assert check["pooled_cos_min"] > 0.99999, json.dumps(check)
    bf16 = result["accuracy"]["ours bfloat16 vs ours float32"]
    assert 0.999 < bf16["pooled_cos_min"] and bf16["max_abs_pooled"] > 0
