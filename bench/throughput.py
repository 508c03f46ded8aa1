"""End-to-end embedding throughput: ours on each engine and precision, the
Beam baselines and Hugging Face on PyTorch, side by side.

    python -m bench.throughput [--docs 2048] [--variants a,b,...]

Every variant embeds the same documents with the same BERT-Base-shaped
model (L12 H768 A12, vocab 21128, random weights, normal with std 0.02 like
BERT's initialisation; ``--init_std``, or ``--model`` for other weights),
each in its own process so that peak RSS is its own, one after the other:

* ``baseline``: what a Beam user writes first: ``RunInference`` with
  ``TFModelHandlerTensor``, inputs padded to ``max_seq_length``;
* ``peer``: the same with Beam's own length-aware batching;
* ``ours``: our pipeline on TensorFlow, float32, XLA on (the default before
  ``--engine`` existed; run as ``--engine tensorflow --precision float32
  --xla on`` where the build has ``--engine``);
* ``ours_noxla`` (not run by default): ours with ``--xla off``;
* ``ours_tf_bf16``, ``ours_ov_f32``, ``ours_ov_bf16``, ``ours_ov_int8``:
  ours with ``--engine tensorflow|openvino --precision ...`` (int8 with
  ``--int8_model``, made once by ``python -m model.quantize`` from
  calibration documents that are not benchmarked);
* ``ours_auto``: ours with the default flags (engine and precision auto);
* ``torch_f32``, ``torch_bf16``: the peer a user picks instead:
  ``transformers``' ``BertModel`` on PyTorch with the same weights, same
  batching limits, reading the JSONL and writing pooled and sequence
  Parquet like ours (``bench.hf_peer``).

Our pipeline and the Beam variants read, tokenize and write with the same
transforms; the flags of ours go through ``pipeline.run``'s own resolution
(``resolve_job``), in this process, and the resolved job is run by the
worker process, timed from ``pipeline.run()`` (the launcher's checks and
model probe are not in the timings).  A variant whose flags this build of
``pipeline.run`` lacks (its ``--help`` is read) prints "not available in
this build"; one that needs AMX/AVX512-BF16 (bfloat16) or AMX-INT8/VNNI
(int8) prints "not measurable on this CPU" where the CPU lacks them.

It prints the CPU and its flags, the versions, the matmul rates of every
engine and precision (``bench.roofline``: the roofline of a precision is
the best engine's rate over the model's FLOPs per real token), a table of
documents/s, real tokens/s end to end and in model calls, padding, the
shares of the roofline at each variant's precision, peak RSS and wall
time, the ratios between variants, the accuracy of every variant against
``ours`` (float32) on the embeddings each wrote, matched by document id,
and peak RSS at ``max_seq_length`` 512 with sequence output on, per
engine.  It writes the table as a PNG bar chart and as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import pickle
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from bench import beam_baselines, report, roofline

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
REAL_VOCAB = ASSETS / "bert_zh" / "vocab.txt"
REAL_CORPUS = ASSETS / "corpus" / "zh_public_domain.jsonl"
LONG_CORPUS = ASSETS / "corpus" / "clue_news_web_sample.jsonl"

BASE_VOCAB_SIZE = 21128
ACCURACY_MIN_DOCS = 1000


# --- variants ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """One contender: how it runs (``kind``: beam, ours or hf), on which
    engine and precision, and whether it runs by default."""
    name: str
    label: str
    kind: str
    engine: str
    precision: str
    xla: Optional[str] = None  # ours on TensorFlow: --xla on|off
    default: bool = True


VARIANTS = (
    Variant("ours", "ours TF f32+XLA", "ours", "tensorflow", "float32",
            "on"),
    Variant("baseline", "baseline (Beam)", "beam", "tensorflow", "float32"),
    Variant("peer", "peer (Beam length-aware)", "beam", "tensorflow",
            "float32"),
    Variant("ours_noxla", "ours TF f32", "ours", "tensorflow", "float32",
            "off", default=False),
    Variant("ours_tf_bf16", "ours TF bf16", "ours", "tensorflow",
            "bfloat16"),
    Variant("ours_ov_f32", "ours OpenVINO f32", "ours", "openvino",
            "float32"),
    Variant("ours_ov_bf16", "ours OpenVINO bf16", "ours", "openvino",
            "bfloat16"),
    Variant("ours_ov_int8", "ours OpenVINO int8", "ours", "openvino",
            "int8"),
    Variant("ours_auto", "ours auto (defaults)", "ours", "auto", "auto"),
    Variant("torch_f32", "HF BertModel torch f32", "hf", "torch",
            "float32"),
    Variant("torch_bf16", "HF BertModel torch bf16", "hf", "torch",
            "bfloat16"),
)
BY_NAME = {v.name: v for v in VARIANTS}
REFERENCE = "ours"  # float32 on TensorFlow: accuracy is measured against it
DEFAULT_RSS_VARIANTS = ("ours", "ours_ov_f32", "ours_auto")

_CPU_NEEDS = {
    "bfloat16": "not measurable on this CPU: needs AMX-BF16 or AVX512-BF16",
    "int8": "not measurable on this CPU: needs AMX-INT8, AVX512-VNNI or "
            "AVX-VNNI",
}


@dataclasses.dataclass(frozen=True)
class Build:
    """What this checkout offers: ``pipeline.run``'s options (name ->
    choices, None where free-form), and the optional pieces installed."""
    options: Mapping[str, Optional[frozenset[str]]]
    has_quantize: bool = False
    has_openvino: bool = False
    has_torch: bool = False
    quantize_takes_samples: bool = False

    def accepts(self, option: str, value: Optional[str] = None) -> bool:
        """Whether ``pipeline.run`` takes ``option`` (with ``value``)."""
        if option not in self.options:
            return False
        choices = self.options[option]
        return value is None or choices is None or value in choices


def parse_help_options(text: str) -> dict[str, Optional[frozenset[str]]]:
    """``--flag`` -> its ``{choices}`` (None when the help shows none) from
    an argparse ``--help`` text."""
    options: dict[str, Optional[frozenset[str]]] = {}
    pattern = r"(?<![\w-])(--[A-Za-z0-9_]+)(?:[ =]\{([^}]*)\})?"
    for match in re.finditer(pattern, text):
        flag, choices = match.group(1), match.group(2)
        if choices is not None:
            options[flag] = frozenset(c.strip() for c in choices.split(","))
        else:
            options.setdefault(flag, None)
    return options


def probe_build() -> Build:
    """Reads ``python -m pipeline.run --help`` and looks for the optional
    packages and modules (without importing them)."""
    done = subprocess.run([sys.executable, "-m", "pipeline.run", "--help"],
                          cwd=ROOT, capture_output=True, text=True,
                          check=False, env=_worker_env())
    found = importlib.util.find_spec
    has_quantize = (ROOT / "model" / "quantize.py").exists()
    quantize_options: dict[str, Any] = {}
    if has_quantize:
        quantize_options = parse_help_options(subprocess.run(
            [sys.executable, "-m", "model.quantize", "--help"], cwd=ROOT,
            capture_output=True, text=True, check=False,
            env=_worker_env()).stdout)
    return Build(
        options=parse_help_options(done.stdout),
        has_quantize=has_quantize,
        quantize_takes_samples={"--samples", "--eval_samples"}
        <= set(quantize_options),
        has_openvino=found("openvino") is not None,
        has_torch=found("torch") is not None
        and found("transformers") is not None)


def unavailable(variant: Variant, build: Build,
                flags: frozenset[str]) -> Optional[str]:
    """Why ``variant`` cannot run here (None when it can): missing from
    this build first, then missing CPU instructions."""
    missing = None
    if variant.kind == "hf" and not build.has_torch:
        missing = "torch and transformers are not installed (pip install " \
                  "-e .[bench])"
    elif variant.kind == "ours":
        missing = _missing_in_build(variant, build)
    if missing:
        return f"not available in this build: {missing}"
    if not roofline.precision_measurable(variant.precision, flags):
        return _CPU_NEEDS[variant.precision]
    return None


def _missing_in_build(variant: Variant, build: Build) -> Optional[str]:
    """The pipeline.run flag, value or module ``variant`` needs and this
    build lacks."""
    if variant.engine == "auto" or variant.engine == "openvino":
        if not build.accepts("--engine"):
            return "pipeline.run has no --engine"
    if variant.engine == "openvino":
        if not build.accepts("--engine", "openvino"):
            return "--engine has no openvino"
        if not build.has_openvino:
            return "openvino is not installed"
    if variant.precision != "auto" and not build.accepts(
            "--precision", variant.precision):
        return f"--precision has no {variant.precision}"
    if variant.precision == "int8" and not (
            build.accepts("--int8_model") and build.has_quantize):
        return "no --int8_model / model.quantize"
    return None


def pipeline_flags(variant: Variant, build: Build,
                   int8_model: Optional[str] = None) -> list[str]:
    """The ``pipeline.run`` flags that select ``variant``'s engine and
    precision in this build (none for auto: the defaults)."""
    flags: list[str] = []
    if variant.engine not in ("auto",) and build.accepts("--engine"):
        flags += ["--engine", variant.engine]
    if variant.precision != "auto":
        flags += ["--precision", variant.precision]
    if variant.precision == "int8":
        flags += ["--int8_model", str(int8_model)]
    if variant.xla is not None:
        flags += ["--xla", variant.xla]
    return flags


# --- setup: model and corpus -------------------------------------------------


def bench_vocab() -> tuple[list[str], str]:
    """The real Chinese BERT vocab, else the demo vocab cut to 21,128."""
    from model.vocab import load_vocab
    if REAL_VOCAB.exists():
        return load_vocab(str(REAL_VOCAB)), "real Chinese BERT vocab"
    from model.demo import demo_vocab
    return demo_vocab()[:BASE_VOCAB_SIZE], "generated vocab (assets absent)"


def bert_like_weights(config, std: float, seed: int) -> dict[str, np.ndarray]:
    """Weights initialised as BERT and Hugging Face initialise them:
    kernels and embedding tables normal(0, ``std``), LayerNorm gamma 1,
    beta and biases 0."""
    from model.bert import bert_weight_shapes
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in bert_weight_shapes(config).items():
        if name.endswith("/gamma"):
            weights[name] = np.ones(shape, np.float32)
        elif name.endswith(("/beta", "/bias")):
            weights[name] = np.zeros(shape, np.float32)
        else:
            weights[name] = rng.normal(0.0, std, shape).astype(np.float32)
    return weights


def ensure_bert_base(cache_dir: str, init_std: float = 0.02,
                     seed: int = 1) -> str:
    """A BERT-Base-shaped SavedModel with random normal(0, ``init_std``)
    weights, built once per (std, seed) and cached."""
    from model.bert import BertConfig
    from model.export import export_bert_saved_model
    path = os.path.join(cache_dir, f"bench_bert_base_L12_H768_normal"
                                   f"{init_std:g}_seed{seed}_v2")
    if not os.path.exists(os.path.join(path, "saved_model.pb")):
        vocab, _ = bench_vocab()
        config = BertConfig(vocab_size=len(vocab))
        export_bert_saved_model(path, config, vocab,
                                weights=bert_like_weights(config, init_std,
                                                          seed))
    return path


def generated_texts(count: int, seed: int) -> list[str]:
    """Chinese-like texts with a log-normal length spread (median ~44)."""
    rng = np.random.default_rng(seed)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)] + list("，。！？")
    lengths = np.clip(rng.lognormal(np.log(44), 0.9, count), 2, 2000)
    return ["".join(rng.choice(chars, int(n))) for n in lengths]


def _read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.open(encoding="utf-8")]


def sample_corpus(path: Path, count: int, seed: int,
                  longest: bool = False) -> tuple[list[str], str]:
    """``count`` texts from a JSONL corpus (random, or the longest)."""
    if not path.exists():
        return generated_texts(count, seed), "generated (assets absent)"
    texts = _read_texts(path)
    count = min(count, len(texts))
    if longest:
        chosen = sorted(texts, key=len, reverse=True)[:count]
    else:
        rng = np.random.default_rng(seed)
        chosen = [texts[i] for i in rng.choice(len(texts), count,
                                               replace=False)]
    return chosen, f"{path.name} ({'longest' if longest else 'random'} " \
                   f"{count} of {len(texts)})"


def calibration_texts(path: Path, count: int, seed: int,
                      benchmarked: int) -> list[str]:
    """``count`` texts of the corpus that ``sample_corpus(path,
    benchmarked, seed)`` did not pick (int8 calibration must not see the
    documents it is measured on)."""
    if not path.exists():
        return generated_texts(count, seed + 1)
    texts = _read_texts(path)
    chosen = set(np.random.default_rng(seed).choice(
        len(texts), min(benchmarked, len(texts)), replace=False).tolist())
    rest = [i for i in range(len(texts)) if i not in chosen]
    rng = np.random.default_rng(seed + 1)
    picked = rng.choice(len(rest), min(count, len(rest)), replace=False)
    return [texts[rest[i]] for i in picked]


def write_jsonl(texts: Iterable[str], path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": f"d{i:06d}", "text": text},
                                    ensure_ascii=False) + "\n")


def flops_per_token(mean_length: float, layers: int = 12,
                    hidden: int = 768, intermediate: int = 3072) -> float:
    """Forward FLOPs per token of a BERT encoder.

    Dense layers: 2 x (4 H^2 + 2 H I) per layer; attention scores and
    weighted sum: 2 x 2 x S x H per layer for a sequence of length S.
    """
    dense = 2 * (4 * hidden * hidden + 2 * hidden * intermediate)
    attention = 4 * mean_length * hidden
    return layers * (dense + attention)


# --- peak memory -------------------------------------------------------------


def reset_peak_rss() -> None:
    """Restarts this process's peak-RSS count from its current RSS (Linux;
    elsewhere the peak keeps counting from the start)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """This process's peak resident memory since start or the last
    ``reset_peak_rss``."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            found = re.search(r"VmHWM:\s+(\d+) kB", handle.read())
        if found:
            return int(found.group(1)) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- one pipeline, inside a worker process ----------------------------------


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Runs one variant's pipeline and returns its measurements."""
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions
    from model.load import compile_stats
    out = os.path.join(args.workdir, "emb")
    pipeline = beam.Pipeline(options=PipelineOptions(["--runner",
                                                      "DirectRunner"]))
    variant = BY_NAME[args.worker]
    if variant.kind == "ours":
        from pipeline.graph import build_pipeline
        with open(args.job, "rb") as handle:
            config = pickle.load(handle)
        vocab = list(config.vocab)
        build_pipeline(pipeline, config)
        engine = config.infer.engine
        precision = config.infer.precision
    else:
        from model.vocab import load_vocab, read_tokenizer_settings
        vocab = load_vocab(read_tokenizer_settings(args.model).vocab_path)
        beam_baselines.build_beam_variant(
            pipeline, args.worker, args.corpus, out, args.model, vocab,
            args.max_seq_length, args.batch_size)
        engine, precision = "tensorflow", "float32"
    reset_peak_rss()
    started = time.perf_counter()
    result = pipeline.run()
    result.wait_until_finish()
    wall = time.perf_counter() - started
    metrics = result.metrics().query(MetricsFilter())
    counters = {c.key.metric.name: c.committed for c in metrics["counters"]}
    # RunInference times every model call: the sum is the model's time.
    model_us = sum(d.committed.sum for d in metrics["distributions"]
                   if d.key.metric.name.endswith(
                       "inference_batch_latency_micro_secs"))
    stats = compile_stats()
    measured = {
        "variant": args.worker, "wall_s": wall, "model_s": model_us / 1e6,
        "documents": counters.get("documents_read", 0)
        - counters.get("documents_skipped_empty", 0),
        "peak_rss_mib": peak_rss_mib(), "engine": engine,
        "precision": precision,
        "tokens_computed": (counters.get("tokens_computed", 0)
                            if variant.kind == "ours"
                            else beam_baselines.COMPUTED_TOKENS[0]),
        "xla_shapes": stats.shapes,
        "xla_first_calls_s": stats.first_call_seconds,
        "xla_first_calls_tokens": stats.first_call_tokens,
    }
    measured.update(_real_tokens_and_stages(args, vocab, out, wall))
    return measured


