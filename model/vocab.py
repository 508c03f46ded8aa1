"""The model's vocabulary: reading a WordPiece vocabulary file
(``load_vocab``, the one reader every tool and the pipeline use), and
finding a SavedModel's vocab asset and ``do_lower_case`` straight from its
files, without building the TensorFlow graph, so that a launcher can
configure tokenization cheaply (``read_tokenizer_settings``)."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import re
from typing import Optional

from model.errors import ModelFormatError
from model.handles import join_path, resolve_model_path
from model.signature import breadth_first, read_saved_model_proto
from model.variables import read_lower_case_flag

_LOG = logging.getLogger(__name__)

# The usual name of a vocabulary file: in Google and Hugging Face
# checkpoints, and the asset of the models model.export writes.
VOCAB_FILENAME = "vocab.txt"

_VOCAB_ATTR = "vocab_file"
_LOWER_CASE_FLAG = "do_lower_case"
_VOCAB_PATTERN = "vocab*.txt"
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def load_vocab(path: str) -> list[str]:
    """Read a WordPiece vocabulary: one token per line, UTF-8, id = line number.

    Only the line terminator (``\\n`` or ``\\r\\n``) is removed, tokens are kept
    otherwise verbatim. Paths with a URL scheme (``gs://...``) are read through
    ``tf.io.gfile`` so the pipeline can run on Dataflow; TensorFlow is imported
    only in that case because it is slow to import and not needed locally.
    """
    if _URL_SCHEME.match(path):
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        with tf.io.gfile.GFile(path, "rb") as handle:
            data = handle.read()
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    else:
        with open(path, "r", encoding="utf-8", newline="") as handle:
            text = handle.read()
    return _split_vocab_lines(text)


def _split_vocab_lines(text: str) -> list[str]:
    """Split file content into tokens, removing only line terminators."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline after the last token does not start a token
    return [line[:-1] if line.endswith("\r") else line for line in lines]


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
    """Where the model's vocabulary is and whether it expects lower case."""
    vocab_path: str
    do_lower_case: bool


def _find_vocab_filename(meta_graph) -> Optional[str]:
    """The vocab asset's file name (relative to ``assets/``), or None.

    Prefers the root's ``vocab_file`` asset (TF Hub convention); otherwise
    takes the asset nearest the root whose file is named ``vocab*.txt``,
    and finally any such file among the meta graph's asset files.
    """
    graph = meta_graph.object_graph_def
    asset_files = meta_graph.asset_file_def

    def filename(node) -> str:
        return asset_files[node.asset.asset_file_def_index].filename

    def is_vocab(name: str) -> bool:
        return fnmatch.fnmatch(os.path.basename(name).lower(), _VOCAB_PATTERN)

    for child in graph.nodes[0].children:
        node = graph.nodes[child.node_id]
        if child.local_name == _VOCAB_ATTR and node.WhichOneof("kind") == "asset":
            return filename(node)
    for node_id, _ in breadth_first(graph.nodes, lambda n: n.children):
        node = graph.nodes[node_id]
        if node.WhichOneof("kind") == "asset" and is_vocab(filename(node)):
            return filename(node)
    for asset in asset_files:
        if is_vocab(asset.filename):
            return asset.filename
    return None


def read_tokenizer_settings(model_dir: str) -> Optional[TokenizerSettings]:
    """The vocab path and ``do_lower_case`` stored in the SavedModel.

    ``model_dir`` may also be a TF Hub handle (see ``resolve_model_path``).
    Returns ``None`` when the model carries no vocab asset (callers then
    need an explicit ``--vocab_file``).  A model with a vocab asset but no
    ``do_lower_case`` variable is taken as lower-casing, as BERT's Chinese
    model is; that choice is logged.
    """
    from model.facts import remembered
    model_dir = resolve_model_path(model_dir)
    filename = remembered(model_dir, "vocab_asset", lambda: (
        _find_vocab_filename(
            read_saved_model_proto(model_dir).meta_graphs[0])))
    if filename is None:
        return None
    vocab_path = join_path(model_dir, "assets", filename)
    do_lower_case = read_lower_case_flag(model_dir)
    if do_lower_case is None:
        _LOG.info("%s has no %s variable; assuming do_lower_case=True "
                  "(override with --do_lower_case)", model_dir,
                  _LOWER_CASE_FLAG)
        do_lower_case = True
    return TokenizerSettings(vocab_path, do_lower_case)


def tokenizer_settings_with_overrides(
        model_dir: str, vocab_file: Optional[str] = None,
        do_lower_case: Optional[bool] = None) -> TokenizerSettings:
    """The model's tokenizer settings with explicit flags taking precedence.

    Raises:
      ModelFormatError: the model has no vocab asset and no ``vocab_file``
        was given.
    """
    stored = read_tokenizer_settings(model_dir)
    vocab_path = vocab_file or (stored.vocab_path if stored else None)
    if not vocab_path:
        raise ModelFormatError(
            f"{model_dir} carries no vocab asset: pass --vocab_file")
    if do_lower_case is None:
        do_lower_case = stored.do_lower_case if stored else True
    return TokenizerSettings(vocab_path, do_lower_case)
