"""Flex Template entry point: builds the embedding job and submits it.

The Dataflow Flex Template launcher runs this file
(``FLEX_TEMPLATE_PYTHON_PY_FILE``) with the template's parameters as
``--name=value`` flags, plus the Dataflow options it adds (``--runner``,
``--project``, ``--region``, ``--temp_location``, ...).  It differs from
``python -m pipeline.run`` in three ways:

* it returns once the job is submitted: the launcher VM has nothing to
  wait for; the job's counts are Beam metrics in the Dataflow UI
  (namespace ``bert_zh_embed``), not a summary file;
* ``--model`` is required: the demo model is built on the launching machine,
  which workers cannot read;
* boolean parameters arrive as ``--document_vectors=true|false`` and are
  turned into the plain flag that the job's options expect.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult

from model.load import ModelFormatError
from pipeline.graph import build_pipeline
from pipeline.options import EmbedOptions
from pipeline.run import UsageError, resolve_config

_LOG = logging.getLogger("dataflow.flex_main")

# Flags that take no value in EmbedOptions (argparse store_true).
BOOLEAN_FLAGS = ("document_vectors",)
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no", "")


def normalize_boolean_flags(argv: Sequence[str]) -> list[str]:
    """``--flag=true`` -> ``--flag``; ``--flag=false`` -> nothing.

    Raises ``UsageError`` for any other value of a boolean flag.
    """
    normalized = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if not (sep and name.lstrip("-") in BOOLEAN_FLAGS):
            normalized.append(arg)
        elif value.lower() in _TRUE:
            normalized.append(name)
        elif value.lower() not in _FALSE:
            raise UsageError(f"{name} takes true or false, got {value!r}")
    return normalized


def launch(argv: Sequence[str]) -> PipelineResult:
    """Resolves the job, builds the graph and submits it (no waiting)."""
    options = PipelineOptions(normalize_boolean_flags(argv))
    if options.view_as(EmbedOptions).model is None:
        raise UsageError("--model is required for a Dataflow launch (a "
                         "gs:// SavedModel directory the workers can read)")
    config, _ = resolve_config(options.view_as(EmbedOptions))
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, config)
    return pipeline.run()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit 0 once submitted, 2 on bad usage (one line on stderr)."""
    logging.basicConfig(level=logging.INFO)
    try:
        result = launch(list(sys.argv[1:] if argv is None else argv))
    except (UsageError, FileNotFoundError, ModelFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if getattr(result, "has_job", False):
        _LOG.info("Submitted Dataflow job %s", result.job_id())
    return 0


if __name__ == "__main__":
    sys.exit(main())