def _real_tokens_and_stages(args, vocab: list[str], out: str,
                            wall: float) -> dict[str, Any]:
    """Real tokens written, and (for ours) tokenizer and writer time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pipeline.read_embeddings import load_embeddings
    from transforms.embedding_files import (EMBEDDINGS, PARQUET,
                                            embedding_schema,
                                            output_patterns, to_record_batch)
    from transforms.records import DocumentEmbedding
    from transforms.tokenization import BertWordPieceTokenizer
    emb = load_embeddings(output_patterns(out, PARQUET)[EMBEDDINGS])
    stats: dict[str, Any] = {"tokens_real": int(emb.num_tokens.sum()),
                             "rows": len(emb)}
    if args.worker != "ours":
        return stats
    texts = [json.loads(line)["text"] for line in open(args.corpus,
                                                       encoding="utf-8")]
    tokenizer = BertWordPieceTokenizer(vocab)
    started = time.perf_counter()
    for text in texts:
        tokenizer.encode(text, args.max_seq_length)
    stats["tokenize_share"] = (time.perf_counter() - started) / wall
    rows = [DocumentEmbedding(i, int(n), False, p, s) for i, n, p, s in zip(
        emb.ids, emb.num_tokens, emb.pooled_output, emb.sequence_output)]
    started = time.perf_counter()
    schema = embedding_schema(768)
    batches = [to_record_batch(rows[i:i + 256], schema)
               for i in range(0, len(rows), 256)]
    pq.write_table(pa.Table.from_batches(batches),
                   os.path.join(args.workdir, "rewrite.parquet"))
    stats["write_share"] = (time.perf_counter() - started) / wall
    return stats


# --- orchestration -----------------------------------------------------------


class VariantFailed(RuntimeError):
    """A variant's process or its preparation failed (one-line message)."""


