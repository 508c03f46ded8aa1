"""Our TensorFlow GPU graphs, measured on a GPU machine without TensorFlow.

    python -m bench.gpu export --output DIR [--docs 1024]      # here (TF)
    python3 -m bench.gpu run --bundle DIR [--json FILE]        # GPU machine

The GPU machines lent to this project carry CUDA 13, PyTorch and JAX, no
TensorFlow, and reach no package registry; TensorFlow 2.21 is built for
CUDA 12 and its wheel alone is 546 MiB, more than a call may carry.  So the
graphs are lowered where TensorFlow is and compiled where the GPU is:

* ``export`` traces, with ``jit_compile=True``, the float32 encoder
  (``model.bert.BertEncoder``, what a SavedModel of ``model.export``
  runs) and the GPU path's bfloat16 re-trace
  (``model.bf16_graph.Bfloat16Encoder``) at each batch shape, and writes
  the StableHLO TensorFlow's XLA bridge makes of them
  (``experimental_get_compiler_ir(stage="stablehlo")``): the programs
  TensorFlow hands XLA on a GPU with ``--xla on``.  It also writes real
  documents tokenized by our tokenizer and cut into length-sorted batches,
  the parameter order of each program, the Hugging Face parameter names,
  and float32 outputs computed here by TensorFlow without XLA on the
  first documents, as the reference.  Weights are not carried: both sides
  make the same BERT-like random weights from a seed (``bert_like``).
* ``run`` compiles each program with XLA through JAX's runtime on the
  GPU and times it beside the peer a user picks instead (``transformers``'
  ``BertModel`` on PyTorch, float32 and cast to bfloat16, same weights and
  batches), reports the GPU's bfloat16 matmul rate, and the accuracy of
  each against our float32 (and of our float32 against TensorFlow's).
  Model calls are timed from the host arrays to the host arrays (inputs
  copied in, pooled and sequence outputs copied out), as a worker runs
  them.

``run`` imports neither TensorFlow nor any of this project's runtime
modules; on a machine without a GPU it runs on the CPU (the tests do).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import types
import zlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bench.precision import cosines

PRECISIONS = ("float32", "bfloat16")
FIXED_SHAPES = ((32, 48), (16, 128), (4, 512), (64, 128), (256, 128),
                (64, 512))
WIDTH_STEP = 32  # real batches are padded to a multiple (XLA: static shapes)
BUNDLE_FILE = "bundle.json"
# --copy: which outputs timed model calls bring back to the host.
COPIES = {"all": "host arrays in, pooled and sequence outputs out",
          "pooled": "host arrays in, pooled outputs out (--outputs pooled)",
          "none": "inputs copied in, outputs left on the device"}
BATCHES_FILE = "batches.npz"
REFERENCE_FILE = "reference.npz"


def bert_like(shapes: Mapping[str, Sequence[int]], seed: int,
              std: float = 0.02) -> dict[str, np.ndarray]:
    """BERT-like random weights by name: LayerNorm gamma 1, beta and biases
    0, the rest normal(0, ``std``); each drawn from ``(seed, crc32(name))``
    so that both sides make the same values whatever their order."""
    weights = {}
    for name, shape in shapes.items():
        if name.endswith("/gamma"):
            weights[name] = np.ones(shape, np.float32)
        elif name.endswith(("/beta", "/bias")):
            weights[name] = np.zeros(shape, np.float32)
        else:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            weights[name] = rng.normal(0.0, std, shape).astype(np.float32)
    return weights


def shape_name(batch: int, width: int) -> str:
    return f"{batch}x{width}"


def mean_over_real(sequence: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[B, S, H]`` -> ``[B, H]``: each row's mean over its real tokens."""
    weights = mask.astype(np.float64)[:, :, None]
    return (sequence.astype(np.float64) * weights).sum(1) / weights.sum(1)


# --- export (here, with TensorFlow) -------------------------------------------


def _variable_key(variable_name: str) -> tuple[str, str]:
    """``(weight name, dtype)`` of a traced variable: the re-trace's
    ``.../kernel_bf16:0`` copies are the bfloat16 cast of ``.../kernel``."""
    name = variable_name.split(":")[0]
    if name.endswith("_bf16"):
        return name[:-len("_bf16")], "bfloat16"
    return name, "float32"


