"""Corpus analysis: ``python -m pipeline.analyze --input ... --output r.json``.

Before embedding a corpus it pays to know how long its documents are: the
share that ``--max_seq_length`` would truncate, how much of the text the
vocabulary cannot represent (``[UNK]``), and which length buckets would keep
padding low.  This job reads the corpus exactly as ``pipeline.run`` does
(same reader, same tokenizer settings), measures every document, and lets
tf.Transform analyzers (``tft.size``, ``tft.sum``, ``tft.max``,
``tft.quantiles``) reduce the measurements over the whole corpus in one
Beam pass, so it scales to corpora that do not fit on one machine.

The report is printed, written as JSON to ``--output``, and drawn as a
PNG (``--plot``, by default next to the JSON): the token-length histogram
with the ``--max_seq_length`` cut and the recommended bucket boundaries
marked.  Drawing needs matplotlib (``pip install 'bert-zh-embed[plots]'``);
without it the plot is skipped with one line and the JSON still written.

The analyzer results are read back by writing the ``transform_fn`` and
running it on a one-row dummy batch: ``preprocessing_fn`` returns every
analyzer result broadcast to the batch, so row 0 of the transformed dummy
holds them all.  That uses only the public ``TFTransformOutput`` API and
works the same for local and ``gs://`` temp dirs.

Shared flags (``--input``, ``--input_format``, ``--id_field``,
``--text_field``, ``--model``, ``--vocab_file``, ``--do_lower_case``,
``--max_seq_length``, ``--output``) are ``EmbedOptions``' own: Beam parses
all ``PipelineOptions`` subclasses with one argparse parser, so defining them
again here would make every pipeline in the process fail with "conflicting
option string".  ``AnalyzeOptions`` adds only the analysis flags.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import logging
import math
import shutil
import sys
import tempfile
import uuid
from typing import Any, Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (GoogleCloudOptions,
                                                  PipelineOptions)

from model.errors import ModelFormatError
from model.handles import join_path
from model.variables import check_max_seq_length
from model.vocab import load_vocab, tokenizer_settings_with_overrides
from pipeline.cli import (DefaultsHelpFormatter, UsageError,
                          check_known_flags, setup_console, wants_help,
                          wants_verbose)
from pipeline.options import (EmbedOptions, _positive_int, _positive_share,
                              lower_case_override)
from transforms.read import (ReadDocuments, ReadSettings,
                             check_patterns_match)
from transforms.records import METRICS_NAMESPACE, Document
from transforms.tokenization import UNK_TOKEN, BertWordPieceTokenizer
from transforms.tokenize import TokenizeSettings

_LOG = logging.getLogger("pipeline.analyze")

# Quantiles reported: deciles plus the tail that decides max_seq_length.
QUANTILE_PERCENTS = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99)
# tft.quantiles' error tolerance (rank error as a share of documents).
QUANTILE_EPSILON = 0.001
# Candidate max_seq_length values: multiples of LENGTH_STEP up to the cap.
LENGTH_STEP = 32
MAX_RECOMMENDED_LENGTH = 512
CANDIDATE_LENGTHS = tuple(range(LENGTH_STEP, MAX_RECOMMENDED_LENGTH + 1,
                                LENGTH_STEP))
# Recommended bucket boundaries are rounded up to multiples of this.
BOUNDARY_MULTIPLE = 8
DEFAULT_NUM_BUCKETS = 4
DEFAULT_COVERAGE = 0.99

# The length histogram: bins HISTOGRAM_STEP tokens wide up to
# max(HISTOGRAM_MAX, max_seq_length), and one bin for longer documents.
HISTOGRAM_STEP = 8
HISTOGRAM_MAX = 512
# --plot values: next to --output, or no plot.
PLOT_AUTO, PLOT_NONE = "auto", "none"
PLOTS_EXTRA = "pip install 'bert-zh-embed[plots]'"

# Per-document features handed to tf.Transform.
FEATURES = ("num_tokens", "num_wordpieces", "num_unk")
# Longest document the tokenizer is asked to keep whole (no truncation).
_UNTRUNCATED = 2 ** 62
# Percentiles 1..99 come from one tft.quantiles call with 100 buckets.
_PERCENTILE_BUCKETS = 100

DEMO_NOTE = (
    "NOTE: no --model or --vocab_file given: token counts use the built-in "
    "DEMO model's small vocabulary; pass the model you will embed with for "
    "meaningful lengths and [UNK] rate.")


class AnalyzeOptions(PipelineOptions):
    """Flags of ``python -m pipeline.analyze`` beyond the shared ones."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("corpus analysis")
        group.add_argument(
            "--num_buckets", type=_positive_int, default=DEFAULT_NUM_BUCKETS,
            help="Length buckets to recommend: at most num_buckets - 1 "
                 "boundaries, from the corpus' 1/N quantiles.")
        group.add_argument(
            "--length_coverage", type=_positive_share,
            default=DEFAULT_COVERAGE,
            help="Share of documents the recommended max_seq_length must "
                 "hold without truncation (default 0.99).")
        group.add_argument(
            "--plot", default=PLOT_AUTO,
            help="PNG of the token-length distribution with the "
                 "--max_seq_length cut and the recommended bucket "
                 "boundaries marked: a path (local or gs://), auto (next "
                 "to --output, its name ending .png; none without "
                 "--output) or none (default: auto).  Needs matplotlib: "
                 + PLOTS_EXTRA.replace("%", "%%") + ".")


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    """Everything the analysis needs, resolved before the pipeline starts."""
    inputs: list[str]
    vocab: list[str]
    vocab_path: str
    do_lower_case: bool
    max_seq_length: int = 128  # as TokenizeSettings checked it
    num_buckets: int = DEFAULT_NUM_BUCKETS
    coverage: float = DEFAULT_COVERAGE
    read: ReadSettings = ReadSettings()
    output: Optional[str] = None
    plot: Optional[str] = None


