"""Pre-flight checks of an embedding run, before any work.

Everything ``pipeline.run`` can find wrong up front fails here in seconds
with one line instead of on a worker: the flags (``check_flags``, which
also makes the settings of the stages that need only flags), the paths
Dataflow workers can read, the worker pool, the inputs, the engine and XLA
plan, an ``--analysis`` report, and the model against the settings
(``resolve_model``: its position table against ``--max_seq_length``, its
outputs against ``--pooling``, its vocabulary against its embeddings).
The output's lock (``pipeline.lock``) is taken by the launcher between the
flag checks and the rest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Callable, Optional, TypeVar

from model import engines
from model.errors import ModelFormatError
from model.files import file_sha256
from model.handles import resolve_model_path
from model.load import probe_model
from model.variables import check_max_seq_length, infer_hidden_size
from model.vocab import load_vocab, tokenizer_settings_with_overrides
from pipeline.cli import UsageError
from pipeline.embed import check_model_pooling
from pipeline.fingerprint import settings_fingerprint
from pipeline.lock import OutputNotWritable
from pipeline.manifest import ManifestError
from pipeline.options import EmbedOptions, lower_case_override
from pipeline.publish import check_output_prefix
from pipeline.worker_pool import check_environment
from transforms.batch import check_bucket_boundaries
from transforms.read import ReadSettings, check_patterns_match
from transforms.sources import is_compressed
from transforms.tokenize import TokenizeSettings

_LOG = logging.getLogger("pipeline.run")

# What a refused launch raises: the CLI prints it in one line, exit 2.
LAUNCH_ERRORS = (UsageError, FileNotFoundError, ModelFormatError,
                 ManifestError, OutputNotWritable)

_S = TypeVar("_S")


def settings(make: Callable[..., _S], **fields: Any) -> _S:
    """``make(**fields)`` (a stage's settings class), its ``ValueError`` as
    the flag's ``UsageError``: settings name their fields as the flags do,
    so ``max_seq_length must be ...`` reads ``--max_seq_length must be
    ...``."""
    try:
        return make(**fields)
    except ValueError as err:
        raise UsageError(f"--{err}") from err


@dataclasses.dataclass(frozen=True)
class CheckedFlags:
    """The settings of the stages that need the flags only."""
    read: ReadSettings
    tokenize: TokenizeSettings


def check_flags(options: EmbedOptions) -> CheckedFlags:
    """Raises ``UsageError`` for missing or inconsistent flags; returns the
    read and tokenize settings they make (checked there, once)."""
    if not options.input:
        raise UsageError("--input is required (a file or glob)")
    if not options.output:
        raise UsageError("--output is required (an output prefix)")
    try:
        check_output_prefix(options.output)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if options.long_text != "chunk" and (options.document_vectors
                                         or options.chunk_stride):
        raise UsageError("--document_vectors and --chunk_stride need "
                         "--long_text chunk")
    tokenize = settings(
        TokenizeSettings, max_seq_length=options.max_seq_length,
        long_text=options.long_text, chunk_stride=options.chunk_stride,
        write_text=options.write_text)
    if options.document_vectors and "pooled" not in options.outputs:
        raise UsageError("--document_vectors needs pooled in --outputs")
    if (options.pooling != "cls" or options.normalize) and \
            "pooled" not in options.outputs:
        raise UsageError("--pooling and --normalize make the pooled vector: "
                         "they need pooled in --outputs")
    read = settings(
        ReadSettings, input_format=options.input_format,
        id_field=options.id_field, text_field=options.text_field,
        input_encoding=options.input_encoding,
        max_text_chars=options.max_text_chars)
    return CheckedFlags(read, tokenize)


def check_remote_paths(options: EmbedOptions) -> None:
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


def check_inputs(options: EmbedOptions) -> Optional[int]:
    """Checks the worker pool (a portable runner's) and that every input
    pattern matches; returns the inputs' total bytes, or None when some
    are compressed (their decompressed size, which progress counts, is
    unknown)."""
    check_environment(options, options.worker_connect_timeout)
    files = check_patterns_match(options.input)
    if any(is_compressed(f.path) for f in files):
        return None
    return sum(f.size_in_bytes for f in files)


def _workers_hint(options: EmbedOptions) -> int:
    """Worker processes the job will likely have (``--direct_num_workers``,
    Dataflow's ``--num_workers`` or ``--max_num_workers``; else 1)."""
    from apache_beam.options.pipeline_options import (DirectOptions,
                                                      WorkerOptions)
    workers = options.view_as(WorkerOptions)
    counts = [options.view_as(DirectOptions).direct_num_workers,
              workers.num_workers, workers.max_num_workers]
    return max([int(c) for c in counts if c] or [1])


@dataclasses.dataclass(frozen=True)
class EnginePlan:
    """The job's XLA decision (``jit_compile``, and ``why``) and the engine
    and precision ``auto`` picks on this machine (``planned``, which stands
    in for the workers')."""
    jit_compile: bool
    why: str
    planned: engines.EngineChoice


def plan_engine(options: EmbedOptions, total_bytes: Optional[int]
                ) -> EnginePlan:
    """Checks ``--engine``/``--precision``/``--int8_model`` (UsageError for
    a combination that cannot run) and decides ``--xla`` for the job."""
    if options.int8_model and options.precision != "int8":
        raise UsageError("--int8_model needs --precision int8")
    try:
        planned = engines.choose_engine(options.engine, options.precision,
                                        engines.detect_hardware())
        jit_compile, why = engines.decide_xla(
            options.xla, planned, total_bytes, _workers_hint(options))
        return EnginePlan(jit_compile, why, planned)
    except engines.EngineError as err:
        raise UsageError(str(err)) from err


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


def bucket_boundaries(options: EmbedOptions) -> Optional[list[int]]:
    """``--bucket_boundaries``, else those an ``--analysis`` report
    recommends, else None."""
    if options.bucket_boundaries is None and options.analysis:
        return read_analysis_boundaries(options.analysis)
    return options.bucket_boundaries


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """The model a run uses and what the launcher read from it."""
    model_dir: str  # as given, or the demo model's directory
    demo: bool
    vocab: list[str]
    vocab_file: str
    vocab_sha256: str
    do_lower_case: bool
    hidden_size: int

    def fingerprint(self, tokenize: TokenizeSettings, infer: Any) -> str:
        """The model fingerprint of the vectors this model makes with
        these settings (``infer`` an ``InferSettings``)."""
        return settings_fingerprint(
            resolve_model_path(self.model_dir), self.vocab_file,
            self.do_lower_case, tokenize, infer)


def resolve_model(options: EmbedOptions, tokenize: TokenizeSettings
                  ) -> ResolvedModel:
    """The run's model (the demo model without ``--model``) and its
    tokenizer, once the model can take ``tokenize.max_seq_length`` and
    ``--pooling`` and its vectors are as wide as its embeddings."""
    demo = options.model is None
    if demo:
        from model.demo import ensure_demo_model
        model_dir = ensure_demo_model()
    else:
        model_dir = options.model
    # Before any work: a longer setting fails every longer document.
    check_max_seq_length(model_dir, tokenize.max_seq_length)
    tokenizer = tokenizer_settings_with_overrides(
        model_dir, options.vocab_file, lower_case_override(options))
    vocab = load_vocab(tokenizer.vocab_path)
    check_model_pooling(model_dir, options.pooling)
    probed = probe_model(model_dir)
    hidden_size = infer_hidden_size(model_dir, len(vocab))
    if probed != hidden_size:
        raise ModelFormatError(
            f"{model_dir}: the model returns {probed}-wide vectors but its "
            f"word-embedding table is {hidden_size} wide")
    return ResolvedModel(model_dir, demo, vocab, tokenizer.vocab_path,
                         file_sha256(tokenizer.vocab_path),
                         tokenizer.do_lower_case, hidden_size)

