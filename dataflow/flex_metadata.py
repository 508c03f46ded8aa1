"""The Flex Template's metadata, generated from the job's own flags.

``python -m dataflow.flex_metadata`` (from the repository root) rewrites
``dataflow/flex_template_metadata.json``: one parameter per flag of
``pipeline.options.EmbedOptions``, its help text the flag's, its regular
expression derived from the flag's choices or type, so that the template
offers exactly what ``python -m pipeline.run`` takes.  A test checks that
the file is up to date.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Optional

from pipeline import options as job_options
from transforms.infer import OUTPUT_KINDS

METADATA_PATH = Path(__file__).resolve().with_name(
    "flex_template_metadata.json")

NAME = "bert-zh-embed"
DESCRIPTION = (
    "Embeds Chinese documents with a BERT SavedModel (read -> WordPiece "
    "tokenize -> length-aware batches -> RunInference -> Parquet or "
    "TFRecord). The launch waits for the job, checks its counts and then "
    "publishes the output with <output>-summary.json and "
    "<output>-manifest.json (last); a failed run publishes nothing.")

# Without these a launch fails: the launcher VM has no demo model workers
# could read, and a job needs its input and output.
REQUIRED = ("input", "output", "model")

# Labels shown in the Dataflow console; other flags get their name, spaced.
LABELS = {
    "input": "Input files", "output": "Output prefix",
    "model": "BERT SavedModel", "input_format": "Input format",
    "input_encoding": "Input encoding", "id_field": "Id field",
    "text_field": "Text field", "max_text_chars": "Longest text",
    "max_error_rate": "Highest error rate", "dedup": "Drop duplicates",
    "previous_index": "Previous index", "vocab_file": "Vocabulary override",
    "do_lower_case": "Lower-case override", "format": "Output format",
    "max_seq_length": "Maximum sequence length",
    "bucket_boundaries": "Length bucket boundaries",
    "analysis": "Corpus analysis report", "long_text": "Long documents",
    "chunk_stride": "Chunk stride", "document_vectors": "Document vectors",
    "batch_size": "Batch size",
    "max_tokens_per_batch": "Padded tokens per batch",
    "outputs": "Embeddings to write", "engine": "Inference engine",
    "precision": "Model arithmetic", "int8_model": "int8 model",
    "xla": "XLA compilation",
    "tf_intra_op_threads": "TensorFlow intra-op threads",
    "tf_inter_op_threads": "TensorFlow inter-op threads",
    "num_shards": "Output files", "sequence_dtype": "Sequence output type",
    "parquet_compression": "Parquet compression",
    "parquet_row_group_rows": "Parquet row group rows",
    "tfrecord_compression": "TFRecord compression",
    "write_text": "Write text", "progress_interval": "Progress interval",
}

_GCS = r"gs://[a-z0-9][-_.a-z0-9]{1,221}[a-z0-9]"
# Flags naming files: on Dataflow they must be Cloud Storage paths.
_PATH_REGEXES = {
    name: f"^{_GCS}/.+$" for name in (
        "input", "output", "model", "vocab_file", "analysis",
        "previous_index", "int8_model")}

_KIND = "|".join(OUTPUT_KINDS)
_POSITIVE = r"[1-9][0-9]*"
# Regular expressions for the values each argparse type accepts.
# pylint: disable=protected-access
_TYPE_REGEXES = {
    job_options._positive_int: f"^{_POSITIVE}$",
    job_options._non_negative_int: r"^[0-9]+$",
    int: r"^[0-9]+$",
    job_options._seconds: r"^[0-9]+(\.[0-9]+)?$",
    job_options._share: r"^(0(\.[0-9]+)?|1(\.0+)?|\.[0-9]+)$",
    job_options.parse_outputs: f"^({_KIND})(,({_KIND}))*$",
    job_options.parse_boundaries: f"^{_POSITIVE}(,{_POSITIVE})*$",
}
# pylint: enable=protected-access


def _regex(name: str, action: argparse.Action) -> Optional[str]:
    """What the console accepts for a flag's value; None for free text.

    Raises ``ValueError`` for a flag whose type has no known expression, so
    that a new kind of flag is not offered unchecked.
    """
    if name in _PATH_REGEXES:
        return _PATH_REGEXES[name]
    if action.choices:
        return "^(" + "|".join(re.escape(c) for c in action.choices) + ")$"
    if action.nargs == 0:  # store_true: the launcher passes true or false
        return "^(true|false)$"
    if action.type is None:
        return None
    if action.type not in _TYPE_REGEXES:
        raise ValueError(f"--{name}: no Flex Template expression for its "
                         f"type {action.type!r}; add one to _TYPE_REGEXES")
    return _TYPE_REGEXES[action.type]


def template_value(value: Any) -> str:
    """A flag's value as a template parameter: how the launcher passes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def help_text(action: argparse.Action) -> str:
    """The flag's help (argparse's ``%%`` unescaped) and its default."""
    text = (action.help or "").replace("%%", "%")
    if action.default is not None:
        text += f" Default: {template_value(action.default)}."
    return text


def build_metadata() -> dict[str, Any]:
    """The metadata: every ``EmbedOptions`` flag, in their order."""
    parameters = []
    for name, action in job_options.embed_flags().items():
        parameter: dict[str, Any] = {
            "name": name,
            "label": LABELS.get(name, name.replace("_", " ").capitalize()),
            "helpText": help_text(action),
            "isOptional": name not in REQUIRED,
        }
        regex = _regex(name, action)
        if regex is not None:
            parameter["regexes"] = [regex]
        parameters.append(parameter)
    return {"name": NAME, "description": DESCRIPTION, "streaming": False,
            "parameters": parameters}


def render() -> str:
    """The metadata file's text."""
    return json.dumps(build_metadata(), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    """Rewrites ``flex_template_metadata.json``."""
    METADATA_PATH.write_text(render(), encoding="utf-8")
    print(f"wrote {METADATA_PATH}")


if __name__ == "__main__":
    main()