def plot_path(plot: str, output: Optional[str]) -> Optional[str]:
    """Where ``--plot`` puts the PNG: ``auto`` is ``--output`` with its
    ``.json`` suffix (if any) replaced by ``.png`` (None without
    ``--output``), ``none`` is None, anything else a path."""
    if plot.lower() == PLOT_NONE:
        return None
    if plot.lower() != PLOT_AUTO:
        return plot
    if not output:
        return None
    return (output[:-len(".json")] if output.endswith(".json")
            else output) + ".png"


def histogram_uppers(max_seq_length: int) -> list[int]:
    """Upper bounds of the histogram's bins, ``HISTOGRAM_STEP`` apart."""
    top = max(HISTOGRAM_MAX, max_seq_length)
    top = HISTOGRAM_STEP * math.ceil(top / HISTOGRAM_STEP)
    return list(range(HISTOGRAM_STEP, top + 1, HISTOGRAM_STEP))


def resolve_analysis(options: PipelineOptions) -> tuple[AnalysisConfig, bool]:
    """Turns flags into an ``AnalysisConfig``; also says if the demo model's
    vocabulary is used.

    The vocabulary is resolved like ``pipeline.run`` does: ``--vocab_file``
    and ``--do_lower_case`` override the model's assets; without ``--model``
    a ``--vocab_file`` alone suffices (lower-casing unless told otherwise),
    and with neither the demo model's vocabulary is used.
    """
    shared = options.view_as(EmbedOptions)
    ours = options.view_as(AnalyzeOptions)
    if not shared.input:
        raise UsageError("--input is required (a file or glob)")
    try:
        max_seq_length = TokenizeSettings(
            shared.max_seq_length).max_seq_length
        read = ReadSettings(shared.input_format, shared.id_field,
                            shared.text_field, shared.input_encoding,
                            shared.max_text_chars)
    except ValueError as err:
        raise UsageError(f"--{err}") from err
    check_patterns_match(shared.input)
    override = lower_case_override(shared)
    demo = shared.model is None and shared.vocab_file is None
    if shared.model is None and shared.vocab_file is not None:
        vocab_path = shared.vocab_file
        do_lower_case = True if override is None else override
    else:
        model_dir = shared.model
        if demo:
            from model.demo import ensure_demo_model
            model_dir = ensure_demo_model()
        # The run's length limit must be one the model can take.
        check_max_seq_length(model_dir, max_seq_length)
        settings = tokenizer_settings_with_overrides(
            model_dir, shared.vocab_file, override)
        vocab_path, do_lower_case = settings.vocab_path, settings.do_lower_case
    config = AnalysisConfig(
        inputs=list(shared.input), vocab=load_vocab(vocab_path),
        vocab_path=vocab_path, do_lower_case=do_lower_case,
        max_seq_length=max_seq_length, num_buckets=ours.num_buckets,
        coverage=ours.length_coverage, read=read, output=shared.output,
        plot=plot_path(ours.plot, shared.output))
    return config, demo


