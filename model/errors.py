"""The one-line errors about a model, raised wherever a model is found,
read, checked or run (``model.handles``, ``model.signature``,
``model.variables``, ``model.vocab``, ``model.load``, the engines), and
``one_line``, which keeps wrapped library errors on one line."""

from __future__ import annotations

from typing import Any


class ModelFormatError(ValueError):
    """The path is not a BERT SavedModel with a supported interface."""


class SequenceLengthError(ModelFormatError):
    """The run's ``max_seq_length`` is longer than the model's position
    table (a usage error: launchers exit 2 on it, as on other
    ``ModelFormatError``s)."""


class ModelInputError(ValueError):
    """Arrays handed to the model are not a valid BERT batch."""


def one_line(text: Any) -> str:
    """``text`` with all whitespace runs (newlines included) collapsed, so
    wrapped TensorFlow errors still print as a single line."""
    return " ".join(str(text).split())
