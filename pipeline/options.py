"""Command-line options of the embedding job.

``EmbedOptions`` is a Beam ``PipelineOptions`` view: our flags sit beside
Beam's own (``--runner``, ``--direct_num_workers``, ``--setup_file``, the
Dataflow options, ...), which pass through untouched.
"""

from __future__ import annotations

import argparse

from apache_beam.options.pipeline_options import PipelineOptions

from model.engines import ENGINES, PRECISIONS
from transforms.batch import check_bucket_boundaries
from transforms.infer import OUTPUT_KINDS
from transforms.pooling import DEFAULT_POOLING, POOLINGS
from transforms.read import DEFAULT_MAX_TEXT_CHARS, ENCODINGS, INPUT_FORMATS
from transforms.tokenize import LONG_TEXT_MODES
from transforms.write import (FORMATS, PARQUET_CODECS, SEQUENCE_DTYPES,
                              TFRECORD_COMPRESSIONS)


def parse_outputs(value: str) -> list[str]:
    """``'pooled,sequence'`` -> ``['pooled', 'sequence']``, validated."""
    kinds = [v.strip() for v in value.split(",") if v.strip()]
    bad = [k for k in kinds if k not in OUTPUT_KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(
            f"--outputs takes a comma list of {', '.join(OUTPUT_KINDS)}; "
            f"got {value!r}")
    return kinds


def parse_boundaries(value: str) -> list[int]:
    """``'16,32,64'`` -> ``[16, 32, 64]``: positive, strictly increasing."""
    try:
        return check_bucket_boundaries(
            [int(v) for v in value.split(",") if v.strip()])
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--bucket_boundaries takes positive, increasing integers: "
            f"{value!r}") from err


# ``--do_lower_case`` as the tokenizer-settings override it stands for.
_LOWER_CASE_OVERRIDES = {"auto": None, "true": True, "false": False}


def lower_case_override(options: "EmbedOptions") -> bool | None:
    """``None`` (use the model's ``do_lower_case``), or the forced value."""
    return _LOWER_CASE_OVERRIDES[options.do_lower_case]


def _at_least(low: float, kind: type, name: str):
    """An argparse type: a ``kind`` number not below ``low``; ``name`` is
    what argparse calls it in its "invalid ... value" message."""
    def parse(value: str):
        number = kind(value)
        if number < low:
            raise argparse.ArgumentTypeError(
                f"must be >= {low:g}, got {value}")
        return number
    parse.__name__ = name
    return parse


_positive_int = _at_least(1, int, "positive int")
_non_negative_int = _at_least(0, int, "non-negative int")
_seconds = _at_least(0, float, "seconds")


def _fraction(include_zero: bool):
    """An argparse type: a float in [0, 1] with ``include_zero``, else in
    (0, 1] (a share that must be positive)."""
    interval = "[0, 1]" if include_zero else "(0, 1]"

    def parse(value: str) -> float:
        number = float(value)
        low_ok = 0.0 <= number if include_zero else 0.0 < number
        if not (low_ok and number <= 1.0):
            raise argparse.ArgumentTypeError(
                f"must be in {interval}, got {value}")
        return number
    parse.__name__ = "_share"  # argparse's "invalid _share value" message
    return parse


_share = _fraction(include_zero=True)
_positive_share = _fraction(include_zero=False)


