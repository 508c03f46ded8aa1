"""What a SavedModel's variables say, read from its checkpoint without
restoring or running the model: the ``do_lower_case`` flag and the sizes
of the embedding tables (``ModelLimits``), which bound the inputs the
model accepts and give its hidden size.  Launchers check a model with
these before any worker starts."""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional

import numpy as np

from model.errors import ModelFormatError, SequenceLengthError, one_line
from model.handles import join_path, resolve_model_path
from model.signature import breadth_first, read_saved_model_proto

_LOWER_CASE_ATTR = "do_lower_case"
_VARIABLE_VALUE = "VARIABLE_VALUE"
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


@dataclasses.dataclass(frozen=True)
class ModelLimits:
    """Sizes of the model's embedding tables, which bound its inputs; None
    where the model does not name the table (see ``read_model_limits``).

    ``vocab_size`` bounds ``input_word_ids``, ``type_vocab_size`` bounds
    ``segment_ids``, ``max_positions`` bounds the sequence length;
    ``position_table`` names the position table (for messages).
    """
    vocab_size: Optional[int] = None
    type_vocab_size: Optional[int] = None
    max_positions: Optional[int] = None
    position_table: Optional[str] = None


def _variables_reader(model_dir: str):
    """Checkpoint reader of a SavedModel's ``variables/variables``.

    Opens the prefix directly (not ``tf.train.load_checkpoint``, which
    mistakes a prefix for a directory on prefix-based file systems).
    """
    import tensorflow as tf
    prefix = join_path(model_dir, "variables", "variables")
    return tf.compat.v1.train.NewCheckpointReader(prefix)