# --------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------


class MeasureDocuments(beam.DoFn):
    """Document in, serialized ``tf.Example`` of its lengths out.

    ``num_tokens`` counts ``[CLS]`` and ``[SEP]`` and is never truncated, so
    the analysis sees how long each document really is; ``num_unk`` counts
    word pieces that are ``[UNK]``.  A document the tokenizer fails on is
    counted under ``documents_failed`` (like a read error) and left out.
    """

    def __init__(self, vocab: Sequence[str], do_lower_case: bool):
        self._vocab = list(vocab)
        self._do_lower_case = do_lower_case
        self._tokenizer: Optional[BertWordPieceTokenizer] = None
        self._unk_id = -1
        self._failed = beam.metrics.Metrics.counter(
            METRICS_NAMESPACE, "documents_failed")

    def setup(self) -> None:
        self._tokenizer = BertWordPieceTokenizer(
            self._vocab, do_lower_case=self._do_lower_case)
        self._unk_id = self._tokenizer.convert_tokens_to_ids([UNK_TOKEN])[0]

    def process(self, doc: Document) -> Iterator[bytes]:
        assert self._tokenizer is not None, "setup() was not called"
        try:
            encoded = self._tokenizer.encode(doc.text, _UNTRUNCATED)
        except Exception:  # pylint: disable=broad-except
            _LOG.warning("cannot tokenize %s (%s:%d)", doc.id, doc.source,
                         doc.line, exc_info=True)
            self._failed.inc()
            return
        pieces = encoded.input_word_ids[1:-1]
        yield encode_example({
            "num_tokens": int(encoded.num_tokens),
            "num_wordpieces": int(encoded.num_wordpieces),
            "num_unk": int(np.count_nonzero(pieces == self._unk_id)),
        })


def encode_example(values: dict[str, int]) -> bytes:
    """A serialized ``tf.Example`` with one int64 per feature."""
    import tensorflow as tf  # slow import: only where examples are built
    feature = {name: tf.train.Feature(int64_list=tf.train.Int64List(
        value=[value])) for name, value in values.items()}
    return tf.train.Example(features=tf.train.Features(
        feature=feature)).SerializeToString()


def feature_schema() -> Any:
    """The tf.Transform input schema: one int64 scalar per feature."""
    import tensorflow as tf
    from tensorflow_transform.tf_metadata import schema_utils
    return schema_utils.schema_from_feature_spec(
        {name: tf.io.FixedLenFeature([], tf.int64) for name in FEATURES})


