"""Entry point: ``python -m pipeline.run --input ... --output ... [--model]``.

The launcher resolves everything the workers need before the pipeline
starts (model directory, vocabulary, ``do_lower_case``, hidden size, model
fingerprint, previous index), so a wrong flag fails in seconds with one
clear line instead of on a worker.  It then runs the pipeline into a staging
directory, waits, checks the counts (they must reconcile, and the error rate
must be within ``--max_error_rate``), and only then publishes the files
under their final names, the summary, and the manifest last (see
``pipeline.publish``).

Exit codes: 0 success, 1 the run failed (the pipeline raised, publishing
broke off, or the counts do not reconcile), 2 bad usage (an unknown flag
too), 3 documents failed: the error rate exceeded ``--max_error_rate``, or
no document was embedded and some failed, 4 another run holds the output's
lock (``pipeline.lock``), 130 interrupted (Ctrl-C).  Nothing is published
unless the exit code is 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from typing import Any, Optional, Sequence

from pipeline.cli import (DefaultsHelpFormatter, UsageError,
                          check_known_flags, exit_on_interrupt,
                          interrupts_deferred, live_progress, setup_console,
                          wants_help, wants_verbose)

if __name__ == "__main__":
    # Before the slow imports below: Ctrl-C while they load ends quietly too.
    exit_on_interrupt()

# pylint: disable=wrong-import-position
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from model import engines
from model.errors import ModelFormatError
from model.handles import resolve_model_path
from model.load import probe_model
from model.variables import check_max_seq_length, infer_hidden_size
from model.vocab import load_vocab, tokenizer_settings_with_overrides
from pipeline.embed import check_model_pooling
from transforms.pooling import needs_layers
from model.files import file_sha256
from pipeline.fingerprint import model_fingerprint, precision_key
from pipeline.graph import JobConfig, build_pipeline
from pipeline.finish import RunFailed, StagedRun, failure_of, utc_now
from pipeline.manifest import (FAILED, ManifestError, PreviousIndex,
                               find_previous, load_previous)
from pipeline.options import EmbedOptions, lower_case_override
from transforms.batch import check_bucket_boundaries
from transforms.embedding_files import staging_prefix
from pipeline.lock import OutputLock, OutputLocked, OutputNotWritable
from pipeline.publish import check_output_prefix, clean_stale, new_run_id
from pipeline.worker_pool import check_environment
from pipeline.summary import (COUNTERS, RunSummary, collect_counts,
                              duplicate_id_sample, most_common_reason)
from transforms.read import check_patterns_match
from transforms.sources import is_compressed

_LOG = logging.getLogger("pipeline.run")

DEMO_WARNING = (
    "WARNING: no --model given: using the built-in DEMO model with RANDOM "
    "weights. Its vectors are meaningless; pass --model "
    "/path/to/bert_zh_L-12_H-768_A-12 for real embeddings.")


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERROR_RATE = 0, 1, 2, 3
EXIT_LOCKED = 4  # another run is writing the same --output


@dataclasses.dataclass(frozen=True)
class ResolvedJob:
    """The launcher's view of a job: its config, whether the demo model is
    used, and the previous index it builds on."""
    config: JobConfig
    demo: bool
    previous: Optional[PreviousIndex] = None


def read_analysis_boundaries(path: str) -> Optional[list[int]]:
    """The recommended bucket boundaries of a ``pipeline.analyze`` report."""
    from apache_beam.io.filesystems import FileSystems
    try:
        with FileSystems.open(path) as handle:
            report = json.loads(handle.read().decode("utf-8"))
        bounds = report["recommended_bucket_boundaries"]
        return check_bucket_boundaries(bounds) if bounds else None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--analysis {path}: not a readable analysis "
                         f"report ({type(err).__name__}: {err})") from err


def _check_flags(options: EmbedOptions) -> None:
    """Raises ``UsageError`` for missing or inconsistent flags."""
    if not options.input:
        raise UsageError("--input is required (a file or glob)")
    if not options.output:
        raise UsageError("--output is required (an output prefix)")
    try:
        check_output_prefix(options.output)
    except ValueError as err:
        raise UsageError(str(err)) from err
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
    if (options.pooling != "cls" or options.normalize) and \
            "pooled" not in options.outputs:
        raise UsageError("--pooling and --normalize make the pooled vector: "
                         "they need pooled in --outputs")


def input_size(patterns: Sequence[str]) -> Optional[int]:
    """Total bytes of the input files, or None when some are compressed
    (their decompressed size, which progress counts, is unknown)."""
    files = check_patterns_match(patterns)
    if any(is_compressed(f.path) for f in files):
        return None
    return sum(f.size_in_bytes for f in files)


def _check_remote_paths(options: EmbedOptions) -> None:
    """On Dataflow the workers cannot see this machine's files: the model,
    inputs and output must be cloud paths, and the demo model (built in a
    local cache) cannot be used."""
    from apache_beam.options.pipeline_options import (StandardOptions,
                                                      TestOptions)
    runner = str(options.view_as(StandardOptions).runner or "")
    dry_run = str(options.view_as(TestOptions).dry_run).lower() == "true"
    if "dataflow" not in runner.lower() or dry_run:
        return  # a dry run submits nothing: local files are fine there
    if options.model is None:
        raise UsageError("--runner DataflowRunner needs --model (a gs:// "
                         "SavedModel): the demo model lives on this machine")
    if options.precision == "int8" and not options.int8_model:
        raise UsageError("--runner DataflowRunner with --precision int8 "
                         "needs --int8_model (a gs:// directory): the "
                         "quantize cache lives on this machine")
    local = [f"{flag} {path}" for flag, paths in (
        ("--model", [options.model]), ("--input", options.input),
        ("--output", [options.output]),
        ("--int8_model", [options.int8_model] if options.int8_model
         else [])) for path in paths
        if "://" not in path]
    if local:
        raise UsageError("Dataflow workers cannot read local paths: "
                         + ", ".join(local) + " (use gs://...)")


def _workers_hint(options: EmbedOptions) -> int:
    """Worker processes the job will likely have (``--direct_num_workers``,
    Dataflow's ``--num_workers`` or ``--max_num_workers``; else 1)."""
    from apache_beam.options.pipeline_options import (DirectOptions,
                                                      WorkerOptions)
    workers = options.view_as(WorkerOptions)
    counts = [options.view_as(DirectOptions).direct_num_workers,
              workers.num_workers, workers.max_num_workers]
    return max([int(c) for c in counts if c] or [1])


def _plan_engine(options: EmbedOptions, total_bytes: Optional[int]
                 ) -> tuple[bool, str, "engines.EngineChoice"]:
    """Checks ``--engine``/``--precision``/``--int8_model`` (UsageError for
    a combination that cannot run) and decides ``--xla`` for the job:
    returns (XLA on, why, the engine and precision ``auto`` picks on this
    machine, which stands in for the workers')."""
    if options.int8_model and options.precision != "int8":
        raise UsageError("--int8_model needs --precision int8")
    if needs_layers(options.pooling) and options.engine == engines.OPENVINO:
        raise UsageError(f"--pooling {options.pooling} needs the model's "
                         "encoder_outputs, which only --engine tensorflow "
                         "returns")
    try:
        planned = engines.choose_engine(options.engine, options.precision,
                                        engines.detect_hardware())
        jit_compile, why = engines.decide_xla(
            options.xla, planned, total_bytes, _workers_hint(options))
        return jit_compile, why, planned
    except engines.EngineError as err:
        raise UsageError(str(err)) from err


def resolve_job(options: EmbedOptions, run_id: str = "") -> ResolvedJob:
    """Turns flags into a ``ResolvedJob`` (with ``run_id``, or a new one).

    Raises ``UsageError``, ``FileNotFoundError``, ``ModelFormatError`` or
    ``ManifestError`` with a one-line message when something is wrong.
    """
    _check_flags(options)
    _check_remote_paths(options)
    check_environment(options, options.worker_connect_timeout)
    total_bytes = input_size(options.input)
    jit_compile, why, planned = _plan_engine(options, total_bytes)
    _LOG.info("XLA %s (%s)", "on" if jit_compile else "off", why)
    boundaries = options.bucket_boundaries
    if boundaries is None and options.analysis:
        boundaries = read_analysis_boundaries(options.analysis)
    demo = options.model is None
    if demo:
        from model.demo import ensure_demo_model
        model_dir = ensure_demo_model()
    else:
        model_dir = options.model
    # Before any work: a longer setting fails every longer document.
    check_max_seq_length(model_dir, options.max_seq_length)
    settings = tokenizer_settings_with_overrides(
        model_dir, options.vocab_file, lower_case_override(options))
    vocab = load_vocab(settings.vocab_path)
    check_model_pooling(model_dir, options.pooling)
    precision = precision_key(options.precision, resolve_model_path(model_dir),
                              options.int8_model)
    probed = probe_model(model_dir)
    hidden_size = infer_hidden_size(model_dir, len(vocab))
    if probed != hidden_size:
        raise ModelFormatError(
            f"{model_dir}: the model returns {probed}-wide vectors but its "
            f"word-embedding table is {hidden_size} wide")
    stride = (options.chunk_stride or options.max_seq_length - 2
              if options.long_text == "chunk" else None)
    config = JobConfig(
        inputs=list(options.input), output=options.output,
        model_dir=model_dir, vocab=vocab,
        do_lower_case=settings.do_lower_case, hidden_size=hidden_size,
        vocab_sha256=file_sha256(settings.vocab_path),
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
        pooling=options.pooling, normalize=options.normalize,
        vocab_file=settings.vocab_path,
        precision=options.precision, jit_compile=jit_compile,
        engine=options.engine, int8_model=options.int8_model,
        planned_engine=planned.engine, planned_precision=planned.precision,
        intra_op_threads=options.tf_intra_op_threads or None,
        inter_op_threads=options.tf_inter_op_threads or None,
        input_encoding=options.input_encoding,
        max_text_chars=options.max_text_chars, dedup=options.dedup,
        run_id=run_id or new_run_id(),
        model_fingerprint=model_fingerprint(
            resolve_model_path(model_dir), settings.vocab_path,
            settings.do_lower_case, options.max_seq_length,
            options.long_text, stride, precision, options.pooling,
            options.normalize),
        sequence_dtype=options.sequence_dtype,
        parquet_compression=options.parquet_compression,
        parquet_row_group_rows=options.parquet_row_group_rows,
        tfrecord_compression=options.tfrecord_compression,
        write_text=options.write_text, input_bytes=total_bytes,
        progress_interval=options.progress_interval)
    previous = None
    if options.previous_index:
        path = find_previous(options.previous_index, config.output)
        if path is not None:
            previous = load_previous(path, config.output, config.layout)
            config = dataclasses.replace(
                config, previous_index_files=previous.index_files,
                reuse_previous=previous.reuse)
    return ResolvedJob(config, demo, previous)


def resolve_config(options: EmbedOptions) -> tuple[JobConfig, bool]:
    """``resolve_job`` as ``(config, demo)``: the job a graph is built from
    (e.g. by a launcher that submits it without waiting)."""
    job = resolve_job(options)
    return job.config, job.demo


def _execute(pipeline: beam.Pipeline, active: StagedRun, demo: bool) -> Any:
    """Runs the pipeline; on an exception keeps a failed manifest in the
    staging directory and raises ``RunFailed``."""
    try:
        result = pipeline.run()
        result.wait_until_finish()
        return result
    except Exception as err:
        message = " ".join(f"{type(err).__name__}: {err}".split())[:500]
        summary = RunSummary(dict.fromkeys(COUNTERS, 0), 0, 0.0,
                             active.config.model_dir, demo, {},
                             active.config.run_id,
                             active.config.model_fingerprint,
                             failure=f"pipeline failed: {message}")
        try:
            active.keep_failed(summary)
        except Exception:  # reporting must not hide the pipeline's error
            _LOG.exception("Could not record the failed run")
        raise RunFailed(
            f"the pipeline failed, nothing was published ({message}); "
            f"staged files: {active.staging_dir}") from err


def nothing_embedded(summary: RunSummary, active: StagedRun
                     ) -> Optional[str]:
    """Why a run that embedded nothing while documents failed (say, a wrong
    ``--text_field`` made every record a dead letter) must not be
    published, naming the most common dead-letter reason; or None.

    An empty input, or one whose documents were all empty or duplicates,
    embeds nothing without failing and is published; so is an incremental
    run that found documents unchanged (its index is still current), whose
    failures ``--max_error_rate`` governs as usual.
    """
    counts = summary.counts
    failed = counts["documents_failed"]
    if (counts["documents_embedded"] or counts["documents_unchanged"]
            or not failed):
        return None
    message = (f"no document was embedded: {failed:,} of "
               f"{counts['documents_read']:,} failed")
    common = most_common_reason(active.staged_outputs()["errors"])
    if common is None:
        return message
    share = (f"{common.count:,}" if common.sampled >= failed else
             f"{common.count:,} of the first {common.sampled:,}")
    return f'{message}, most often "{common.reason}" ({share})'


def run(argv: Optional[Sequence[str]] = None) -> RunSummary:
    """Runs the job and returns its summary (also printed and written).

    Raises ``UsageError`` for an unknown flag and ``RunFailed`` when the
    pipeline raises.  A run whose counts do not reconcile, whose error rate
    is over ``--max_error_rate``, or that embedded nothing while documents
    failed returns a summary with ``status == "failed"`` and publishes
    nothing.  Raises ``OutputLocked`` when another run holds the output's
    lock.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    check_known_flags(args)
    pipeline_options = PipelineOptions(args)
    options = pipeline_options.view_as(EmbedOptions)
    _check_flags(options)
    run_id = new_run_id()
    # Taken before the model loads: it proves the output can be written,
    # and no other run at this output starts (or cleans up) until ours ends.
    with OutputLock(options.output, run_id) as lock:
        return _run_locked(pipeline_options, options, run_id, lock)


def _run_locked(pipeline_options: PipelineOptions, options: EmbedOptions,
                run_id: str, lock: OutputLock) -> RunSummary:
    """``run`` while this run holds the output's lock."""
    job = resolve_job(options, run_id)
    config = job.config
    if job.demo:
        print(DEMO_WARNING, file=sys.stderr)
    clean_stale(config.output, config.run_id)
    active = StagedRun(config, job.previous, utc_now(),
                       staging_prefix(config.output, config.run_id), lock)
    started = time.perf_counter()
    pipeline = beam.Pipeline(options=pipeline_options)
    build_pipeline(pipeline, dataclasses.replace(
        config, output=active.staged_prefix))
    with live_progress(config.progress_interval):
        result = _execute(pipeline, active, job.demo)
    counts, loads = collect_counts(result)
    summary = RunSummary(
        counts=counts, model_loads=loads,
        elapsed_seconds=round(time.perf_counter() - started, 3),
        model_dir=config.model_dir, demo_model=job.demo, outputs={},
        run_id=config.run_id, model_fingerprint=config.model_fingerprint,
        previous_index=job.previous.manifest if job.previous else None,
        duplicate_id_sample=duplicate_id_sample(result))
    summary.failure = (failure_of(summary, options.max_error_rate)
                       or nothing_embedded(summary, active))
    if summary.failure:
        summary_path = active.keep_failed(summary)
        print(summary.format())
        print(f"nothing published; staged files kept in "
              f"{active.staging_dir}")
        print(f"summary:            {summary_path}")
    else:
        with interrupts_deferred("publishing"):
            summary_path, manifest_path = active.publish(summary)
            print(summary.format())
            print(f"manifest:           {manifest_path}")
            print(f"summary:            {summary_path}")
    if job.demo:
        print(DEMO_WARNING, file=sys.stderr)
    return summary


def print_help() -> None:
    """``--help``: our flags, and a pointer to Beam's own."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.run",
        formatter_class=DefaultsHelpFormatter,
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
    """CLI wrapper: exit 0 on success, 1 on a failed run, 2 on bad usage,
    3 when the error rate exceeds ``--max_error_rate`` or nothing was
    embedded while documents failed, 4 when another run holds the output's
    lock (130 on Ctrl-C: ``exit_on_interrupt``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if wants_help(args):
        print_help()
        return 0
    setup_console(wants_verbose(args))
    try:
        summary = run(args)
    except (UsageError, FileNotFoundError, ModelFormatError,
            ManifestError, OutputNotWritable) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OutputLocked as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_LOCKED
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    if summary.status != FAILED:
        return EXIT_OK
    print(f"error: {summary.failure}", file=sys.stderr)
    return EXIT_FAILED if not summary.reconciled else EXIT_ERROR_RATE


if __name__ == "__main__":
    sys.exit(main())