def _checkpoint_object_graph(reader):
    """The checkpoint's own object graph (which names every variable's
    checkpoint key and full name), or None when it has none."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2
    if not reader.has_tensor(_OBJECT_GRAPH_KEY):
        return None
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(_OBJECT_GRAPH_KEY))
    return graph


def read_lower_case_flag(model_dir: str) -> Optional[bool]:
    """Value of the ``do_lower_case`` variable nearest the root, if any.

    Looks the variable up in the checkpoint's own object graph, so its
    checkpoint key is exact wherever in the model it is attached.  Kept
    per model (``model.facts``).
    """
    from model.facts import remembered
    return remembered(model_dir, "do_lower_case_variable",
                      lambda: _read_lower_case_flag(model_dir))


def _read_lower_case_flag(model_dir: str) -> Optional[bool]:
    import tensorflow as tf
    try:
        reader = _variables_reader(model_dir)
    except (tf.errors.OpError, ValueError):
        return None  # a model without variables
    graph = _checkpoint_object_graph(reader)
    if graph is None:
        return None
    for node_id, name in breadth_first(graph.nodes, lambda n: n.children):
        if name != _LOWER_CASE_ATTR:
            continue
        for attribute in graph.nodes[node_id].attributes:
            if (attribute.name == _VARIABLE_VALUE
                    and reader.has_tensor(attribute.checkpoint_key)):
                return bool(np.asarray(
                    reader.get_tensor(attribute.checkpoint_key)))
    return None


@dataclasses.dataclass(frozen=True)
class _Table:
    """A 2-D variable of the checkpoint: its checkpoint key, the variable's
    own name (empty where the checkpoint does not record it) and shape."""
    key: str
    full_name: str
    shape: tuple[int, ...]

    def mentions(self, word: str) -> bool:
        """Whether the key or the variable name contains ``word``."""
        return word in f"{self.key} {self.full_name}".lower()


# Roles of the embedding tables, and the words that name each (in the
# checkpoint key or the variable name): Google/TF Hub/Hugging Face names
# are word_embeddings, position_embedding(s), token_type/type_embeddings.
_TABLE_ROLES = {"word": ("word",), "position": ("position",),
                "type": ("type", "segment")}


def _embedding_tables(model_dir: str) -> list[_Table]:
    """The checkpoint's 2-D variables whose key or name mentions
    embeddings, read from the variables' index (nothing is restored or
    run), so the launcher can check the model cheaply; kept per model
    (``model.facts``)."""
    from model.facts import remembered
    return remembered(
        model_dir, "embedding_tables",
        lambda: _read_embedding_tables(model_dir),
        encode=lambda tables: [dataclasses.asdict(t) for t in tables],
        decode=lambda values: [
            _Table(str(v["key"]), str(v["full_name"]),
                   tuple(int(d) for d in v["shape"])) for v in values])


def _read_embedding_tables(model_dir: str) -> list[_Table]:
    import tensorflow as tf
    read_saved_model_proto(model_dir)  # a clear error for a non-model dir
    try:
        reader = _variables_reader(model_dir)
        shapes = reader.get_variable_to_shape_map()
        graph = _checkpoint_object_graph(reader)
    except (tf.errors.OpError, ValueError) as err:
        raise ModelFormatError(f"{model_dir}: cannot read the SavedModel's "
                               f"variables: {one_line(err)}") from err
    full_names = ({a.checkpoint_key: a.full_name for node in graph.nodes
                   for a in node.attributes} if graph is not None else {})
    tables = [_Table(key, full_names.get(key, ""), tuple(shape))
              for key, shape in shapes.items() if len(shape) == 2]
    return [t for t in tables if t.mentions("embedding")]


def _role_of(table: _Table) -> Optional[str]:
    """The one role (``_TABLE_ROLES``) a table's names point to, or None
    when they point to none or to several."""
    roles = [role for role, words in _TABLE_ROLES.items()
             if any(table.mentions(w) for w in words)]
    return roles[0] if len(roles) == 1 else None


def read_model_limits(model_dir: str) -> ModelLimits:
    """The sizes of the model's word, token-type and position tables (their
    first dimensions), read from the SavedModel's variables without
    restoring or running it.

    A table is known by its name; a role that no table (or several tables
    of different sizes) claims stays None, so that checks which need it are
    skipped rather than guessed.
    """
    model_dir = resolve_model_path(model_dir)
    by_role: dict[str, list[_Table]] = collections.defaultdict(list)
    for table in _embedding_tables(model_dir):
        role = _role_of(table)
        if role is not None:
            by_role[role].append(table)

    def rows(role: str) -> Optional[int]:
        sizes = {t.shape[0] for t in by_role[role]}
        return int(sizes.pop()) if len(sizes) == 1 else None

    positions = rows("position")
    position_table = None
    if positions is not None:
        table = by_role["position"][0]
        position_table = (f"{table.full_name or table.key} "
                          f"{list(table.shape)}")
    return ModelLimits(rows("word"), rows("type"), positions, position_table)


def check_max_seq_length(model_dir: str, max_seq_length: int,
                         flag: str = "--max_seq_length") -> ModelLimits:
    """The model's limits, once ``max_seq_length`` fits its position table.

    Launchers call this before any work: a longer setting would make every
    longer document fail at inference.  A model whose position table is
    not known by name is not checked.

    Raises:
      SequenceLengthError: ``max_seq_length`` exceeds the model's positions.
    """
    limits = read_model_limits(model_dir)
    positions = limits.max_positions
    if positions is not None and max_seq_length > positions:
        raise SequenceLengthError(
            f"{flag} {max_seq_length} exceeds the model's {positions} "
            f"positions (position table {limits.position_table} in "
            f"{model_dir}); use {flag} {positions} or less")
    return limits


def infer_hidden_size(model_dir: str, vocab_size: int) -> int:
    """The model's hidden size, read from its word-embedding table's shape.

    The table is the one ``[vocab_size, hidden]`` variable in the
    checkpoint whose name mentions embeddings; a model with none (the
    vocabulary does not fit the model) or several disagreeing candidates is
    an error.
    """
    model_dir = resolve_model_path(model_dir)
    tables = _embedding_tables(model_dir)
    candidates = {t.shape[1] for t in tables if t.shape[0] == vocab_size}
    if len(candidates) == 1:
        return int(candidates.pop())
    listed = "; ".join(sorted(f"{t.key} {list(t.shape)}" for t in tables))
    if not candidates:
        raise ModelFormatError(
            f"{model_dir}: the vocabulary has {vocab_size} entries but no "
            f"word-embedding table has {vocab_size} rows (wrong vocab for "
            f"this model?); embedding tables: {listed or 'none'}")
    raise ModelFormatError(
        f"{model_dir}: several [vocab_size={vocab_size}, hidden] embedding "
        f"tables with different widths: {listed}")