def make_preprocessing_fn(max_seq_length: int, num_buckets: int) -> Any:
    """A ``preprocessing_fn`` whose outputs are the corpus statistics.

    Every output is a full-corpus analyzer result broadcast over the batch
    (row 0 of any transformed batch holds them all).  Empty documents (no
    word pieces) are counted, but their lengths become NaN for the
    quantiles (which ignore NaN) and are masked out of the other sums.
    """
    import tensorflow as tf
    import tensorflow_transform as tft

    def preprocessing_fn(inputs: dict[str, Any]) -> dict[str, Any]:
        tokens = inputs["num_tokens"]
        nonempty = inputs["num_wordpieces"] > 0
        kept = tf.where(nonempty, tokens, tf.zeros_like(tokens))
        lengths = tf.where(nonempty, tf.cast(tokens, tf.float32),
                           tf.fill(tf.shape(tokens), float("nan")))
        candidates = tf.constant(CANDIDATE_LENGTHS, tf.int64)
        fits = tf.logical_and(kept[:, None] <= candidates[None, :],
                              nonempty[:, None])
        uppers = tf.constant(histogram_uppers(max_seq_length), tf.int64)
        at_most = tf.logical_and(kept[:, None] <= uppers[None, :],
                                 nonempty[:, None])
        stats = {
            "documents": tft.size(tokens),
            "nonempty": tft.sum(tf.cast(nonempty, tf.int64)),
            "token_sum": tft.sum(kept),
            "max_tokens": tft.max(kept),
            "wordpieces": tft.sum(inputs["num_wordpieces"]),
            "unk": tft.sum(inputs["num_unk"]),
            "truncated": tft.sum(tf.cast(
                tf.logical_and(nonempty, tokens > max_seq_length), tf.int64)),
            "fits": tft.sum(tf.cast(fits, tf.int64),
                            reduce_instance_dims=False),
            "at_most": tft.sum(tf.cast(at_most, tf.int64),
                               reduce_instance_dims=False),
            "percentiles": tf.reshape(tft.quantiles(
                lengths, _PERCENTILE_BUCKETS, QUANTILE_EPSILON), [-1]),
        }
        if num_buckets > 1:
            stats["bucket_quantiles"] = tf.reshape(tft.quantiles(
                lengths, num_buckets, QUANTILE_EPSILON), [-1])
        batch = tf.shape(tokens)[:1]
        return {name: _broadcast(value, batch)
                for name, value in stats.items()}

    return preprocessing_fn


def _broadcast(value: Any, batch: Any) -> Any:
    """``value`` (a scalar or a vector) repeated once per batch row."""
    import tensorflow as tf
    row = tf.reshape(value, [1, -1])
    return tf.tile(row, tf.concat([batch, [1]], axis=0))


def build_pipeline(pipeline: beam.Pipeline, config: AnalysisConfig,
                   work_dir: str) -> None:
    """read -> measure -> tf.Transform analysis -> ``work_dir/transform_fn``.

    Input reaches tf.Transform as Arrow record batches through tfx-bsl's
    TFXIO (the format tf.Transform 1.x recommends) rather than as instance
    dicts.
    """
    import tensorflow_transform.beam as tft_beam
    from tfx_bsl.public import tfxio

    documents, _ = pipeline | "Read" >> ReadDocuments(config.inputs,
                                                      config.read)
    source = tfxio.TFExampleBeamRecord(
        physical_format="inmem", telemetry_descriptors=["corpus_analysis"],
        schema=feature_schema())
    batches = (documents
               | "Measure" >> beam.ParDo(MeasureDocuments(
                   config.vocab, config.do_lower_case))
               | "ToRecordBatches" >> source.BeamSource())
    with tft_beam.Context(temp_dir=join_path(work_dir, "tmp")):
        transform_fn = (
            (batches, source.TensorAdapterConfig())
            | "Analyze" >> tft_beam.AnalyzeDataset(make_preprocessing_fn(
                config.max_seq_length, config.num_buckets)))
        _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(
            join_path(work_dir, "transform_fn"))


def read_statistics(transform_fn_dir: str) -> dict[str, np.ndarray]:
    """The analyzer results stored in a written ``transform_fn``.

    Runs the transform on a one-row dummy batch; since every output is an
    analyzer result broadcast over the batch, row 0 is the result itself
    (a 1-D array; scalars have length 1).
    """
    import tensorflow as tf
    import tensorflow_transform as tft
    output = tft.TFTransformOutput(transform_fn_dir)
    dummy = {name: tf.constant([0], tf.int64) for name in FEATURES}
    transformed = output.transform_raw_features(dummy)
    return {name: np.ravel(np.asarray(value)[0])
            for name, value in transformed.items()}


def _scalar(values: np.ndarray) -> int:
    """The one integer in an analyzer result of length 1."""
    return int(np.ravel(values)[0])


# --------------------------------------------------------------------------
# Recommendations and the report
# --------------------------------------------------------------------------


