"""Entry point: ``python -m pipeline.run --input ... --output ... [--model]``.

The launcher resolves everything the workers need before the pipeline
starts (model directory, vocabulary, ``do_lower_case``, hidden size), so a
wrong flag fails in seconds with one clear line instead of on a worker; it
then runs the pipeline, waits, and prints and writes the run summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from model.load import (ModelFormatError, infer_hidden_size, probe_model,
                        tokenizer_settings_with_overrides)
from pipeline.graph import JobConfig, build_pipeline
from pipeline.options import EmbedOptions
from pipeline.summary import (RunSummary, collect_counts, list_outputs,
                              write_summary)
from transforms.read import check_patterns_match
from transforms.tokenization import load_vocab
from transforms.write import output_patterns

_LOG = logging.getLogger("pipeline.run")

DEMO_WARNING = (
    "WARNING: no --model given: using the built-in DEMO model with RANDOM "
    "weights. Its vectors are meaningless; pass --model "
    "/path/to/bert_zh_L-12_H-768_A-12 for real embeddings.")


class UsageError(ValueError):
    """A flag is missing or inconsistent."""


def read_analysis_boundaries(path: str) -> Optional[list[int]]:
    """The recommended bucket boundaries of a ``pipeline.analyze`` report."""
    from apache_beam.io.filesystems import FileSystems
    try:
        with FileSystems.open(path) as handle:
            report = json.loads(handle.read().decode("utf-8"))
        bounds = report["recommended_bucket_boundaries"]
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"--analysis {path}: not a readable analysis "
                         f"report ({type(err).__name__}: {err})") from err
    return list(bounds) or None


def resolve_config(options: EmbedOptions) -> tuple[JobConfig, bool]:
    """Turns flags into a ``JobConfig``; also says if the demo model is used.

    Raises ``UsageError``, ``FileNotFoundError`` or ``ModelFormatError``
    with a one-line message when something is wrong.
    """
    if not options.input:
        raise UsageError("--input is required (a file or glob)")
    if not options.output:
        raise UsageError("--output is required (an output prefix)")
    if options.max_seq_length < 3:
        raise UsageError("--max_seq_length must be at least 3")
    if options.long_text != "chunk" and (options.document_vectors
                                         or options.chunk_stride):
        raise UsageError("--document_vectors and --chunk_stride need "
                         "--long_text chunk")
    if options.chunk_stride and options.chunk_stride > \
            options.max_seq_length - 2:
        raise UsageError("--chunk_stride must be at most max_seq_length - 2 "
                         "(chunks must not skip tokens)")
    if options.document_vectors and "pooled" not in options.outputs:
        raise UsageError("--document_vectors needs pooled in --outputs")
    check_patterns_match(options.input)
    boundaries = options.bucket_boundaries
    if boundaries is None and options.analysis:
        boundaries = read_analysis_boundaries(options.analysis)
    demo = options.model is None
    if demo:
        from model.demo import ensure_demo_model
        model_dir = ensure_demo_model()
    else:
        model_dir = options.model
    overrides = {"auto": None, "true": True, "false": False}
    settings = tokenizer_settings_with_overrides(
        model_dir, options.vocab_file, overrides[options.do_lower_case])
    vocab = load_vocab(settings.vocab_path)
    probed = probe_model(model_dir)
    hidden_size = infer_hidden_size(model_dir, len(vocab))
    if probed != hidden_size:
        raise ModelFormatError(
            f"{model_dir}: the model returns {probed}-wide vectors but its "
            f"word-embedding table is {hidden_size} wide")
    config = JobConfig(
        inputs=list(options.input), output=options.output,
        model_dir=model_dir, vocab=vocab,
        do_lower_case=settings.do_lower_case, hidden_size=hidden_size,
        input_format=options.input_format, id_field=options.id_field,
        text_field=options.text_field,
        output_format=options.output_format,
        max_seq_length=options.max_seq_length,
        batch_size=options.batch_size,
        max_tokens_per_batch=options.max_tokens_per_batch,
        bucket_boundaries=boundaries,
        outputs=tuple(options.outputs),
        num_shards=options.num_shards, long_text=options.long_text,
        chunk_stride=options.chunk_stride,
        document_vectors=options.document_vectors,
        precision=options.precision,
        intra_op_threads=options.tf_intra_op_threads or None,
        inter_op_threads=options.tf_inter_op_threads or None)
    return config, demo


def run(argv: Optional[Sequence[str]] = None) -> RunSummary:
    """Runs the job and returns its summary (also printed and written)."""
    pipeline_options = PipelineOptions(argv)
    config, demo = resolve_config(pipeline_options.view_as(EmbedOptions))
    if demo:
        print(DEMO_WARNING, file=sys.stderr)
    started = time.perf_counter()
    pipeline = beam.Pipeline(options=pipeline_options)
    build_pipeline(pipeline, config)
    result = pipeline.run()
    result.wait_until_finish()
    elapsed = time.perf_counter() - started
    counts, loads = collect_counts(result)
    summary = RunSummary(
        counts=counts, model_loads=loads, elapsed_seconds=round(elapsed, 3),
        model_dir=config.model_dir, demo_model=demo,
        outputs=list_outputs(output_patterns(config.output,
                                             config.output_format)))
    summary_path = config.output + "-summary.json"
    write_summary(summary, summary_path)
    print(summary.format())
    print(f"summary:            {summary_path}")
    if demo:
        print(DEMO_WARNING, file=sys.stderr)
    return summary


def print_help() -> None:
    """``--help``: our flags, and a pointer to Beam's own."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.run",
        description="Embed Chinese text with BERT on Apache Beam: read -> "
                    "tokenize -> batch -> infer -> write.",
        epilog="Apache Beam's pipeline options pass through as well, e.g. "
               "--runner DirectRunner|DataflowRunner, --direct_num_workers N, "
               "--direct_running_mode multi_threading|multi_processing, "
               "--setup_file ./setup.py, --project, --region, "
               "--temp_location. See the README.")
    EmbedOptions._add_argparse_args(parser)  # pylint: disable=protected-access
    parser.print_help()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI wrapper: exit 0 on success, 2 on bad usage, 1 on failure."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print_help()
        return 0
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: "
                               "%(message)s")
    for ours in ("pipeline", "model", "transforms"):
        logging.getLogger(ours).setLevel(logging.INFO)
    try:
        summary = run(args)
    except (UsageError, FileNotFoundError, ModelFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if summary.reconciled else 1


if __name__ == "__main__":
    sys.exit(main())
