"""End-to-end embedding throughput: ours vs the Beam baselines, side by side.

    python -m bench.throughput [--docs 512] [--max_seq_length 128]

Runs five pipelines over the same corpus and the same BERT-Base-shaped model
(L12 H768 A12, vocab 21128, random weights), each in its own process so
that peak RSS is per pipeline, one after the other:

1. baseline: what a Beam user writes first: ``RunInference`` with
   ``TFModelHandlerTensor``, inputs padded to ``max_seq_length``, default
   batching;
2. peer: the same ``RunInference`` with Beam's own length-aware batching
   (``batch_length_fn`` + ``batch_bucket_boundaries``) and padding per
   batch;
3. ours without XLA: ``pipeline.graph.build_pipeline`` with ``--xla off``
   (what XLA adds, side by side);
4. ours: ``pipeline.graph.build_pipeline`` as a run gets it by default,
   starting from an empty XLA compile cache;
5. ours_rerun: ours again, loading the XLA executables that run 4 saved
   (a scheduled job's next run).

All of them read the same JSONL, tokenize with the same DoFn and write pooled
and sequence outputs with the same Parquet writer, so they differ only in
batching and inference.  It prints documents/s, real tokens/s, the padding
share of computed tokens, peak RSS, the ratios ours/baseline and ours/peer,
and the roofline ratio: our real tokens/s over the matmul-bound limit
(the best float32 matmul rate measured, TensorFlow's or XLA's, over the
model's FLOPs per token).  It also reports how
much of our wall time tokenizing and writing take, and our peak RSS at
``max_seq_length`` 512 with sequence output on.

Corpus: ``../shared/assets/corpus/zh_public_domain.jsonl`` (real Chinese,
median ~46 tokens) when present, else a generated one with a log-normal
length spread.  The model uses the real Chinese BERT vocab when present.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from bench import beam_baselines

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
REAL_VOCAB = ASSETS / "bert_zh" / "vocab.txt"
REAL_CORPUS = ASSETS / "corpus" / "zh_public_domain.jsonl"
LONG_CORPUS = ASSETS / "corpus" / "clue_news_web_sample.jsonl"

BASE_VOCAB_SIZE = 21128
VARIANTS = ("baseline", "peer", "ours_noxla", "ours", "ours_rerun")


# --- setup: model and corpus -------------------------------------------------


def bench_vocab() -> tuple[list[str], str]:
    """The real Chinese BERT vocab, else the demo vocab cut to 21,128."""
    from transforms.tokenization import load_vocab
    if REAL_VOCAB.exists():
        return load_vocab(str(REAL_VOCAB)), "real Chinese BERT vocab"
    from model.demo import demo_vocab
    return demo_vocab()[:BASE_VOCAB_SIZE], "generated vocab (assets absent)"


def ensure_bert_base(cache_dir: str) -> str:
    """A BERT-Base-shaped SavedModel with random weights, built once."""
    from model.bert import BertConfig
    from model.export import export_bert_saved_model
    path = os.path.join(cache_dir, "bench_bert_base_L12_H768_random_v1")
    if not os.path.exists(os.path.join(path, "saved_model.pb")):
        vocab, _ = bench_vocab()
        export_bert_saved_model(path, BertConfig(vocab_size=len(vocab)), vocab,
                                seed=1)
    return path


def generated_texts(count: int, seed: int) -> list[str]:
    """Chinese-like texts with a log-normal length spread (median ~44)."""
    rng = np.random.default_rng(seed)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)] + list("，。！？")
    lengths = np.clip(rng.lognormal(np.log(44), 0.9, count), 2, 2000)
    return ["".join(rng.choice(chars, int(n))) for n in lengths]


def sample_corpus(path: Path, count: int, seed: int,
                  longest: bool = False) -> tuple[list[str], str]:
    """``count`` texts from a JSONL corpus (random, or the longest)."""
    if not path.exists():
        return generated_texts(count, seed), "generated (assets absent)"
    texts = [json.loads(line)["text"] for line in path.open(encoding="utf-8")]
    if longest:
        chosen = sorted(texts, key=len, reverse=True)[:count]
    else:
        rng = np.random.default_rng(seed)
        chosen = [texts[i] for i in rng.choice(len(texts), count,
                                               replace=False)]
    return chosen, f"{path.name} ({'longest' if longest else 'random'} " \
                   f"{count} of {len(texts)})"


def write_jsonl(texts: Iterable[str], path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": f"d{i:06d}", "text": text},
                                    ensure_ascii=False) + "\n")


def matmul_gflops(windows: int = 5, seconds: float = 0.6) -> float:
    """Float32 matmul rate of this machine, in GFLOP/s.

    A BERT-shaped product ([2048, 768] x [768, 3072]) timed over several
    short windows, both with TensorFlow's own kernel (oneDNN) and compiled
    by XLA (whose CPU matmul measured a few per cent faster here); the best
    window of either counts, so that noise from other work on the machine
    lowers the limit less (a higher limit is the stricter one).
    """
    import tensorflow as tf
    a = tf.random.normal([2048, 768])
    b = tf.random.normal([768, 3072])
    best = 0.0
    for matmul in (tf.matmul, tf.function(tf.matmul, jit_compile=True)):
        matmul(a, b).numpy()
        for _ in range(windows):
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                matmul(a, b).numpy()
                count += 1
            elapsed = time.perf_counter() - started
            best = max(best, count * 2 * 2048 * 768 * 3072 / elapsed / 1e9)
    return best


def flops_per_token(mean_padded_length: float, layers: int = 12,
                    hidden: int = 768, intermediate: int = 3072) -> float:
    """Forward FLOPs per token of a BERT encoder.

    Dense layers: 2 x (4 H^2 + 2 H I) per layer; attention scores and
    weighted sum: 2 x 2 x S x H per layer for a sequence of length S.
    """
    dense = 2 * (4 * hidden * hidden + 2 * hidden * intermediate)
    attention = 4 * mean_padded_length * hidden
    return layers * (dense + attention)


# --- one pipeline, inside a worker process ----------------------------------


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Runs one variant's pipeline and returns its measurements."""
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions
    from pipeline.graph import JobConfig, build_pipeline
    from transforms.tokenization import load_vocab
    from model.load import compile_stats, read_tokenizer_settings
    vocab = load_vocab(read_tokenizer_settings(args.model).vocab_path)
    out = os.path.join(args.workdir, args.worker, "emb")
    pipeline = beam.Pipeline(options=PipelineOptions(["--runner",
                                                      "DirectRunner"]))
    ours = args.worker.startswith("ours")
    if ours:
        build_pipeline(pipeline, JobConfig(
            inputs=[args.corpus], output=out, model_dir=args.model,
            vocab=vocab, do_lower_case=True, hidden_size=768,
            max_seq_length=args.max_seq_length, batch_size=args.batch_size,
            max_tokens_per_batch=args.max_tokens_per_batch,
            jit_compile=args.worker != "ours_noxla",
            xla_cache_dir=args.xla_cache_dir))
    else:
        beam_baselines.build_beam_variant(pipeline, args.worker, args.corpus, out,
                           args.model, vocab, args.max_seq_length,
                           args.batch_size)
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
    measured = {
        "variant": args.worker, "wall_s": wall, "model_s": model_us / 1e6,
        "documents": counters.get("documents_read", 0)
        - counters.get("documents_skipped_empty", 0),
        "peak_rss_mib": resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens_computed": (counters.get("tokens_computed", 0) if ours
                            else beam_baselines.COMPUTED_TOKENS[0]),
        "xla_shapes": compile_stats().shapes,
        "xla_first_calls_s": compile_stats().first_call_seconds,
        "xla_first_calls_tokens": compile_stats().first_call_tokens,
    }
    measured.update(_real_tokens_and_stages(args, vocab, out, wall))
    return measured


