"""Matmul rates of this machine per engine and precision: the roofline.

    python -m bench.roofline --engine tensorflow|torch|openvino

Prints one JSON object ``{precision: GFLOP/s}`` for the engine: the best of
several short timing windows of a BERT-shaped product ``[2048, 768] x
[768, 3072]`` (the feed-forward layer's), with as many threads as the
process may use.  Precisions the CPU has no fast instructions for are left
out (``bench.throughput`` reports them as not measurable), and so is a
precision an engine did not really apply (OpenVINO says which precision
its compiled matmul runs at; one that fell back to float32 is not an int8
rate).

Each engine runs in its own process (``bench.throughput`` spawns them), so
that TensorFlow's, PyTorch's and OpenVINO's thread pools never share one.
``bench.throughput`` takes, per precision, the best rate over the engines
as the limit a model's matmuls can reach at that precision.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable, Sequence

import numpy as np

ENGINES = ("tensorflow", "torch", "openvino")
PRECISIONS = ("float32", "bfloat16", "int8")

# The product timed: BERT-Base's feed-forward input layer at 2,048 tokens.
M, K, N = 2048, 768, 3072
FLOPS = 2 * M * K * N

# CPU flags (any one) that make a precision fast; float32 needs none.
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
INT8_FLAGS = frozenset({"amx_int8", "avx512_vnni", "avx_vnni"})
PRECISION_CPU_FLAGS = {"bfloat16": BF16_FLAGS, "int8": INT8_FLAGS}


def precision_measurable(precision: str, flags: frozenset[str]) -> bool:
    """Whether a CPU with ``flags`` runs ``precision`` natively."""
    needed = PRECISION_CPU_FLAGS.get(precision)
    return needed is None or not needed.isdisjoint(flags)


def best_rate(step: Callable[[], object], windows: int,
              seconds: float) -> float:
    """GFLOP/s of ``step`` (one product) over the best of ``windows``
    windows of ``seconds`` each, after one untimed call.  The best window
    counts: other work on the machine only ever slows a window down."""
    step()
    best = 0.0
    for _ in range(windows):
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            step()
            count += 1
        best = max(best, count * FLOPS / (time.perf_counter() - started)
                   / 1e9)
    return best


def _tensorflow(precisions: Sequence[str], windows: int,
                seconds: float) -> dict[str, float]:
    """TensorFlow's own (oneDNN) kernel, and XLA's for float32 (a few per
    cent faster on some CPUs; the pipeline runs float32 under XLA)."""
    import tensorflow as tf
    from model.runtime import configure_tensorflow
    configure_tensorflow()
    rates: dict[str, float] = {}
    a, b = tf.random.normal([M, K]), tf.random.normal([K, N])
    if "float32" in precisions:
        rates["float32"] = max(
            best_rate(lambda f=f: f(a, b).numpy(), windows, seconds)
            for f in (tf.matmul, tf.function(tf.matmul, jit_compile=True)))
    if "bfloat16" in precisions:
        a16, b16 = tf.cast(a, tf.bfloat16), tf.cast(b, tf.bfloat16)
        rates["bfloat16"] = best_rate(lambda: tf.matmul(a16, b16).numpy(),
                                      windows, seconds)
    return rates


def _torch(precisions: Sequence[str], windows: int,
           seconds: float) -> dict[str, float]:
    import torch
    from model.runtime import usable_cores
    torch.set_num_threads(usable_cores())
    rates: dict[str, float] = {}
    a, b = torch.randn(M, K), torch.randn(K, N)
    with torch.inference_mode():
        for precision, dtype in (("float32", torch.float32),
                                 ("bfloat16", torch.bfloat16)):
            if precision in precisions:
                x, y = a.to(dtype), b.to(dtype)
                rates[precision] = best_rate(lambda x=x, y=y: x @ y,
                                             windows, seconds)
    return rates


def openvino_matmul(precision: str):
    """A one-matmul OpenVINO model ``a @ W`` (``W`` a constant, as a
    model's weights are) and the compile settings for ``precision``.

    int8 is expressed the way quantized models express it: FakeQuantize on
    the activations (256 levels) and on the weights (255 levels,
    symmetric), which OpenVINO's CPU plugin turns into an int8 matmul.
    """
    import openvino as ov
    import openvino.opset13 as ops
    a = ops.parameter([M, K], np.float32, name="a")
    weights = ops.constant((np.random.default_rng(0).standard_normal((K, N))
                            * 0.02).astype(np.float32))
    left, right = a, weights
    if precision == "int8":
        def fake_quantize(node, low: float, high: float, levels: int):
            low, high = np.float32(low), np.float32(high)
            return ops.fake_quantize(node, low, high, low, high, levels)
        left = fake_quantize(a, -4.0, 4.0 * 127 / 128, 256)
        right = fake_quantize(weights, -0.1, 0.1, 255)
    model = ov.Model([ops.matmul(left, right, False, False)], [a], "matmul")
    hint = "bf16" if precision == "bfloat16" else "f32"
    return model, {"INFERENCE_PRECISION_HINT": hint}


def _openvino_runtime_precisions(compiled) -> set[str]:
    """The precisions OpenVINO's compiled matmul layers run at."""
    found = set()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = str(info["layerType"].astype(str))
        if layer in ("FullyConnected", "MatMul"):
            found.add(str(info["runtimePrecision"].astype(str)))
    return found


_OV_RUNTIME_NAMES = {"float32": {"f32"}, "bfloat16": {"bf16"},
                     "int8": {"i8", "u8"}}


def _openvino(precisions: Sequence[str], windows: int,
              seconds: float) -> dict[str, float]:
    import openvino as ov
    from model.runtime import usable_cores
    core = ov.Core()
    rates: dict[str, float] = {}
    x = np.random.default_rng(1).standard_normal((M, K)).astype(np.float32)
    for precision in precisions:
        model, config = openvino_matmul(precision)
        config.update({"INFERENCE_NUM_THREADS": usable_cores(),
                       "PERFORMANCE_HINT": "LATENCY"})
        compiled = core.compile_model(model, "CPU", config)
        if not _openvino_runtime_precisions(compiled) & \
                _OV_RUNTIME_NAMES[precision]:
            continue  # the plugin did not apply this precision
        request = compiled.create_infer_request()
        rates[precision] = best_rate(lambda r=request: r.infer({0: x}),
                                     windows, seconds)
    return rates


_MEASURE = {"tensorflow": _tensorflow, "torch": _torch,
            "openvino": _openvino}


def measure(engine: str, flags: frozenset[str], windows: int = 5,
            seconds: float = 0.4) -> dict[str, float]:
    """``{precision: GFLOP/s}`` of ``engine`` for the precisions this CPU
    runs natively (int8 with OpenVINO only)."""
    wanted = [p for p in PRECISIONS if precision_measurable(p, flags)
              and (p != "int8" or engine == "openvino")]
    return _MEASURE[engine](wanted, windows, seconds)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.4)
    parser.add_argument("--cpu_flags", default=None,
                        help="comma list standing in for this CPU's flags")
    args = parser.parse_args(argv)
    from model.runtime import cpu_flags
    flags = cpu_flags() if args.cpu_flags is None else frozenset(
        args.cpu_flags.split(","))
    print(json.dumps(measure(args.engine, flags, args.windows,
                             args.seconds)))


if __name__ == "__main__":
    main()