def _worker_env() -> dict[str, str]:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))


def run_worker_process(command: list[str], label: str,
                       timeout: Optional[float] = None) -> dict[str, Any]:
    """Runs a benchmark worker in its own process; returns the JSON object
    it prints last (its measurements).  ``VariantFailed`` says why not,
    in one line, with the end of its stderr attached."""
    try:
        done = subprocess.run(command, cwd=ROOT, env=_worker_env(),
                              capture_output=True, text=True, check=False,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise VariantFailed(f"{label}: no result within {timeout:.0f} s") \
            from err
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = [l for l in done.stderr.strip().splitlines() if l.strip()]
        error = VariantFailed(f"{label}: exit {done.returncode}: "
                              + (tail[-1][:300] if tail else "no output"))
        error.details = "\n".join(tail[-15:])  # type: ignore[attr-defined]
        raise error
    return json.loads(lines[-1])


class Runner:
    """Spawns the variants' worker processes with the run's settings."""

    def __init__(self, args: argparse.Namespace, build: Build):
        self.args, self.build = args, build
        self.int8_model: Optional[str] = None
        self.hf_model: Optional[str] = None

    def _common(self, max_seq: int) -> list[str]:
        return ["--max_seq_length", str(max_seq), "--batch_size",
                str(self.args.batch_size), "--max_tokens_per_batch",
                str(self.args.max_tokens_per_batch)]

    def spawn(self, variant: Variant, corpus: str, max_seq: int,
              tag: str = "") -> dict[str, Any]:
        """Runs ``variant`` over ``corpus`` in a worker process."""
        args = self.args
        workdir = os.path.join(args.workdir, f"{variant.name}-{max_seq}{tag}")
        os.makedirs(workdir, exist_ok=True)
        common = self._common(max_seq)
        if variant.kind == "hf":
            command = [sys.executable, "-m", "bench.hf_peer", "embed",
                       "--hf_model", self.hf_model, "--corpus", corpus,
                       "--output", os.path.join(workdir, "emb"),
                       "--precision", variant.precision] + common
        else:
            command = [sys.executable, "-m", "bench.throughput", "--worker",
                       variant.name, "--corpus", corpus, "--model",
                       args.model, "--workdir", workdir] + common
        if variant.kind == "ours":
            job = os.path.join(workdir, "job.pkl")
            self._resolve_job(variant, corpus, max_seq, workdir, job)
            command += ["--job", job]
        measured = run_worker_process(command, variant.name,
                                      args.worker_timeout)
        measured.update(variant=variant.name,
                        output=os.path.join(workdir, "emb"))
        return measured

    def _resolve_job(self, variant: Variant, corpus: str, max_seq: int,
                     workdir: str, path: str) -> None:
        """``pipeline.run``'s own resolution of the variant's flags,
        pickled for the worker."""
        from apache_beam.options.pipeline_options import PipelineOptions
        from pipeline.options import EmbedOptions
        from pipeline.run import resolve_job
        flags = pipeline_flags(variant, self.build, self.int8_model)
        argv = ["--input", corpus, "--output",
                os.path.join(workdir, "emb"), "--model", self.args.model
                ] + self._common(max_seq) + flags
        try:
            config = resolve_job(
                PipelineOptions(argv).view_as(EmbedOptions)).config
        except Exception as err:  # the launcher's one-line errors
            raise VariantFailed(f"{variant.name}: pipeline.run rejected "
                                f"{' '.join(flags)}: {err}") from err
        with open(path, "wb") as handle:
            pickle.dump(config, handle)

    def prepare_hf(self) -> float:
        """Converts the SavedModel for the Hugging Face peer, once per model
        (cached; not timed)."""
        from model.runtime import default_cache_dir
        started = time.perf_counter()
        self.hf_model = os.path.join(default_cache_dir(),
                                     f"bench_hf_{model_key(self.args.model)}")
        if not os.path.exists(self.hf_model):
            run_worker_process([sys.executable, "-m", "bench.hf_peer",
                                "convert", "--model", self.args.model,
                                "--output", self.hf_model], "hf convert")
        return time.perf_counter() - started

    def prepare_int8(self, calibration: str, samples: int) -> float:
        """Quantizes the model once per (model, calibration set), cached."""
        from model.openvino_engine import GRAPH_REWRITES
        from model.quantize import PRESETS
        from model.runtime import default_cache_dir
        with open(calibration, "rb") as handle:
            # The quantizer's version too: a newer one makes a new model.
            digest = hashlib.sha256(handle.read() + repr(
                (GRAPH_REWRITES, PRESETS)).encode()).hexdigest()[:10]
        path = os.path.join(default_cache_dir(), "bench_int8_"
                            f"{model_key(self.args.model)}_{digest}")
        started = time.perf_counter()
        if not os.path.exists(path):
            command = [sys.executable, "-m", "model.quantize", "--model",
                       self.args.model, "--calibration", calibration,
                       "--output", path]
            if self.build.quantize_takes_samples:
                command += ["--samples", str(samples), "--eval_samples",
                            str(max(1, samples // 2))]
            try:
                done = subprocess.run(command, cwd=ROOT, env=_worker_env(),
                                      capture_output=True, text=True,
                                      check=False,
                                      timeout=self.args.worker_timeout)
            except subprocess.TimeoutExpired as err:
                raise VariantFailed("model.quantize: no result in time") \
                    from err
            if done.returncode != 0 or not os.path.exists(path):
                tail = done.stderr.strip().splitlines() or ["no output"]
                raise VariantFailed(f"model.quantize: exit "
                                    f"{done.returncode}: {tail[-1][:300]}")
        self.int8_model = path
        return time.perf_counter() - started


def model_key(model_dir: str) -> str:
    """A cache key of a SavedModel: its name and a digest of its path and
    the size and time of its files (a re-exported model gets a new key)."""
    model_dir = os.path.abspath(model_dir)
    state = [model_dir]
    for name in ("saved_model.pb", os.path.join("variables",
                                                "variables.index")):
        try:
            info = os.stat(os.path.join(model_dir, name))
            state.append(f"{name}:{info.st_size}:{info.st_mtime_ns}")
        except OSError:
            state.append(f"{name}:absent")
    digest = hashlib.sha256("|".join(state).encode()).hexdigest()[:10]
    return f"{os.path.basename(model_dir)}_{digest}"


def _versions() -> str:
    names = ("tensorflow", "torch", "transformers", "openvino", "nncf",
             "apache-beam", "numpy")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found) + f", Python {platform.python_version()}"


CPU_FEATURES = (("AMX-BF16", "amx_bf16"), ("AMX-INT8", "amx_int8"),
                ("AVX512-BF16", "avx512_bf16"), ("AVX512-VNNI", "avx512_vnni"),
                ("AVX-VNNI", "avx_vnni"), ("AVX512F", "avx512f"),
                ("AVX2", "avx2"))


def machine_lines(flags: frozenset[str]) -> list[str]:
    """The CPU, its relevant feature flags, and the versions."""
    from model.runtime import cpu_model_name, usable_cores
    features = ", ".join(f"{label} {'yes' if flag in flags else 'no'}"
                         for label, flag in CPU_FEATURES)
    return [f"machine:  {cpu_model_name()}, {os.cpu_count()} cores "
            f"({usable_cores()} usable)",
            f"cpu:      {features}",
            f"versions: {_versions()}"]


def _best_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant, the run with the shortest wall time (noise only slows)."""
    best: dict[str, dict[str, Any]] = {}
    for run in runs:
        name = run["variant"]
        if name not in best or run["wall_s"] < best[name]["wall_s"]:
            best[name] = run
    return best


def measure_rooflines(build: Build, flags: frozenset[str],
                      into: dict[str, dict[str, float]],
                      notes: list[str]) -> None:
    """One round of ``bench.roofline`` per engine present; keeps the best
    rate per engine and precision in ``into``."""
    engines = ["tensorflow"] + (["torch"] if build.has_torch else []) + (
        ["openvino"] if build.has_openvino else [])
    for engine in engines:
        try:
            command = [sys.executable, "-m", "bench.roofline", "--engine",
                       engine, "--cpu_flags", ",".join(sorted(flags))]
            rates = run_worker_process(command, f"roofline {engine}", 600)
        except VariantFailed as err:
            notes.append(str(err))
            continue
        best = into.setdefault(engine, {})
        for precision, rate in rates.items():
            best[precision] = max(rate, best.get(precision, 0.0))


def roofline_tokens(gflops: Mapping[str, Mapping[str, float]],
                    mean_length: float) -> dict[str, float]:
    """Per precision: the best engine's matmul rate over the FLOPs of one
    real token, in tokens/s."""
    best: dict[str, float] = {}
    for rates in gflops.values():
        for precision, rate in rates.items():
            best[precision] = max(rate, best.get(precision, 0.0))
    return {p: r * 1e9 / flops_per_token(mean_length)
            for p, r in best.items()}


def effective_precision(measured: Mapping[str, Any],
                        flags: frozenset[str]) -> tuple[str, bool]:
    """The precision a run computed in, and whether it is assumed: a run
    left at auto that does not say is taken as bfloat16 where the CPU has
    it, else float32."""
    precision = measured.get("precision", "auto")
    if precision in ("float32", "bfloat16", "int8"):
        return precision, False
    return ("bfloat16" if roofline.precision_measurable("bfloat16", flags)
            else "float32"), True


def table_rows(selected: Sequence[Variant],
               results: Mapping[str, Mapping[str, Any]],
               statuses: Mapping[str, Optional[str]],
               rooflines: Mapping[str, float],
               flags: frozenset[str]) -> list[report.Row]:
    """The report's rows: measurements and roofline shares, or reasons."""
    rows = []
    for variant in selected:
        status = statuses.get(variant.name)
        measured = results.get(variant.name)
        if status or measured is None:
            rows.append(report.Row(variant.name, variant.label,
                                   variant.engine, variant.precision,
                                   status or "not run"))
            continue
        precision, assumed = effective_precision(measured, flags)
        wall = max(measured["wall_s"], 1e-9)
        e2e = measured["tokens_real"] / wall
        in_model = measured["tokens_real"] / max(measured["model_s"], 1e-9)
        limit = rooflines.get(precision)
        rows.append(report.Row(
            variant.name, variant.label,
            str(measured.get("engine", variant.engine)), precision, None,
            measured["documents"] / wall, e2e, in_model,
            1 - measured["tokens_real"] / max(measured["tokens_computed"], 1),
            measured["peak_rss_mib"], measured["wall_s"],
            e2e / limit if limit else None,
            in_model / limit if limit else None, assumed))
    return rows


# --- accuracy ----------------------------------------------------------------


def _means(sequences: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack([s.astype(np.float64).mean(axis=0) for s in sequences])


def accuracy(reference, other) -> dict[str, Any]:
    """Accuracy of ``other``'s embeddings against ``reference``'s
    (``pipeline.read_embeddings.Embeddings``), matched by document id:
    cosines of the pooled outputs and of the sequence outputs' means over
    real tokens, and the largest absolute differences (sequence outputs of
    documents tokenized alike only; ``token_diffs`` counts the others)."""
    from bench.precision import cosines
    index = {doc_id: row for row, doc_id in enumerate(reference.ids)}
    pairs = [(index[doc_id], row) for row, doc_id in enumerate(other.ids)
             if doc_id in index]
    if not pairs:
        return {"error": "no document ids in common with the reference"}
    ref_rows, rows = (list(t) for t in zip(*pairs))
    pooled_ref = reference.pooled_output[ref_rows]
    pooled = other.pooled_output[rows]
    pooled_cos = cosines(pooled_ref, pooled)
    seq_ref = [reference.sequence_output[i] for i in ref_rows]
    seq = [other.sequence_output[i] for i in rows]
    mean_cos = cosines(_means(seq_ref), _means(seq))
    same = [k for k in range(len(pairs)) if seq_ref[k].shape == seq[k].shape]
    max_seq = max((float(np.abs(seq_ref[k].astype(np.float32)
                                 - seq[k].astype(np.float32)).max())
                   for k in same), default=float("nan"))
    return {"docs": len(pairs), "pooled_cos_min": float(pooled_cos.min()),
            "pooled_cos_mean": float(pooled_cos.mean()),
            "mean_cos_min": float(mean_cos.min()),
            "mean_cos_mean": float(mean_cos.mean()),
            "max_abs_pooled": float(np.abs(pooled_ref - pooled).max()),
            "max_abs_sequence": max_seq,
            "token_diffs": len(pairs) - len(same),
            "missing": len(reference.ids) - len(pairs)}


def _load_output(prefix: str):
    from pipeline.read_embeddings import load_embeddings
    from transforms.embedding_files import (EMBEDDINGS, PARQUET,
                                            output_patterns)
    return load_embeddings(output_patterns(prefix, PARQUET)[EMBEDDINGS])


def _remove_outputs(prefix: str) -> None:
    """Deletes a run's embedding files (hundreds of MiB per variant)."""
    directory = os.path.dirname(prefix)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith("emb") and os.path.isfile(path):
            os.remove(path)
        elif name.startswith("emb") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


# --- the run -----------------------------------------------------------------


def _ours_lines(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """XLA compile time and wall-time shares, for ours."""
    ours = results[REFERENCE]
    rest = (1 - ours["model_s"] / ours["wall_s"] - ours["tokenize_share"]
            - ours["write_share"])
    lines = [
        f"ours: XLA compiled {ours['xla_shapes']} batch shapes; their first "
        f"calls (compile + run) took {ours['xla_first_calls_s']:.1f} s of "
        f"the {ours['wall_s']:.1f} s",
        f"ours, share of wall time: model calls "
        f"{ours['model_s'] / ours['wall_s']:.1%}, tokenize "
        f"{ours['tokenize_share']:.1%}, write {ours['write_share']:.1%}, "
        f"rest (start-up, model load, Beam) "
        f"{rest:.1%}"]
    return lines


def _run_variant(runner: Runner, variant: Variant, corpus: str,
                 max_seq: int, tag: str, statuses: dict[str, Optional[str]]
                 ) -> Optional[dict[str, Any]]:
    """One variant's run, or None with its status set to the failure."""
    try:
        return runner.spawn(variant, corpus, max_seq, tag)
    except VariantFailed as err:
        statuses[variant.name] = f"failed: {err}"
        print(f"  {variant.name} failed: {err}")
        details = getattr(err, "details", "")
        if details:
            print("    " + details.replace("\n", "\n    "))
        return None


def orchestrate(args: argparse.Namespace) -> None:
    from model.runtime import cpu_flags, default_cache_dir
    os.makedirs(args.workdir, exist_ok=True)
    flags = cpu_flags() if args.cpu_flags is None else frozenset(
        args.cpu_flags.split(","))
    for line in machine_lines(flags):
        print(line)
    build = probe_build()
    print("build:    pipeline.run --engine "
          + (",".join(sorted(build.options["--engine"] or ["?"]))
             if build.accepts("--engine") else "absent")
          + ", --precision " + ",".join(sorted(
              build.options.get("--precision") or ["?"]))
          + ", model.quantize "
          + ("present" if build.has_quantize else "absent"),
          flush=True)
    args.model = args.model or ensure_bert_base(default_cache_dir(),
                                                args.init_std, args.seed + 1)
    _, vocab_note = bench_vocab()
    corpus_path = Path(args.corpus_file)
    texts, corpus_note = sample_corpus(corpus_path, args.docs, args.seed)
    corpus = os.path.join(args.workdir, "corpus.jsonl")
    write_jsonl(texts, corpus)
    weights_note = ("random normal(0, %g) weights" % args.init_std
                    if not args.model_given else "weights of --model")
    print(f"model:    {args.model}: BERT-Base shape L12 H768 A12, "
          f"{weights_note}, {vocab_note}")
    print(f"corpus:   {corpus_note}; max_seq_length {args.max_seq_length}, "
          f"batch_size {args.batch_size}, max_tokens_per_batch "
          f"{args.max_tokens_per_batch}", flush=True)

    selected = [BY_NAME[n] for n in args.variants]
    statuses = {v.name: unavailable(v, build, flags) for v in selected}
    runner = Runner(args, build)
    _prepare(runner, selected, statuses, corpus_path, args)
    gflops: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    measure_rooflines(build, flags, gflops, notes)
    runs: list[dict[str, Any]] = []
    accuracies: dict[str, dict[str, Any]] = {}
    reference = None
    for round_index in range(args.repeat):
        for variant in selected:
            if statuses[variant.name] or not runs_in_round(
                    variant.name, round_index, args.reference_once):
                continue
            measured = _run_variant(runner, variant, corpus,
                                    args.max_seq_length,
                                    f"r{round_index}", statuses)
            if measured is None:
                continue
            runs.append(measured)
            print(f"  round {round_index + 1}: {variant.name} "
                  f"{measured['wall_s']:.1f} s", flush=True)
            if variant.name == REFERENCE and reference is None:
                reference = _load_output(measured["output"])
            elif reference is not None and variant.name not in accuracies:
                accuracies[variant.name] = accuracy(
                    reference, _load_output(measured["output"]))
            if not args.keep_outputs and variant.name != REFERENCE:
                _remove_outputs(measured["output"])
    measure_rooflines(build, flags, gflops, notes)
    results = _best_runs(runs)
    _print_report(args, selected, results, statuses, gflops, notes,
                  accuracies, flags, texts)
    if not args.keep_outputs:
        for run in runs:
            _remove_outputs(run["output"])
    if not args.skip_rss_512:
        _rss_512(runner, args, build, flags)


def runs_in_round(name: str, round_index: int, reference_once: bool
                  ) -> bool:
    """Whether a variant runs in a round: every one in every round, but
    the float32 reference in the first only under ``--reference_once``
    (on a large corpus it takes longer than all the others together)."""
    return not (reference_once and round_index > 0 and name == REFERENCE)


def _prepare(runner: Runner, selected: Sequence[Variant],
             statuses: dict[str, Optional[str]], corpus_path: Path,
             args: argparse.Namespace) -> None:
    """The untimed preparation some variants need (the Hugging Face
    model, the int8 model); a failure there fails those variants only."""
    from model.runtime import default_cache_dir
    wanted = {v.kind for v in selected if not statuses[v.name]}
    if "hf" in wanted:
        try:
            cached = os.path.exists(os.path.join(
                default_cache_dir(), f"bench_hf_{model_key(args.model)}"))
            seconds = runner.prepare_hf()
            print(f"hf peer:  {runner.hf_model}: the SavedModel's weights as"
                  f" a transformers BertModel ("
                  + ("cached" if cached else f"converted in {seconds:.1f} s")
                  + ", not in the timings)")
        except VariantFailed as err:
            for v in selected:
                if v.kind == "hf" and not statuses[v.name]:
                    statuses[v.name] = f"failed: {err}"
    if any(v.precision == "int8" and not statuses[v.name] for v in selected):
        calibration = os.path.join(args.workdir, "calibration.jsonl")
        count = args.calibration_docs + max(1, args.calibration_docs // 2)
        write_jsonl(calibration_texts(corpus_path, count, args.seed,
                                      args.docs), calibration)
        try:
            seconds = runner.prepare_int8(calibration, args.calibration_docs)
            print(f"int8:     model.quantize on {args.calibration_docs} "
                  f"other documents: {runner.int8_model} ({seconds:.1f} s, "
                  f"not in the timings)")
        except VariantFailed as err:
            for v in selected:
                if v.precision == "int8" and not statuses[v.name]:
                    statuses[v.name] = f"failed: {err}"


def _print_report(args, selected, results, statuses, gflops, notes,
                  accuracies, flags, texts) -> None:
    measured = results.get(REFERENCE) or next(iter(results.values()), None)
    mean_length = (measured["tokens_real"] / max(measured["rows"], 1)
                   if measured else 64.0)
    limits = roofline_tokens(gflops, mean_length)
    print(f"median real tokens/doc: {_median_tokens(texts, args):.0f}, "
          f"mean {mean_length:.1f}; best of {args.repeat} run(s) per variant"
          + (f" ({REFERENCE}: one)" if args.reference_once
             and args.repeat > 1 else ""))
    print()
    unmeasurable = {p: _CPU_NEEDS[p] for p in ("bfloat16", "int8")
                    if not roofline.precision_measurable(p, flags)}
    for line in report.format_rooflines(gflops, limits,
                                        flops_per_token(mean_length) / 1e6,
                                        unmeasurable) + notes:
        print(line)
    print()
    rows = table_rows(selected, results, statuses, limits, flags)
    for line in report.format_table(rows):
        print(line)
    print()
    for line in report.format_ratios(rows):
        print(line)
    for line in report.format_non_amx(rows, flags):
        print(line)
    if REFERENCE in results:
        for line in _ours_lines(results):
            print(line)
    print()
    print(f"accuracy against {REFERENCE} (TensorFlow float32), on the "
          f"embeddings each variant wrote, matched by document id:")
    labels = {v.name: v.label for v in selected}
    for line in report.format_accuracy(accuracies, labels,
                                       ACCURACY_MIN_DOCS):
        print(line)
    png = args.png or os.path.join(args.workdir, "throughput.png")
    from model.runtime import cpu_model_name
    report.write_chart(rows, limits, f"bench.throughput: {cpu_model_name()}"
                       f", {args.docs} docs, max_seq_length "
                       f"{args.max_seq_length}", png)
    table = os.path.join(args.workdir, "throughput.json")
    with open(table, "w", encoding="utf-8") as handle:
        json.dump({"rows": [dataclasses.asdict(r) for r in rows],
                   "rooflines_tokens_per_s": limits, "gflops": gflops,
                   "accuracy": accuracies, "results": results}, handle,
                  indent=1, default=str)
    print(f"chart: {png}; table: {table}")


def _rss_512(runner: Runner, args: argparse.Namespace, build: Build,
             flags: frozenset[str]) -> None:
    """Peak RSS at max_seq_length 512, sequence output on, per engine."""
    long_texts, long_note = sample_corpus(Path(args.long_corpus_file),
                                          args.long_docs, args.seed,
                                          longest=True)
    long_corpus = os.path.join(args.workdir, "long.jsonl")
    write_jsonl(long_texts, long_corpus)
    print(f"max_seq_length 512, sequence output on, {long_note}:")
    statuses: dict[str, Optional[str]] = {}
    for name in args.rss_variants:
        variant = BY_NAME[name]
        status = unavailable(variant, build, flags)
        if variant.precision == "int8" and runner.int8_model is None:
            status = status or "no int8 model was made in this run"
        if not status and variant.kind == "hf" and runner.hf_model is None:
            try:
                runner.prepare_hf()
            except VariantFailed as err:
                status = f"failed: {err}"
        if status:
            print(f"  {variant.label}: {status}")
            continue
        measured = _run_variant(runner, variant, long_corpus, 512, "",
                                statuses)
        if measured is None:
            continue
        print(f"  {variant.label}: peak RSS {measured['peak_rss_mib']:.0f} "
              f"MiB, {measured['tokens_real'] / measured['wall_s']:.1f} real "
              f"tokens/s end to end")
        if not args.keep_outputs:
            _remove_outputs(measured["output"])


def _median_tokens(texts: list[str], args) -> float:
    from transforms.tokenization import BertWordPieceTokenizer
    vocab, _ = bench_vocab()
    tokenizer = BertWordPieceTokenizer(vocab)
    return float(np.median([tokenizer.encode(t, args.max_seq_length)
                            .num_tokens for t in texts]))


def _variant_list(value: str) -> list[str]:
    if value == "all":
        return [v.name for v in VARIANTS]
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = sorted(set(names) - set(BY_NAME))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown variants {unknown}; known: {', '.join(BY_NAME)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=2048,
                        help="documents sampled from --corpus_file")
    parser.add_argument("--corpus_file", default=str(REAL_CORPUS),
                        help="JSONL corpus with a text field (default: the "
                             "real zh_public_domain.jsonl; generated text "
                             "where absent)")
    parser.add_argument("--long_corpus_file", default=str(LONG_CORPUS),
                        help="JSONL corpus of the 512-token RSS check")
    parser.add_argument("--long_docs", type=int, default=128,
                        help="longest documents of --long_corpus_file for "
                             "the RSS check at max_seq_length 512")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_tokens_per_batch", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init_std", type=float, default=0.02,
                        help="std of the random normal weights (BERT's "
                             "initialisation scale); ignored with --model")
    parser.add_argument("--calibration_docs", type=int, default=200,
                        help="documents (not benchmarked) model.quantize "
                             "calibrates int8 on (and half as many others "
                             "it checks the int8 model's accuracy on)")
    parser.add_argument("--variants", type=_variant_list,
                        default=[v.name for v in VARIANTS if v.default],
                        help="comma-separated subset of "
                             f"{','.join(BY_NAME)}, or all (default: all "
                             "but ours_noxla; ours, the accuracy "
                             "reference, is always run)")
    parser.add_argument("--rss_variants", type=_variant_list,
                        default=list(DEFAULT_RSS_VARIANTS),
                        help="variants of the 512-token peak RSS check")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of runs of the variants; the best wall"
                             " time per variant is reported")
    parser.add_argument("--model", default=None,
                        help="SavedModel (default: BERT-Base, random)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--png", default=None,
                        help="chart path (default: <workdir>/throughput.png)")
    parser.add_argument("--keep_outputs", action="store_true",
                        help="keep every variant's embeddings in --workdir")
    parser.add_argument("--skip_rss_512", action="store_true")
    parser.add_argument("--reference_once", action="store_true",
                        help="run the float32 reference (ours) in the "
                        "first round only: its outputs are the accuracy "
                        "reference, and its time is one round's, not the "
                        "best of --repeat")
    parser.add_argument("--worker_timeout", type=float, default=1800,
                        help="seconds before a variant's process counts as "
                             "failed")
    parser.add_argument("--cpu_flags", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=list(BY_NAME), default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    args.model_given = args.model is not None
    args.variants = [REFERENCE] + [v for v in dict.fromkeys(args.variants)
                                   if v != REFERENCE]
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_tp_")
    orchestrate(args)


if __name__ == "__main__":
    main()