def _real_tokens_and_stages(args, vocab: list[str], out: str,
                            wall: float) -> dict[str, Any]:
    """Real tokens written, and (for ours) tokenizer and writer time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pipeline.read_embeddings import load_embeddings
    from transforms.records import DocumentEmbedding
    from transforms.tokenization import BertWordPieceTokenizer
    from transforms.write import embedding_schema, to_record_batch
    emb = load_embeddings(out + "-*-of-*.parquet")
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


# --- orchestration ------------------------------------------------------------


def _spawn(args: argparse.Namespace, variant: str, corpus: str,
           max_seq: int, tag: str = "") -> dict[str, Any]:
    """Runs ``variant`` in a worker process.  ``ours`` starts from an empty
    XLA compile cache; ``ours_rerun`` runs the same job again with the
    cache that ``ours`` (same ``tag``) left, as a scheduled re-run would."""
    command = [sys.executable, "-m", "bench.throughput", "--worker", variant,
               "--corpus", corpus, "--model", args.model, "--workdir",
               os.path.join(args.workdir, f"{variant}-{max_seq}{tag}"),
               "--max_seq_length", str(max_seq), "--batch_size",
               str(args.batch_size), "--max_tokens_per_batch",
               str(args.max_tokens_per_batch), "--xla_cache_dir",
               os.path.join(args.workdir, f"xla-cache-{max_seq}{tag}")]
    return run_worker_process(command, variant)


def run_worker_process(command: list[str], label: str) -> dict[str, Any]:
    """Runs a benchmark worker in its own process; returns the JSON object
    it prints last (its measurements)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _machine() -> str:
    from model.runtime import cpu_model_name
    return (f"{cpu_model_name()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}")