def recommend_max_seq_length(fits: Sequence[int], nonempty: int,
                             coverage: float = DEFAULT_COVERAGE
                             ) -> tuple[int, float]:
    """Smallest candidate length holding ``coverage`` of the documents.

    ``fits[i]`` is how many non-empty documents have at most
    ``CANDIDATE_LENGTHS[i]`` tokens.  Returns the length and the share it
    covers; the cap (512, BERT's position limit) when no candidate reaches
    ``coverage``.
    """
    if nonempty <= 0:
        return CANDIDATE_LENGTHS[0], 1.0
    for length, count in zip(CANDIDATE_LENGTHS, fits):
        if count / nonempty >= coverage:
            return length, count / nonempty
    return CANDIDATE_LENGTHS[-1], fits[-1] / nonempty


def recommend_bucket_boundaries(quantiles: Sequence[float], num_buckets: int,
                                max_seq_length: int) -> list[int]:
    """Bucket boundaries from length quantiles: rounded up to multiples of
    8, deduplicated, sorted, at most ``num_buckets - 1`` of them.

    Boundaries above ``max_seq_length`` are dropped: after truncation no
    document is longer, so they would only add empty buckets.
    """
    rounded = {BOUNDARY_MULTIPLE * math.ceil(float(q) / BOUNDARY_MULTIPLE)
               for q in quantiles if math.isfinite(float(q))}
    usable = sorted(b for b in rounded if 0 < b <= max_seq_length)
    return usable[:max(num_buckets - 1, 0)]


def build_report(stats: dict[str, np.ndarray], config: AnalysisConfig,
                 failed_documents: Optional[int]) -> dict[str, Any]:
    """The JSON report from the raw analyzer results."""
    documents = _scalar(stats["documents"])
    nonempty = _scalar(stats["nonempty"])
    wordpieces = _scalar(stats["wordpieces"])
    truncated = _scalar(stats["truncated"])
    fits = [int(v) for v in np.ravel(stats["fits"])]
    recommended, covered = recommend_max_seq_length(fits, nonempty,
                                                    config.coverage)
    percentiles = np.ravel(stats["percentiles"])
    quantiles = ({f"p{p}": float(percentiles[p - 1])
                  for p in QUANTILE_PERCENTS} if nonempty else {})
    bucket_quantiles = np.ravel(stats.get("bucket_quantiles", np.zeros(0)))
    boundaries = (recommend_bucket_boundaries(
        bucket_quantiles, config.num_buckets, recommended) if nonempty
        else [])
    at_most = [int(v) for v in np.ravel(stats["at_most"])]
    return {
        "documents": documents,
        "empty_documents": documents - nonempty,
        "failed_documents": failed_documents,
        "token_length_quantiles": quantiles,
        "mean_tokens": (_scalar(stats["token_sum"]) / nonempty
                        if nonempty else None),
        "max_tokens": _scalar(stats["max_tokens"]) if nonempty else None,
        "max_seq_length": config.max_seq_length,
        "truncated_documents": truncated,
        "truncated_share": truncated / nonempty if nonempty else 0.0,
        "unk_rate": (_scalar(stats["unk"]) / wordpieces if wordpieces
                     else 0.0),
        "length_coverage_target": config.coverage,
        "recommended_max_seq_length": recommended,
        "recommended_max_seq_length_coverage": covered,
        "num_buckets": config.num_buckets,
        "recommended_bucket_boundaries": boundaries,
        "token_length_histogram": length_histogram(
            histogram_uppers(config.max_seq_length), at_most, nonempty),
        "vocab_file": config.vocab_path,
        "do_lower_case": config.do_lower_case,
    }


def length_histogram(uppers: Sequence[int], at_most: Sequence[int],
                     nonempty: int) -> dict[str, Any]:
    """The histogram from cumulative counts: ``at_most[i]`` non-empty
    documents have at most ``uppers[i]`` tokens.  ``counts[i]`` documents
    have more than ``bin_edges[i]`` and at most ``bin_edges[i + 1]``;
    ``longer`` have more than the last edge."""
    counts = [at_most[0]] + [b - a for a, b in zip(at_most, at_most[1:])]
    return {"bin_edges": [0] + list(uppers), "counts": counts,
            "longer": nonempty - (at_most[-1] if at_most else 0)}


