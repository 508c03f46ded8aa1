"""Loading a BERT SavedModel with the TF Hub interface, and its tokenizer
settings.

The TF Hub Chinese BERT (``bert_zh_L-12_H-768_A-12``) and the models that
``model.export`` writes are restored objects callable as
``model([input_word_ids, input_mask, segment_ids])`` that return
``[pooled_output, sequence_output]``, carrying a ``vocab_file`` asset and a
``do_lower_case`` variable.  ``read_tokenizer_settings`` reads the latter two
straight from the SavedModel's files, without building the TensorFlow graph,
so that the launcher can configure tokenization cheaply.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Optional

import numpy as np

_LOG = logging.getLogger(__name__)

_VOCAB_ATTR = "vocab_file"
_LOWER_CASE_ATTR = "do_lower_case"

_load_lock = threading.Lock()
_load_count = 0


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
    """Where the model's vocabulary is and whether it expects lower case."""
    vocab_path: str
    do_lower_case: bool


class ModelFormatError(ValueError):
    """The path is not a BERT SavedModel with the expected interface."""


def _join(*parts: str) -> str:
    from apache_beam.io.filesystems import FileSystems
    return FileSystems.join(*parts)


def _read_saved_model_proto(model_dir: str):
    """The parsed ``saved_model.pb`` of ``model_dir`` (local or cloud path)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2
    path = _join(model_dir, "saved_model.pb")
    if not tf.io.gfile.exists(path):
        raise ModelFormatError(
            f"{model_dir} is not a SavedModel directory (no saved_model.pb)")
    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(path, "rb") as handle:
        proto.ParseFromString(handle.read())
    return proto


def read_tokenizer_settings(model_dir: str) -> Optional[TokenizerSettings]:
    """The vocab path and ``do_lower_case`` stored in the SavedModel.

    Returns ``None`` when the model carries no ``vocab_file`` asset (callers
    then need an explicit ``--vocab_file``).  A model with a vocab asset but
    no ``do_lower_case`` variable is taken as lower-casing, as BERT's Chinese
    model is.
    """
    import tensorflow as tf
    meta_graph = _read_saved_model_proto(model_dir).meta_graphs[0]
    graph = meta_graph.object_graph_def
    root_children = {c.local_name: c.node_id for c in graph.nodes[0].children}
    if _VOCAB_ATTR not in root_children:
        return None
    asset_node = graph.nodes[root_children[_VOCAB_ATTR]]
    if asset_node.WhichOneof("kind") != "asset":
        return None
    filename = meta_graph.asset_file_def[
        asset_node.asset.asset_file_def_index].filename
    vocab_path = _join(model_dir, "assets", filename)
    do_lower_case = True
    if _LOWER_CASE_ATTR in root_children:
        reader = tf.train.load_checkpoint(
            _join(model_dir, "variables", "variables"))
        key = f"{_LOWER_CASE_ATTR}/.ATTRIBUTES/VARIABLE_VALUE"
        if reader.has_tensor(key):
            do_lower_case = bool(reader.get_tensor(key))
    return TokenizerSettings(vocab_path, do_lower_case)


class BertSavedModel:
    """A loaded BERT encoder that maps int32 id arrays to numpy embeddings."""

    def __init__(self, model_dir: str, restored) -> None:
        self.model_dir = model_dir
        self._restored = restored
        if not callable(restored):
            raise ModelFormatError(
                f"{model_dir}: the SavedModel's root object is not callable "
                "as model([input_word_ids, input_mask, segment_ids])")

    def __call__(self, input_word_ids: np.ndarray, input_mask: np.ndarray,
                 segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pooled_output [B, H], sequence_output [B, S, H])`` as float32."""
        import tensorflow as tf
        inputs = [tf.convert_to_tensor(a, dtype=tf.int32)
                  for a in (input_word_ids, input_mask, segment_ids)]
        pooled, sequence = self._restored(inputs)
        return (np.asarray(pooled, dtype=np.float32),
                np.asarray(sequence, dtype=np.float32))


def load_bert_saved_model(model_dir: str) -> BertSavedModel:
    """Restores the SavedModel at ``model_dir`` (local or ``gs://``)."""
    global _load_count
    import tensorflow as tf
    _read_saved_model_proto(model_dir)  # a clear error for a non-model dir
    started = time.perf_counter()
    restored = tf.saved_model.load(model_dir)
    model = BertSavedModel(model_dir, restored)
    with _load_lock:
        _load_count += 1
        count = _load_count
    _LOG.info("Loaded BERT SavedModel %s in %.1f s (pid %d, load #%d in "
              "this process)", model_dir, time.perf_counter() - started,
              os.getpid(), count)
    return model


def load_count() -> int:
    """How many times this process has loaded a model (for tests and logs)."""
    return _load_count


def infer_hidden_size(model_dir: str, vocab_size: int) -> int:
    """The model's hidden size, read from its word-embedding table's shape.

    The table is the one ``[vocab_size, hidden]`` variable in the
    checkpoint; a model with none (or several candidates) is an error, as is
    a vocabulary whose size matches no embedding table.
    """
    import tensorflow as tf
    shapes = tf.train.list_variables(_join(model_dir, "variables",
                                           "variables"))
    candidates = {shape[1] for name, shape in shapes
                  if len(shape) == 2 and shape[0] == vocab_size
                  and "embedding" in name.lower()}
    if len(candidates) != 1:
        tables = sorted(f"{name} {shape}" for name, shape in shapes
                        if "word_embeddings" in name or "embedding" in name)
        raise ModelFormatError(
            f"{model_dir}: found no single [vocab_size={vocab_size}, hidden] "
            f"word-embedding table (the vocab does not fit the model?); "
            f"embedding variables: {'; '.join(tables) or 'none'}")
    return int(candidates.pop())