class EmbedOptions(PipelineOptions):
    """Options of ``python -m pipeline.run``."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("embedding job")
        group.add_argument(
            "--input", action="append", default=None,
            help="File, glob or directory of documents (local, gs://, ...; "
                 ".gz/.bz2/.xz/.zst/.deflate are decompressed). Repeat the "
                 "flag for several patterns. Required.")
        group.add_argument(
            "--input_format", default="auto", choices=INPUT_FORMATS,
            help="text: one document per line; jsonl: one JSON object per "
                 "line; csv/tsv: rows with a header row; parquet: rows; "
                 "auto: by suffix (.jsonl/.ndjson/.json, .csv, .tsv/.tab, "
                 ".parquet/.pq), else text.")
        group.add_argument(
            "--input_encoding", default="utf-8", choices=ENCODINGS,
            help="Encoding of text, JSONL and CSV/TSV input (a BOM is "
                 "dropped; UTF-16 takes its byte order from the BOM).")
        group.add_argument(
            "--id_field", default="id",
            help="JSONL field or CSV/Parquet column holding the document id "
                 "(dots reach nested fields, e.g. meta.id). Without one the "
                 "id is <file name>:<content hash prefix>.")
        group.add_argument(
            "--text_field", default="text",
            help="JSONL field or CSV/Parquet column holding the document "
                 "text (dots for nesting).")
        group.add_argument(
            "--max_text_chars", type=_positive_int,
            default=DEFAULT_MAX_TEXT_CHARS,
            help="Longer texts are dead letters, not embedded.")
        group.add_argument(
            "--max_error_rate", type=_share, default=None,
            help="Fail the run (exit 3, nothing published) when failed / "
                 "read exceeds this fraction, e.g. 0.01 (default: no "
                 "limit).")
        group.add_argument(
            "--dedup", action="store_true",
            help="Embed exact duplicate texts once (the others are counted "
                 "as duplicates).")
        group.add_argument(
            "--previous_index", default=None,
            help="An earlier run's manifest, output prefix, or a glob of "
                 "manifests (the newest successful one is used): documents "
                 "whose id, content hash and model fingerprint are already "
                 "there are not embedded again (default: none, every "
                 "document is embedded).")
        group.add_argument(
            "--output", default=None,
            help="Output prefix: writes <output>-SSSSS-of-NNNNN.<format>, "
                 "<output>-errors-*.jsonl and <output>-summary.json. "
                 "Required.")
        group.add_argument(
            "--model", default=None,
            help="BERT SavedModel directory with the TF Hub interface, e.g. "
                 "/path/to/bert_zh_L-12_H-768_A-12. Default: a small demo "
                 "model with RANDOM weights, built once and cached.")
        group.add_argument(
            "--vocab_file", default=None,
            help="Override the model's vocab_file asset (default: the "
                 "model's).")
        group.add_argument(
            "--do_lower_case", default="auto",
            choices=("auto", "true", "false"),
            help="Override the model's do_lower_case variable (auto: use "
                 "the model's).")
        group.add_argument(
            "--format", dest="output_format", default="parquet",
            choices=FORMATS, help="Output file format.")
        group.add_argument(
            "--max_seq_length", type=_positive_int, default=128,
            help="Tokens per document incl. [CLS] and [SEP]; longer "
                 "documents are truncated (and flagged).")
        group.add_argument(
            "--bucket_boundaries", type=parse_boundaries, default=None,
            help="Token-length bucket boundaries, e.g. 16,32,64: batches "
                 "never mix buckets (default: sort only).")
        group.add_argument(
            "--analysis", default=None,
            help="A report of `python -m pipeline.analyze`: its recommended "
                 "bucket boundaries are used unless --bucket_boundaries is "
                 "given.")
        group.add_argument(
            "--long_text", default="truncate", choices=LONG_TEXT_MODES,
            help="Documents longer than --max_seq_length: truncate (keep "
                 "the start, flag the row) or chunk (embed every window of "
                 "max_seq_length tokens; rows get doc_id and chunk_index).")
        group.add_argument(
            "--chunk_stride", type=_positive_int, default=None,
            help="With --long_text chunk: wordpieces between the starts of "
                 "consecutive chunks (default max_seq_length - 2: no "
                 "overlap; smaller values overlap the windows).")
        group.add_argument(
            "--document_vectors", action="store_true",
            help="With --long_text chunk: also write one vector per "
                 "document (the mean of its chunks' pooled outputs) to "
                 "<output>-documents-*.")
        group.add_argument(
            "--batch_size", type=_positive_int, default=32,
            help="Most documents per model call.")
        group.add_argument(
            "--max_tokens_per_batch", type=_positive_int, default=2048,
            help="Most padded tokens (documents x longest) per model call; "
                 "documents of similar length are batched together.  The "
                 "default keeps a BERT-Base layer's activations in a CPU's "
                 "cache (4096 ran ~8%% slower on a 2-core CPU); GPU "
                 "workers want more (e.g. 16384, with a larger "
                 "--batch_size).")
        group.add_argument(
            "--outputs", type=parse_outputs, default=["pooled", "sequence"],
            help="Which embeddings to write: pooled, sequence or "
                 "pooled,sequence.")
        group.add_argument(
            "--pooling", default=DEFAULT_POOLING, choices=POOLINGS,
            help="How the pooled_output vector is made: cls (the model's "
                 "pooled output, tanh on [CLS]), mean (mean of the token "
                 "vectors, [CLS] and [SEP] included, padding not), "
                 "first_last_avg (mean over tokens of the first and last "
                 "layers' average; needs a model returning "
                 "encoder_outputs).")
        group.add_argument(
            "--normalize", action="store_true",
            help="Scale pooled_output (and document vectors) to unit L2 "
                 "length, so a dot product is the cosine.")
        group.add_argument(
            "--engine", default="auto", choices=ENGINES,
            help="Inference engine per worker: openvino (CPUs; the "
                 "SavedModel converted once, cached), tensorflow (GPUs), or "
                 "auto: tensorflow where it sees a GPU, else openvino if "
                 "installed, else tensorflow (logged once per worker).")
        group.add_argument(
            "--precision", default="auto", choices=PRECISIONS,
            help="Model arithmetic: float32; bfloat16 (fast on CPUs with "
                 "AMX/AVX512-BF16 and GPUs from compute capability 8.0); "
                 "int8 (OpenVINO, a model from python -m model.quantize); "
                 "auto: bfloat16 where the hardware has it and it passes a "
                 "self-check against float32 at load, else float32.")
        group.add_argument(
            "--int8_model", default=None,
            help="With --precision int8: the directory python -m "
                 "model.quantize wrote (default: the one it cached for "
                 "--model).")
        group.add_argument(
            "--xla", default="auto", choices=("auto", "on", "off"),
            help="TensorFlow engine, float32: compile the model with XLA "
                 "once per batch shape (batch widths rounded up to steps "
                 "of 8 tokens, 16 above 128): model calls ~10%% faster "
                 "after 3-8 s of compiling per shape on BERT-Base.  auto: "
                 "on when the engine is tensorflow and the input is large "
                 "(8 MiB or more per worker), off otherwise.")
        group.add_argument(
            "--tf_intra_op_threads", type=int, default=0,
            help="TensorFlow threads per op (0: the worker's usable cores).")
        group.add_argument(
            "--tf_inter_op_threads", type=int, default=0,
            help="TensorFlow ops run side by side (0: 1, as BERT is one "
                 "chain of ops).")
        group.add_argument(
            "--num_shards", type=int, default=0,
            help="Output files to write (0: let the runner decide).")
        group.add_argument(
            "--sequence_dtype", default="float32", choices=SEQUENCE_DTYPES,
            help="Storage type of sequence_output (float16 halves its "
                 "size; pooled_output stays float32).")
        group.add_argument(
            "--parquet_compression", default="none", choices=PARQUET_CODECS,
            help="Parquet codec (embeddings compress little; zstd helps "
                 "most with --write_text).")
        group.add_argument(
            "--parquet_row_group_rows", type=_non_negative_int, default=0,
            help="Rows per Parquet row group (0: about 32 MiB per group).")
        group.add_argument(
            "--tfrecord_compression", default="none",
            choices=TFRECORD_COMPRESSIONS,
            help="gzip writes *.tfrecord.gz.")
        group.add_argument(
            "--write_text", action="store_true",
            help="Add a text column with each document's text.")
        group.add_argument(
            "--progress_interval", type=_seconds, default=60.0,
            help="Seconds between progress log lines per worker process "
                 "(0: off); a local run on a terminal shows a live line "
                 "instead.")
        group.add_argument(
            "--verbose", action="store_true",
            help="Show every log line: our INFO lines, the libraries' "
                 "warnings and TensorFlow's native start-up and C++ log "
                 "lines (default: off, the console shows the summary, "
                 "warnings, errors and progress).")
        group.add_argument(
            "--worker_connect_timeout", type=_seconds, default=60.0,
            help="With --runner PortableRunner, --environment_type "
                 "EXTERNAL (a worker pool) and a job service on this "
                 "machine: seconds to wait, before the run starts, for the "
                 "pool at --environment_config to start an SDK worker that "
                 "connects; exit 2 if none does (0: no check).")


def embed_flags() -> dict[str, argparse.Action]:
    """``EmbedOptions``' flags by name without dashes (``format``, not its
    destination ``output_format``): what the Flex Template's parameters
    are generated from (``dataflow/flex_metadata.py``)."""
    parser = argparse.ArgumentParser(add_help=False)
    EmbedOptions._add_argparse_args(parser)  # pylint: disable=protected-access
    return {flag[2:]: action
            for action in parser._actions  # pylint: disable=protected-access
            for flag in action.option_strings if flag.startswith("--")}