def _best_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant, the run with the shortest wall time (noise only slows)."""
    best: dict[str, dict[str, Any]] = {}
    for run in runs:
        name = run["variant"]
        if name not in best or run["wall_s"] < best[name]["wall_s"]:
            best[name] = run
    return best


def _report(results: dict[str, dict[str, Any]], gflops: float,
            mean_padded: float) -> list[str]:
    lines = [f"{'variant':<10} {'docs/s':>8} {'real tok/s':>11} "
             f"{'padding':>8} {'peak RSS':>10} {'wall s':>8}"]
    names = [n for n in VARIANTS if n in results]
    for name in names:
        r = results[name]
        padding = 1 - r["tokens_real"] / r["tokens_computed"]
        lines.append(f"{name:<10} {r['documents'] / r['wall_s']:>8.2f} "
                     f"{r['tokens_real'] / r['wall_s']:>11.1f} "
                     f"{padding:>8.1%} {r['peak_rss_mib']:>7.0f} MiB "
                     f"{r['wall_s']:>8.1f}")
    rate = {n: results[n]["tokens_real"] / results[n]["wall_s"]
            for n in names}
    roofline = gflops * 1e9 / flops_per_token(mean_padded)
    ours = results["ours"]
    in_model = ours["tokens_real"] / ours["model_s"]
    real_share = ours["tokens_real"] / ours["tokens_computed"]
    steady = real_share * (
        (ours["tokens_computed"] - ours["xla_first_calls_tokens"])
        / max(1e-9, ours["model_s"] - ours["xla_first_calls_s"]))
    lines += [
        "   ".join(f"ours / {n}: {rate['ours'] / rate[n]:.2f}x"
                   for n in names if n not in ("ours", "ours_rerun"))
        + "  (real tokens/s, end to end)",
        f"ours: XLA compiled {ours['xla_shapes']} batch shapes; their first "
        f"calls (compile + run) took {ours['xla_first_calls_s']:.1f} s of "
        f"the {ours['wall_s']:.1f} s",
        f"roofline: matmul {gflops:.1f} GFLOP/s, "
        f"{flops_per_token(mean_padded) / 1e6:.1f} MFLOP/token -> "
        f"{roofline:.0f} tokens/s; ours end to end = "
        f"{rate['ours'] / roofline:.1%} of it, ours in model calls "
        f"({in_model:.0f} real tokens/s) = {in_model / roofline:.1%}, "
        f"ours in model calls after each shape's first "
        f"({steady:.0f} real tokens/s) = {steady / roofline:.1%}",
        f"ours, share of wall time: model calls "
        f"{ours['model_s'] / ours['wall_s']:.1%}, tokenize "
        f"{ours['tokenize_share']:.1%}, write {ours['write_share']:.1%}, "
        f"rest (start-up, model load, Beam) "
        f"{1 - ours['model_s'] / ours['wall_s'] - ours['tokenize_share'] - ours['write_share']:.1%}",
    ]
    if "ours_rerun" in results:
        rerun = results["ours_rerun"]
        lines.append(
            f"ours_rerun (the same job again, XLA executables loaded from "
            f"the cache ours saved): {rate['ours_rerun'] / rate['ours']:.2f}x"
            f" ours; first calls of its {rerun['xla_shapes']} shapes "
            f"{rerun['xla_first_calls_s']:.1f} s (ours "
            f"{ours['xla_first_calls_s']:.1f} s); end to end = "
            f"{rate['ours_rerun'] / roofline:.1%} of the roofline")
    return lines


def orchestrate(args: argparse.Namespace) -> None:
    os.makedirs(args.workdir, exist_ok=True)
    from model.demo import default_cache_dir
    args.model = args.model or ensure_bert_base(default_cache_dir())
    _, vocab_note = bench_vocab()
    texts, corpus_note = sample_corpus(REAL_CORPUS, args.docs, args.seed)
    corpus = os.path.join(args.workdir, "corpus.jsonl")
    write_jsonl(texts, corpus)
    print(f"machine: {_machine()}")
    print(f"model:   BERT-Base shape L12 H768 A12, random weights, "
          f"{vocab_note}")
    print(f"corpus:  {corpus_note}; max_seq_length {args.max_seq_length}, "
          f"batch_size {args.batch_size}, max_tokens_per_batch "
          f"{args.max_tokens_per_batch}", flush=True)
    gflops = [matmul_gflops()]
    runs = []
    for round_index in range(args.repeat):
        for variant in args.variants:
            runs.append(_spawn(args, variant, corpus, args.max_seq_length,
                               f"r{round_index}"))
            print(f"  round {round_index + 1}: {variant} "
                  f"{runs[-1]['wall_s']:.1f} s", flush=True)
            gflops.append(matmul_gflops())
    results = _best_runs(runs)
    ours = results["ours"]
    lengths = ours["tokens_real"] / ours["rows"]
    padded = lengths / max(1e-9, ours["tokens_real"] / ours["tokens_computed"])
    print(f"median real tokens/doc: {_median_tokens(texts, args):.0f}; "
          f"matmul rate samples: "
          + " ".join(f"{g:.1f}" for g in gflops) + " GFLOP/s (best used); "
          f"best of {args.repeat} run(s) per variant")
    for line in _report(results, max(gflops), padded):
        print(line)
    if not args.skip_rss_512:
        long_texts, long_note = sample_corpus(LONG_CORPUS, args.long_docs,
                                              args.seed, longest=True)
        long_corpus = os.path.join(args.workdir, "long.jsonl")
        write_jsonl(long_texts, long_corpus)
        r = _spawn(args, "ours", long_corpus, 512)
        print(f"ours at max_seq_length 512, sequence output on, "
              f"{long_note}: peak RSS {r['peak_rss_mib']:.0f} MiB, "
              f"{r['tokens_real'] / r['wall_s']:.1f} real tokens/s")


def _median_tokens(texts: list[str], args) -> float:
    from transforms.tokenization import BertWordPieceTokenizer
    vocab, _ = bench_vocab()
    tokenizer = BertWordPieceTokenizer(vocab)
    return float(np.median([tokenizer.encode(t, args.max_seq_length)
                            .num_tokens for t in texts]))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=512)
    parser.add_argument("--long_docs", type=int, default=256)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_tokens_per_batch", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", type=lambda v: v.split(","),
                        default=list(VARIANTS),
                        help="comma-separated subset of "
                             f"{','.join(VARIANTS)} (ours is always run)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of the runs of every variant; best "
                             "wall time per variant is reported")
    parser.add_argument("--model", default=None,
                        help="SavedModel (default: BERT-Base, random)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--skip_rss_512", action="store_true")
    parser.add_argument("--worker", choices=VARIANTS, default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--xla_cache_dir", default="none",
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {sorted(unknown)}")
    args.variants = [v for v in VARIANTS if v in args.variants or v == "ours"]
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_tp_")
    if args.worker:
        print(json.dumps(run_worker(args)))
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
