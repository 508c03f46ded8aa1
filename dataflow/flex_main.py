"""Flex Template entry point: the launch of ``python -m pipeline.run``.

The Dataflow Flex Template launcher runs this file
(``FLEX_TEMPLATE_PYTHON_PY_FILE``) with the template's parameters as
``--name=value`` flags, plus the Dataflow options it adds (``--runner``,
``--project``, ``--region``, ``--temp_location``, ...).  It hands them to
``pipeline.run.main``, so a Flex launch is the same run as any other: the
job writes into a staging directory, the launcher waits for it, checks the
counts and publishes the files, ``<output>-summary.json`` and the manifest
(last), which a later run can take as ``--previous_index``; the exit codes
are the same too.  Only one thing is translated: boolean parameters arrive
as ``--dedup=true|false`` and become the plain flag the job's options
expect.  The parameters are listed in ``flex_template_metadata.json``,
generated from the job's flags by ``flex_metadata.py``.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from pipeline.cli import UsageError, exit_on_interrupt

if __name__ == "__main__":
    exit_on_interrupt()  # before the slow imports below

# pylint: disable=wrong-import-position
from pipeline.options import embed_flags
from pipeline.run import EXIT_USAGE
from pipeline.run import main as run_main

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no", "")


def boolean_flags() -> tuple[str, ...]:
    """The job's flags that take no value (argparse ``store_true``)."""
    return tuple(name for name, action in embed_flags().items()
                 if action.nargs == 0)


def normalize_boolean_flags(argv: Sequence[str]) -> list[str]:
    """``--flag=true`` -> ``--flag``; ``--flag=false`` -> nothing.

    Raises ``UsageError`` for any other value of a boolean flag.
    """
    booleans = boolean_flags()
    normalized = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if not (sep and name.startswith("--") and name[2:] in booleans):
            normalized.append(arg)
        elif value.lower() in _TRUE:
            normalized.append(name)
        elif value.lower() not in _FALSE:
            raise UsageError(f"{name} takes true or false, got {value!r}")
    return normalized


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``pipeline.run.main`` on the normalized flags; its exit code."""
    try:
        args = normalize_boolean_flags(
            list(sys.argv[1:] if argv is None else argv))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return run_main(args)


if __name__ == "__main__":
    sys.exit(main())