def length_figure(report: dict[str, Any]) -> Any:
    """A matplotlib ``Figure`` of the report's token-length histogram with
    ``--max_seq_length`` (and the share it truncates), the recommended
    max_seq_length and the recommended bucket boundaries marked as vertical
    lines.  A plain ``Figure`` renders with Agg: no display, no pyplot
    state.  Raises ``ImportError`` without matplotlib."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    hist = report["token_length_histogram"]
    edges, counts = hist["bin_edges"], hist["counts"]
    step = edges[1] - edges[0]
    figure = Figure(figsize=(9, 4.8), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.bar(edges[:-1], counts, width=step, align="edge", color="#4c72b0",
             edgecolor="white", linewidth=0.5, label="documents")
    cut = report["max_seq_length"]
    recommended = report["recommended_max_seq_length"]
    bounds = report["recommended_bucket_boundaries"]
    right = max([cut, recommended] + [edges[i + 1] for i, count
                                      in enumerate(counts) if count])
    if hist["longer"]:
        axes.bar([edges[-1]], [hist["longer"]], width=step, align="edge",
                 color="#c44e52", hatch="//", edgecolor="white",
                 label=f"longer than {edges[-1]}")
        right = max(right, edges[-1] + step)
    axes.axvline(cut, color="#c44e52", linewidth=2,
                 label=f"--max_seq_length {cut}: "
                       f"{report['truncated_share']:.1%} truncated")
    if recommended != cut:
        covered = report["recommended_max_seq_length_coverage"]
        axes.axvline(recommended, color="#dd8452", linestyle=":",
                     linewidth=2, label=f"recommended max_seq_length "
                                        f"{recommended} (holds {covered:.1%})")
    for index, bound in enumerate(bounds):
        axes.axvline(bound, color="#55a868", linestyle="--", linewidth=1.2,
                     label=None if index else "recommended bucket "
                     "boundaries " + ",".join(map(str, bounds)))
    axes.set_xlim(0, right * 1.04)
    axes.set_xlabel("tokens per document (with [CLS] and [SEP], "
                    "untruncated)")
    axes.set_ylabel("documents")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(f"Token lengths of {report['documents']:,} documents "
                   f"({report['empty_documents']:,} empty, not shown)")
    axes.legend(loc="upper right", fontsize="small")
    return figure


def render_plot(report: dict[str, Any]) -> bytes:
    """``length_figure`` as PNG bytes (900 x 480 pixels)."""
    buffer = io.BytesIO()
    length_figure(report).savefig(buffer, format="png")
    return buffer.getvalue()


def write_plot(report: dict[str, Any], path: str) -> bool:
    """Writes ``render_plot`` to ``path`` (local or cloud); without
    matplotlib prints one line saying how to get it and returns False."""
    try:
        png = render_plot(report)
    except ImportError:
        print(f"plot skipped: it needs matplotlib ({PLOTS_EXTRA})",
              file=sys.stderr)
        return False
    with FileSystems.create(path) as handle:
        handle.write(png)
    return True


def format_report(report: dict[str, Any]) -> str:
    """A few lines for people."""
    quantiles = report["token_length_quantiles"]
    shown = ", ".join(f"{k} {v:g}" for k, v in quantiles.items()) or "-"
    mean = report["mean_tokens"]
    lines = [
        f"documents:          {report['documents']} "
        f"({report['empty_documents']} empty, not in the length stats; "
        f"{report['failed_documents']} unreadable)",
        "tokens per document (incl. [CLS]/[SEP], untruncated):",
        f"  mean {mean:.1f}, max {report['max_tokens']}" if mean is not None
        else "  no non-empty documents",
        f"  quantiles:        {shown}",
        f"{'truncated at ' + str(report['max_seq_length']) + ':':<20}"
        f"{report['truncated_share']:.2%} "
        f"({report['truncated_documents']} documents)",
        f"[UNK] rate:         {report['unk_rate']:.3%} of word pieces",
        f"recommended max_seq_length: {report['recommended_max_seq_length']} "
        f"(holds {report['recommended_max_seq_length_coverage']:.2%}; "
        f"target {report['length_coverage_target']:.0%})",
        "recommended bucket boundaries: "
        f"{report['recommended_bucket_boundaries']}",
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str) -> None:
    """Writes the report as JSON through Beam's file systems (gs:// too)."""
    data = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    with FileSystems.create(path) as handle:
        handle.write(data.encode("utf-8"))


