"""Entry point: ``python -m pipeline.run --input ... --output ... [--model]``.

The launcher resolves everything the workers need before the pipeline
starts (model directory, vocabulary, ``do_lower_case``, hidden size, model
fingerprint, previous index), so a wrong flag fails in seconds with one
clear line instead of on a worker: the checks are ``pipeline.preflight``'s,
and each stage gets its own settings, made here from the options and
checked once, by their classes.  It then runs the pipeline into a staging
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
import logging
import sys
import time
from typing import Any, Optional, Sequence

from pipeline.cli import (DefaultsHelpFormatter,
                          check_known_flags, exit_on_interrupt,
                          interrupts_deferred, live_progress, setup_console,
                          wants_help, wants_verbose)

if __name__ == "__main__":
    # Before the slow imports below: Ctrl-C while they load ends quietly too.
    exit_on_interrupt()

# pylint: disable=wrong-import-position
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import preflight
from pipeline.finish import RunFailed, StagedRun, failure_of, utc_now
from pipeline.graph import JobConfig, build_pipeline
from pipeline.lock import OutputLock, OutputLocked
from pipeline.manifest import (FAILED, PreviousIndex, find_previous,
                               load_previous)
from pipeline.options import EmbedOptions
from pipeline.publish import clean_stale, new_run_id
from pipeline.summary import (COUNTERS, RunSummary, collect_counts,
                              duplicate_id_sample, most_common_reason)
from transforms.batch import BatchSettings
from transforms.embedding_files import staging_prefix
from transforms.infer import InferSettings
from transforms.write import WriteSettings

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


def resolve_job(options: EmbedOptions, run_id: str = "",
                flags: Optional[preflight.CheckedFlags] = None
                ) -> ResolvedJob:
    """Turns flags into a ``ResolvedJob`` (with ``run_id``, or a new one):
    the pre-flight checks (``pipeline.preflight``), then each stage's
    settings from the options.  ``flags`` is ``check_flags``' result when
    the caller checked them already (``run`` does, before the lock).

    Raises ``UsageError``, ``FileNotFoundError``, ``ModelFormatError`` or
    ``ManifestError`` with a one-line message when something is wrong.
    """
    flags = flags or preflight.check_flags(options)
    preflight.check_remote_paths(options)
    total_bytes = preflight.check_inputs(options)
    plan = preflight.plan_engine(options, total_bytes)
    _LOG.info("XLA %s (%s)", "on" if plan.jit_compile else "off", plan.why)
    boundaries = preflight.bucket_boundaries(options)
    model = preflight.resolve_model(options, flags.tokenize)
    infer = preflight.settings(
        InferSettings, model_dir=model.model_dir, outputs=options.outputs,
        precision=options.precision, engine=options.engine,
        int8_model=options.int8_model, pooling=options.pooling,
        normalize=options.normalize, jit_compile=plan.jit_compile,
        intra_op_threads=options.tf_intra_op_threads or None,
        inter_op_threads=options.tf_inter_op_threads or None)
    config = JobConfig(
        inputs=list(options.input), output=options.output,
        vocab=model.vocab, do_lower_case=model.do_lower_case,
        hidden_size=model.hidden_size, infer=infer, read=flags.read,
        tokenize=flags.tokenize,
        batch=preflight.settings(
            BatchSettings, batch_size=options.batch_size,
            max_tokens_per_batch=options.max_tokens_per_batch,
            bucket_boundaries=boundaries,
            max_seq_length=flags.tokenize.max_seq_length,
            step_padding=infer.xla),
        write=preflight.settings(
            WriteSettings, sequence_dtype=options.sequence_dtype,
            write_text=options.write_text,
            parquet_compression=options.parquet_compression,
            row_group_rows=options.parquet_row_group_rows,
            tfrecord_compression=options.tfrecord_compression),
        vocab_sha256=model.vocab_sha256, vocab_file=model.vocab_file,
        output_format=options.output_format, num_shards=options.num_shards,
        document_vectors=options.document_vectors,
        planned_engine=plan.planned.engine,
        planned_precision=plan.planned.precision,
        dedup=options.dedup,
        run_id=run_id or new_run_id(),
        model_fingerprint=model.fingerprint(flags.tokenize, infer),
        input_bytes=total_bytes,
        progress_interval=options.progress_interval)
    previous = None
    if options.previous_index:
        path = find_previous(options.previous_index, config.output)
        if path is not None:
            previous = load_previous(path, config.output, config.layout)
            config = dataclasses.replace(
                config, previous_index_files=previous.index_files,
                reuse_previous=previous.reuse)
    return ResolvedJob(config, model.demo, previous)


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
                             active.config.infer.model_dir, demo, {},
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
    flags = preflight.check_flags(options)
    run_id = new_run_id()
    # Taken before the model loads: it proves the output can be written,
    # and no other run at this output starts (or cleans up) until ours ends.
    with OutputLock(options.output, run_id) as lock:
        job = resolve_job(options, run_id, flags)
        return _run_locked(pipeline_options, options, job, lock)


def _run_locked(pipeline_options: PipelineOptions, options: EmbedOptions,
                job: ResolvedJob, lock: OutputLock) -> RunSummary:
    """``run`` of the resolved ``job`` while it holds the output's lock."""
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
        model_dir=config.infer.model_dir, demo_model=job.demo, outputs={},
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
    except preflight.LAUNCH_ERRORS as err:
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