def lower(encoder: Any, batch: int, width: int) -> tuple[str, list[list[str]]]:
    """The StableHLO of ``encoder(ids, mask, segments)`` at one shape, and
    its weight parameters in order (after the three inputs)."""
    import tensorflow as tf
    spec = [tf.TensorSpec([batch, width], tf.int32)] * 3
    function = tf.function(lambda a, b, c: encoder(a, b, c),
                           jit_compile=True)
    concrete = function.get_concrete_function(*spec)
    names = {id(v.handle): v.name for v in encoder.variables}
    order = [list(_variable_key(names[id(t)]))
             for t in concrete.captured_inputs]
    zeros = [tf.zeros([batch, width], tf.int32)] * 3
    text = function.experimental_get_compiler_ir(*zeros)(stage="stablehlo")
    return text, order


def real_batches(texts: Sequence[str], vocab: Sequence[str],
                 max_seq_length: int, batch_docs: int
                 ) -> list[dict[str, np.ndarray]]:
    """``texts`` tokenized by our tokenizer, sorted by length and cut into
    batches of ``batch_docs``, each padded to a multiple of WIDTH_STEP."""
    from transforms.tokenization import BertWordPieceTokenizer
    tokenizer = BertWordPieceTokenizer(vocab)
    encoded = [tokenizer.encode(t, max_seq_length).input_word_ids
               for t in texts if t.strip()]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batches = []
    for start in range(0, len(order), batch_docs):
        rows = [encoded[i] for i in order[start:start + batch_docs]]
        width = -(-max(len(r) for r in rows) // WIDTH_STEP) * WIDTH_STEP
        ids = np.zeros((len(rows), width), np.int32)
        mask = np.zeros_like(ids)
        for k, row in enumerate(rows):
            ids[k, :len(row)], mask[k, :len(row)] = row, 1
        batches.append({"ids": ids, "mask": mask,
                        "segments": np.zeros_like(ids)})
    return batches


def export(output: str, docs: int, batch_docs: int, reference_docs: int,
           seed: int, max_seq_length: int = 128,
           fixed_shapes: Sequence[tuple[int, int]] = FIXED_SHAPES,
           **config_fields: int) -> None:
    """Write the bundle ``run`` reads (see the module docstring);
    ``config_fields`` change BERT-Base's shape (the tests make it tiny)."""
    import tensorflow as tf
    from bench import throughput
    from model.bert import BertConfig, BertEncoder, bert_weight_shapes
    from model.bf16_graph import Bfloat16Encoder

    os.makedirs(output, exist_ok=True)
    vocab, vocab_note = throughput.bench_vocab()
    config = BertConfig(vocab_size=len(vocab), **config_fields)
    shapes = {k: list(v) for k, v in bert_weight_shapes(config).items()}
    weights = bert_like(shapes, seed)
    float32 = BertEncoder(config)
    float32.set_weights(weights)
    encoders = {"float32": float32,
                "bfloat16": Bfloat16Encoder(config, weights)}

    texts, corpus_note = throughput.sample_corpus(throughput.REAL_CORPUS,
                                                  docs, seed=0)
    batches = real_batches(texts, vocab, max_seq_length, batch_docs)
    arrays = {f"{i}_{key}": value for i, batch in enumerate(batches)
              for key, value in batch.items()}
    np.savez_compressed(os.path.join(output, BATCHES_FILE), **arrays)

    shapes_to_lower = sorted({*map(tuple, fixed_shapes),
                              *(b["ids"].shape for b in batches)})
    programs = {}
    for precision, encoder in encoders.items():
        for batch, width in shapes_to_lower:
            text, order = lower(encoder, batch, width)
            file = f"{precision}_{shape_name(batch, width)}.mlir"
            with open(os.path.join(output, file), "w") as handle:
                handle.write(text)
            programs[f"{precision}/{shape_name(batch, width)}"] = {
                "file": file, "params": order}

    _write_reference(output, float32, batches, reference_docs)
    lengths = np.concatenate([b["mask"].sum(1) for b in batches])
    bundle = {
        "seed": seed, "shapes": shapes, "config": config.to_dict(),
        "hf_names": _hf_names(config), "programs": programs,
        "fixed_shapes": [list(s) for s in fixed_shapes],
        "batches": len(batches), "reference_docs": reference_docs,
        "max_seq_length": max_seq_length, "batch_docs": batch_docs,
        "flops_per_token": {"real": throughput.flops_per_token(
            float(lengths.mean()), config.num_layers, config.hidden_size,
            config.intermediate_size)},
        "corpus": corpus_note, "vocab": vocab_note,
        "tensorflow": tf.__version__}
    with open(os.path.join(output, BUNDLE_FILE), "w") as handle:
        json.dump(bundle, handle)
    print(f"bundle: {output}: {len(programs)} programs, {len(batches)} "
          f"batches of {int(lengths.size)} documents ({corpus_note})")


def _hf_names(config: Any) -> list[list[Any]] | None:
    """``[Hugging Face name, our name, transposed]`` for every parameter of
    the peer's ``BertModel``; None where transformers is not installed
    (``run`` then skips the peer)."""
    try:
        import transformers
    except ImportError:
        return None
    from bench.hf_peer import hf_config
    from model.convert import hf_to_google_name, needs_transpose
    model = transformers.BertModel(hf_config(config), add_pooling_layer=True)
    return [[name, hf_to_google_name(name),
             needs_transpose(hf_to_google_name(name))]
            for name, _ in model.named_parameters()]


def _write_reference(output: str, encoder: Any,
                     batches: Sequence[Mapping[str, np.ndarray]],
                     docs: int) -> None:
    """TensorFlow's float32 outputs (no XLA) for the first ``docs``
    documents of the batches, pooled and mean over real tokens."""
    import tensorflow as tf
    pooled, means, seen = [], [], 0
    for batch in batches:
        if seen >= docs:
            break
        p, s = encoder(*(tf.constant(batch[k])
                         for k in ("ids", "mask", "segments")))
        pooled.append(p.numpy())
        means.append(mean_over_real(s.numpy(), batch["mask"]))
        seen += len(batch["ids"])
    np.savez_compressed(os.path.join(output, REFERENCE_FILE),
                        pooled=np.concatenate(pooled)[:docs],
                        means=np.concatenate(means)[:docs])


# --- run (on the GPU machine, no TensorFlow) ----------------------------------


class Bundle:
    """What ``export`` wrote, read back."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(os.path.join(path, BUNDLE_FILE)) as handle:
            self.meta = json.load(handle)
        arrays = np.load(os.path.join(path, BATCHES_FILE))
        self.batches = [{k: arrays[f"{i}_{k}"]
                         for k in ("ids", "mask", "segments")}
                        for i in range(self.meta["batches"])]
        self.reference = dict(np.load(os.path.join(path, REFERENCE_FILE)))

    def program(self, precision: str, batch: int, width: int
                ) -> tuple[str, list[list[str]]]:
        entry = self.meta["programs"][f"{precision}/{shape_name(batch, width)}"]
        with open(os.path.join(self.path, entry["file"])) as handle:
            return handle.read(), entry["params"]


class XlaRunner:
    """Our programs compiled by XLA (JAX's runtime) on the first device:
    ``runner(precision, ids, mask, segments) -> (pooled, sequence)``."""

    def __init__(self, bundle: Bundle, weights: Mapping[str, np.ndarray]
                 ) -> None:
        import jax
        import ml_dtypes
        from jax._src import xla_bridge
        self.jax = jax
        self.backend = xla_bridge.get_backend()
        self.device = self.backend.local_devices()[0]
        self.bundle = bundle
        self.compile_s: dict[str, float] = {}
        self._executables: dict[tuple[str, int, int], Any] = {}
        self._on_device: dict[tuple[str, str], Any] = {}
        self._weights = weights
        self._bf16 = ml_dtypes.bfloat16

    def _param(self, name: str, dtype: str) -> Any:
        key = (name, dtype)
        if key not in self._on_device:
            value = self._weights[name]
            if dtype == "bfloat16":
                value = value.astype(self._bf16)
            self._on_device[key] = self.jax.device_put(value, self.device)
        return self._on_device[key]

    def _executable(self, precision: str, batch: int, width: int) -> Any:
        key = (precision, batch, width)
        if key not in self._executables:
            from jax._src.lib import xla_client
            text, params = self.bundle.program(precision, batch, width)
            started = time.perf_counter()
            self._executables[key] = (self.backend.compile_and_load(
                text, [self.device], xla_client.CompileOptions()),
                [self._param(*p) for p in params])
            self.compile_s[f"{precision}/{shape_name(batch, width)}"] = (
                time.perf_counter() - started)
        return self._executables[key]

    def __call__(self, precision: str, ids: np.ndarray, mask: np.ndarray,
                 segments: np.ndarray, copy: str = "all"
                 ) -> tuple[np.ndarray, np.ndarray] | None:
        executable, params = self._executable(precision, *ids.shape)
        inputs = [self.jax.device_put(a, self.device)
                  for a in (ids, mask, segments)]
        pooled, sequence = executable.execute(inputs + params)
        if copy != "all":
            sequence.block_until_ready()
            return (np.asarray(pooled), None) if copy == "pooled" else None
        return np.asarray(pooled), np.asarray(sequence)


class TorchRunner:
    """The peer: ``transformers.BertModel`` with the same weights, on the
    GPU if there is one; bfloat16 is the model cast with ``.to``."""

    def __init__(self, bundle: Bundle, weights: Mapping[str, np.ndarray]
                 ) -> None:
        import torch
        import transformers
        from bench.hf_peer import hf_config, load_every_parameter
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        config = hf_config(types.SimpleNamespace(**bundle.meta["config"]))
        model = transformers.BertModel(config, add_pooling_layer=True)
        load_every_parameter(model, {
            hf_name: torch.from_numpy(np.ascontiguousarray(
                weights[google].T if transpose else weights[google]))
            for hf_name, google, transpose in bundle.meta["hf_names"]})
        bfloat16 = transformers.BertModel(config, add_pooling_layer=True)
        bfloat16.load_state_dict(model.state_dict())
        self.models = {
            "float32": model.eval().to(self.device),
            "bfloat16": bfloat16.eval().to(self.device, torch.bfloat16)}

    def __call__(self, precision: str, ids: np.ndarray, mask: np.ndarray,
                 segments: np.ndarray, copy: str = "all"
                 ) -> tuple[np.ndarray, np.ndarray] | None:
        torch = self.torch
        with torch.inference_mode():
            out = self.models[precision](
                input_ids=torch.from_numpy(ids).to(self.device),
                attention_mask=torch.from_numpy(mask).to(self.device),
                token_type_ids=torch.from_numpy(segments).to(self.device))
            if copy == "pooled":
                return out.pooler_output.float().cpu().numpy(), None
            if copy != "all":
                if self.device == "cuda":
                    torch.cuda.synchronize()
                return None
            return (out.pooler_output.float().cpu().numpy(),
                    out.last_hidden_state.float().cpu().numpy())


def time_fixed(call: Callable[..., Any], precision: str, batch: int,
               width: int, seconds: float, vocab_size: int,
               copy: str = "all") -> float:
    """Tokens/s of one shape (all tokens real), after three warm calls."""
    rng = np.random.default_rng(batch * 1000 + width)
    ids = rng.integers(1000, vocab_size, (batch, width)).astype(np.int32)
    mask, segments = np.ones_like(ids), np.zeros_like(ids)
    for _ in range(3):
        call(precision, ids, mask, segments)
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        call(precision, ids, mask, segments, copy)
        calls += 1
    return calls * batch * width / (time.perf_counter() - started)


def time_real(call: Callable[..., Any], precision: str,
              batches: Sequence[Mapping[str, np.ndarray]], rounds: int,
              copy: str = "all"
              ) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
    """Best real tokens/s over ``rounds`` passes of all batches (one warm
    pass first, whose outputs are returned: pooled, mean over real
    tokens); ``copy`` says which of the timed passes' outputs come back
    to the host (COPIES)."""
    pooled, means = [], []
    for batch in batches:
        p, s = call(precision, batch["ids"], batch["mask"], batch["segments"])
        pooled.append(p)
        means.append(mean_over_real(s, batch["mask"]))
    real = sum(int(b["mask"].sum()) for b in batches)
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for batch in batches:
            call(precision, batch["ids"], batch["mask"], batch["segments"],
                 copy)
        best = max(best, real / (time.perf_counter() - started))
    return best, pooled, means


def accuracy(reference: tuple[np.ndarray, np.ndarray],
             other: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """Pooled and mean-over-real-tokens cosines (min, mean) and the largest
    absolute pooled difference."""
    pooled = cosines(reference[0], other[0])
    means = cosines(reference[1], other[1])
    return {"pooled_cos_min": float(pooled.min()),
            "pooled_cos_mean": float(pooled.mean()),
            "mean_cos_min": float(means.min()),
            "mean_cos_mean": float(means.mean()),
            "max_abs_pooled": float(np.abs(reference[0] - other[0]).max())}


def matmul_rates(seconds: float, on_gpu: bool) -> dict[str, float]:
    """bfloat16 GFLOP/s of ``[2048,768]x[768,3072]`` (and on a GPU of
    ``[16384,768]x[768,3072]`` and 8192^3), through PyTorch and JAX, where
    each is present."""
    shapes = ((2048, 768, 3072),) + (
        ((16384, 768, 3072), (8192, 8192, 8192)) if on_gpu else ())
    rates: dict[str, float] = {}
    for engine, timer in (("torch", _torch_matmul), ("jax", _jax_matmul)):
        for m, k, n in shapes:
            try:
                rate = timer(m, k, n, seconds)
            except ImportError:
                continue
            rates[f"{engine} {m}x{k}x{n}"] = rate
    return rates


def _gflops(step: Callable[[], Any], finish: Callable[[Any], Any],
            flops: float, seconds: float) -> float:
    """GFLOP/s of ``step`` (``flops`` each) over at least 10 calls and
    ``seconds``, after 3 warm calls; ``finish`` waits for a call's result
    (devices run asynchronously)."""
    for _ in range(3):
        finish(step())
    calls, started = 0, time.perf_counter()
    while calls < 10 or time.perf_counter() - started < seconds:
        out = step()
        calls += 1
    finish(out)
    return flops * calls / (time.perf_counter() - started) / 1e9


def _torch_matmul(m: int, k: int, n: int, seconds: float) -> float:
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
    finish = ((lambda _: torch.cuda.synchronize()) if device == "cuda"
              else (lambda _: None))
    return _gflops(lambda: a @ b, finish, 2 * m * k * n, seconds)


def _jax_matmul(m: int, k: int, n: int, seconds: float) -> float:
    import jax
    import jax.numpy as jnp
    a = jnp.ones((m, k), jnp.bfloat16)
    b = jnp.ones((k, n), jnp.bfloat16)
    dot = jax.jit(jnp.dot)
    return _gflops(lambda: dot(a, b), lambda out: out.block_until_ready(),
                   2 * m * k * n, seconds)


def machine() -> dict[str, Any]:
    """The accelerator and the versions of what runs on it."""
    info: dict[str, Any] = {"python": sys.version.split()[0]}
    for name in ("jax", "jaxlib", "torch", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = "absent"
    info["tensorflow"] = ("installed" if importlib.util.find_spec(
        "tensorflow") else "absent")
    try:
        import jax
        device = jax.devices()[0]
        info["device"] = f"{device.platform}: {device.device_kind}"
    except ImportError:
        info["device"] = "no JAX"
    try:
        import torch
        info["cuda"] = torch.version.cuda
    except ImportError:
        info["cuda"] = None
    return info


def on_gpu() -> bool:
    """Whether JAX's default device is a GPU."""
    try:
        import jax
    except ImportError:
        return False
    return jax.devices()[0].platform == "gpu"


def run(bundle: Bundle, seconds: float, rounds: int,
        engines: Sequence[str] = ("ours", "torch"), copy: str = "all",
        shapes: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """Time and check everything in the bundle (the fixed ``shapes`` given
    instead of the bundle's); returns the results."""
    meta = bundle.meta
    shapes = meta["fixed_shapes"] if shapes is None else shapes
    weights = bert_like(meta["shapes"], meta["seed"])
    result: dict[str, Any] = {"machine": machine(), "copy": copy,
                              "matmul_gflops": matmul_rates(seconds,
                                                            on_gpu()),
                              "fixed": {}, "real": {}, "accuracy": {}}
    runners: dict[str, Callable[..., Any]] = {}
    if "ours" in engines:
        runners["ours"] = XlaRunner(bundle, weights)
    if "torch" in engines and meta["hf_names"]:
        runners["torch"] = TorchRunner(bundle, weights)
    outputs = {}
    for engine, call in runners.items():
        for precision in PRECISIONS:
            label = f"{engine} {precision}"
            result["fixed"][label] = {
                shape_name(b, w): time_fixed(call, precision, b, w, seconds,
                                             meta["config"]["vocab_size"],
                                             copy)
                for b, w in shapes}
            rate, pooled, means = time_real(call, precision, bundle.batches,
                                            rounds, copy)
            result["real"][label] = rate
            outputs[label] = (np.concatenate(pooled), np.concatenate(means))
            print(f"{label}: done", flush=True)
    if "ours" in runners:
        result["compile_s"] = runners["ours"].compile_s
        ours = outputs["ours float32"]
        n = meta["reference_docs"]
        result["accuracy"]["ours float32 vs TensorFlow float32 (CPU)"] = (
            accuracy((bundle.reference["pooled"], bundle.reference["means"]),
                     (ours[0][:n], ours[1][:n])))
        for label, out in outputs.items():
            if label != "ours float32":
                result["accuracy"][f"{label} vs ours float32"] = accuracy(
                    ours, out)
    return result


def report(result: Mapping[str, Any], meta: Mapping[str, Any]) -> list[str]:
    """The printed table."""
    m = result["machine"]
    lines = [f"device:   {m.get('device')} (CUDA {m.get('cuda')})",
             "versions: " + ", ".join(f"{k} {m[k]}" for k in (
                 "python", "jax", "jaxlib", "torch", "transformers",
                 "tensorflow")),
             f"graphs:   lowered by TensorFlow {meta['tensorflow']} to "
             "StableHLO, compiled by XLA (JAX's runtime) here",
             f"corpus:   {meta['corpus']}; max_seq_length "
             f"{meta['max_seq_length']}, {meta['batch_docs']} documents per "
             f"batch, widths padded to multiples of {WIDTH_STEP}", ""]
    rates = result["matmul_gflops"]
    lines += [f"matmul bf16 {k}: {v:,.0f} GFLOP/s" for k, v in rates.items()]
    roofline = max(rates.values(), default=0.0)
    shapes = list(next(iter(result["fixed"].values()), {}))
    timed = COPIES[result.get("copy", "all")]
    lines += ["", f"model calls, tokens/s ({timed})",
              f"{'variant':<16}" + "".join(f"{s:>11}" for s in shapes)
              + f"{'real corpus':>13}{'%roof':>7}"]
    real_flops = meta["flops_per_token"]["real"]
    for label, by_shape in result["fixed"].items():
        real = result["real"][label]
        share = (f"{100 * real * real_flops / 1e9 / roofline:6.1f}%"
                 if roofline and "bfloat16" in label else f"{'-':>7}")
        lines.append(f"{label:<16}" + "".join(
            f"{by_shape[s]:>11,.0f}" for s in shapes)
            + f"{real:>13,.0f}{share}")
    real = result["real"]
    for ours, peer in (("ours bfloat16", "torch bfloat16"),
                       ("ours bfloat16", "ours float32"),
                       ("ours float32", "torch float32")):
        if ours in real and peer in real:
            lines.append(f"{ours} / {peer}: {real[ours] / real[peer]:.2f}x "
                         "on the real corpus")
    lines += ["", f"{'accuracy':<46}{'pooled min':>11}{'mean':>10}"
              f"{'mean-seq min':>14}{'mean':>10}{'max|err|':>10}"]
    for label, a in result["accuracy"].items():
        lines.append(f"{label:<46}{a['pooled_cos_min']:>11.6f}"
                     f"{a['pooled_cos_mean']:>10.6f}{a['mean_cos_min']:>14.6f}"
                     f"{a['mean_cos_mean']:>10.6f}{a['max_abs_pooled']:>10.2e}")
    if "compile_s" in result:
        lines.append(f"XLA compile: {len(result['compile_s'])} programs, "
                     f"{sum(result['compile_s'].values()):.1f} s")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="lower our graphs (needs TensorFlow)")
    ex.add_argument("--output", required=True)
    ex.add_argument("--docs", type=int, default=1024)
    ex.add_argument("--batch_docs", type=int, default=128)
    ex.add_argument("--reference_docs", type=int, default=256)
    ex.add_argument("--seed", type=int, default=1)
    rn = sub.add_parser("run", help="compile and time them (no TensorFlow)")
    rn.add_argument("--bundle", required=True)
    rn.add_argument("--json")
    rn.add_argument("--seconds", type=float, default=1.0)
    rn.add_argument("--rounds", type=int, default=3)
    rn.add_argument("--engines", default="ours,torch")
    rn.add_argument("--copy", choices=sorted(COPIES), default="all",
                    help="which outputs the timed calls copy to the host")
    rn.add_argument("--shapes", help="fixed shapes, e.g. 16x128,256x128 "
                    "(default: the bundle's)")
    args = parser.parse_args(argv)
    if args.command == "export":
        export(args.output, args.docs, args.batch_docs, args.reference_docs,
               args.seed)
        return
    shapes = ([[int(n) for n in s.split("x")] for s in
               args.shapes.split(",")] if args.shapes else None)
    bundle = Bundle(args.bundle)
    result = run(bundle, args.seconds, args.rounds,
                 args.engines.split(","), args.copy, shapes)
    for line in report(result, bundle.meta):
        print(line)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