def _failed_count(result: Any) -> Optional[int]:
    """Documents that could not be read or tokenized, from Beam metrics
    (``None`` where the runner does not report metrics)."""
    try:
        counters = result.metrics().query(
            MetricsFilter().with_namespace(METRICS_NAMESPACE)
            .with_name("documents_failed"))["counters"]
    except Exception:  # pylint: disable=broad-except
        return None
    return sum(c.committed or 0 for c in counters)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _work_dir(options: PipelineOptions) -> tuple[str, bool]:
    """Where tf.Transform writes: under ``--temp_location`` when given (so
    remote workers can reach it), else a local temporary directory.  The
    flag says whether it is local (removed with ``shutil``)."""
    temp_location = options.view_as(GoogleCloudOptions).temp_location
    if temp_location:
        return join_path(temp_location, f"analyze-{uuid.uuid4().hex}"), False
    return tempfile.mkdtemp(prefix="corpus-analysis-"), True


def _remove(path: str, local: bool) -> None:
    """Best-effort removal of the work directory."""
    try:
        if local:
            shutil.rmtree(path, ignore_errors=True)
        elif FileSystems.exists(path):
            FileSystems.delete([path])
    except Exception:  # pylint: disable=broad-except
        _LOG.warning("could not remove %s", path, exc_info=True)


def run(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Runs the analysis and returns the report (also printed, and written
    to ``--output`` when given).  Raises ``UsageError`` for an unknown
    flag."""
    args = list(sys.argv[1:] if argv is None else argv)
    check_known_flags(args)
    pipeline_options = PipelineOptions(args)
    config, demo = resolve_analysis(pipeline_options)
    if demo:
        print(DEMO_NOTE, file=sys.stderr)
    work_dir, local = _work_dir(pipeline_options)
    try:
        pipeline = beam.Pipeline(options=pipeline_options)
        build_pipeline(pipeline, config, work_dir)
        result = pipeline.run()
        result.wait_until_finish()
        stats = read_statistics(join_path(work_dir, "transform_fn"))
    finally:
        _remove(work_dir, local)
    report = build_report(stats, config, _failed_count(result))
    print(format_report(report))
    if config.output:
        write_report(report, config.output)
        print(f"report:             {config.output}")
    if config.plot and write_plot(report, config.plot):
        print(f"plot:               {config.plot}")
    return report


_SHARED_FLAGS = ("input", "input_format", "id_field", "text_field", "model",
                 "vocab_file", "do_lower_case", "max_seq_length", "output",
                 "verbose")


def print_help() -> None:
    """``--help``: the flags this job reads, and a pointer to Beam's own."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.analyze",
        formatter_class=DefaultsHelpFormatter,
        description="Corpus analysis with tf.Transform: document count, "
                    "token-length quantiles, truncated share, [UNK] rate, "
                    "recommended max_seq_length and bucket boundaries.",
        epilog="Apache Beam's pipeline options pass through as well "
               "(--runner, --direct_num_workers, --temp_location, ...).")
    shared = argparse.ArgumentParser(add_help=False)
    EmbedOptions._add_argparse_args(shared)  # pylint: disable=protected-access
    group = parser.add_argument_group("shared with pipeline.run")
    for action in shared._actions:  # pylint: disable=protected-access
        if action.dest in _SHARED_FLAGS:
            action = copy.copy(action)
            if action.dest == "output":
                action.help = ("Write the report as JSON to this path "
                               "(default: printed only).")
            elif action.dest == "max_seq_length":
                action.help = "The run's length limit: the report says " \
                              "which share of documents it truncates."
            group._add_action(action)  # pylint: disable=protected-access
    # pylint: disable-next=protected-access
    AnalyzeOptions._add_argparse_args(parser)
    parser.print_help()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI wrapper: exit 0 on success, 2 on bad usage."""
    args = list(sys.argv[1:] if argv is None else argv)
    if wants_help(args):
        print_help()
        return 0
    setup_console(wants_verbose(args))
    try:
        run(args)
    except (UsageError, FileNotFoundError, ModelFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
