"""Loading a BERT SavedModel, whatever its interface, and its tokenizer
settings.

Three interfaces are recognised (checked in this order):

``list``
    The TF Hub legacy module (``bert_zh_L-12_H-768_A-12/1``) and the models
    ``model.export`` writes: ``model([input_word_ids, input_mask,
    segment_ids])`` returns ``[pooled_output, sequence_output]``.
``dict``
    Newer TF Hub / Kaggle BERT encoders: ``model({"input_word_ids": ...,
    "input_mask": ..., "segment_ids": ...})`` returns a dict with
    ``pooled_output`` and ``sequence_output`` (``encoder_outputs`` and any
    other keys are ignored).
``signature``
    Any SavedModel whose ``serving_default`` signature takes those three
    inputs by name and returns those two outputs by name.

Models may be local directories, paths on any TensorFlow file system
(``gs://...``), or TF Hub / Kaggle handles resolved by ``resolve_model_path``
(needs the optional ``tensorflow_hub`` package; a pre-filled
``TFHUB_CACHE_DIR`` makes that work offline).

With ``jit_compile`` the call is compiled by XLA (once per input shape),
which fuses the elementwise work between the matmuls (layer norm, GELU,
softmax); a model that XLA cannot compile falls back to plain TensorFlow
with one warning.

``read_tokenizer_settings`` reads the vocab asset and ``do_lower_case``
straight from the SavedModel's files, without building the TensorFlow
graph, so that the launcher can configure tokenization cheaply.  Every error
about the model is a ``ModelFormatError`` with a one-line message.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import logging
import os
import threading
import time
from typing import Any, Callable, Iterator, Optional

import numpy as np

from model.xla_cache import CompileCache

_LOG = logging.getLogger(__name__)

_VOCAB_ATTR = "vocab_file"
_LOWER_CASE_ATTR = "do_lower_case"
_VOCAB_PATTERN = "vocab*.txt"
_VARIABLE_VALUE = "VARIABLE_VALUE"
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"

INPUT_NAMES = ("input_word_ids", "input_mask", "segment_ids")
OUTPUT_NAMES = ("pooled_output", "sequence_output")
INTERFACES = ("list", "dict", "signature")

# Handle prefixes that only tensorflow_hub can turn into a local directory.
_HUB_URL_PREFIXES = ("http://", "https://")
_HUB_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")

_load_lock = threading.Lock()
_load_count = 0
# One XLA compile at a time in this process (see _invoke_compiled).
_compile_lock = threading.Lock()


@dataclasses.dataclass
class CompileStats:
    """XLA compilations in this process: input shapes compiled, and the
    seconds and padded tokens (batch x width) of their first calls
    (compile plus one run)."""
    shapes: int = 0
    first_call_seconds: float = 0.0
    first_call_tokens: int = 0


_compile_stats = CompileStats()


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
    """Where the model's vocabulary is and whether it expects lower case."""
    vocab_path: str
    do_lower_case: bool


class ModelFormatError(ValueError):
    """The path is not a BERT SavedModel with a supported interface."""


def _one_line(text: Any) -> str:
    """``text`` with all whitespace runs (newlines included) collapsed, so
    wrapped TensorFlow errors still print as a single line."""
    return " ".join(str(text).split())


def _join(base: str, *parts: str) -> str:
    """Join path parts for local paths and URL-like paths (``gs://``,
    ``ram://``) alike; URL paths always use ``/``."""
    if "://" in base:
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def is_hub_handle(handle: str) -> bool:
    """Whether ``handle`` needs ``tensorflow_hub`` to become a directory:
    an http(s) URL (tfhub.dev, Kaggle model URLs, mirrors) or a ``gs://``
    tarball."""
    if handle.startswith(_HUB_URL_PREFIXES):
        return True
    return handle.startswith("gs://") and handle.endswith(_HUB_ARCHIVE_SUFFIXES)


def resolve_model_path(handle: str) -> str:
    """The SavedModel directory that ``handle`` names.

    Local paths and TensorFlow file-system paths (``gs://bucket/model``) are
    returned unchanged.  TF Hub handles (``https://tfhub.dev/...``, Kaggle
    model URLs ``https://www.kaggle.com/models/...``) go through
    ``tensorflow_hub.resolve``, which downloads into ``TFHUB_CACHE_DIR`` or
    reuses what is already cached there (so a pre-filled cache works
    offline).

    Raises:
      ModelFormatError: a hub handle without ``tensorflow_hub`` installed, or
        one that cannot be resolved (network, unknown model).
    """
    if not is_hub_handle(handle):
        return handle
    try:
        import tensorflow_hub as hub
    except ImportError as err:
        raise ModelFormatError(
            f"{handle} is a TF Hub handle but tensorflow_hub is not "
            "installed: pip install tensorflow_hub, or download the model "
            "and pass its directory") from err
    try:
        path = hub.resolve(handle)
    except Exception as err:  # network, HTTP, tar and file-system errors
        raise ModelFormatError(
            f"cannot resolve TF Hub handle {handle}: "
            f"{type(err).__name__}: {_one_line(err)}") from err
    _LOG.info("Resolved %s to %s", handle, path)
    return path


def _read_saved_model_proto(model_dir: str):
    """The parsed ``saved_model.pb`` of ``model_dir`` (local or cloud path)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2
    path = _join(model_dir, "saved_model.pb")
    if not tf.io.gfile.exists(path):
        what = ("does not exist" if not tf.io.gfile.exists(model_dir)
                else "is not a SavedModel directory (no saved_model.pb)")
        raise ModelFormatError(f"{model_dir} {what}")
    proto = saved_model_pb2.SavedModel()
    try:
        with tf.io.gfile.GFile(path, "rb") as handle:
            proto.ParseFromString(handle.read())
    except Exception as err:  # DecodeError and file-system errors
        raise ModelFormatError(f"{path} cannot be parsed as a SavedModel: "
                               f"{_one_line(err)}") from err
    if not proto.meta_graphs:
        raise ModelFormatError(f"{path} holds no meta graph")
    return proto


def _breadth_first(nodes, children_of: Callable[[Any], Any]
                   ) -> Iterator[tuple[int, str]]:
    """``(node_id, local_name)`` for every node reachable from node 0 of an
    object graph, nearest to the root first (each node once)."""
    seen = {0}
    queue = collections.deque([0])
    while queue:
        for child in children_of(nodes[queue.popleft()]):
            if child.node_id not in seen:
                seen.add(child.node_id)
                queue.append(child.node_id)
                yield child.node_id, child.local_name


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
    for node_id, _ in _breadth_first(graph.nodes, lambda n: n.children):
        node = graph.nodes[node_id]
        if node.WhichOneof("kind") == "asset" and is_vocab(filename(node)):
            return filename(node)
    for asset in asset_files:
        if is_vocab(asset.filename):
            return asset.filename
    return None


def _variables_reader(model_dir: str):
    """Checkpoint reader of a SavedModel's ``variables/variables``.

    Opens the prefix directly (not ``tf.train.load_checkpoint``, which
    mistakes a prefix for a directory on prefix-based file systems).
    """
    import tensorflow as tf
    prefix = _join(model_dir, "variables", "variables")
    return tf.compat.v1.train.NewCheckpointReader(prefix)


def _read_lower_case_flag(model_dir: str) -> Optional[bool]:
    """Value of the ``do_lower_case`` variable nearest the root, if any.

    Looks the variable up in the checkpoint's own object graph, so its
    checkpoint key is exact wherever in the model it is attached.
    """
    import tensorflow as tf
    from tensorflow.core.protobuf import trackable_object_graph_pb2
    try:
        reader = _variables_reader(model_dir)
    except (tf.errors.OpError, ValueError):
        return None  # a model without variables
    if not reader.has_tensor(_OBJECT_GRAPH_KEY):
        return None
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(_OBJECT_GRAPH_KEY))
    for node_id, name in _breadth_first(graph.nodes, lambda n: n.children):
        if name != _LOWER_CASE_ATTR:
            continue
        for attribute in graph.nodes[node_id].attributes:
            if (attribute.name == _VARIABLE_VALUE
                    and reader.has_tensor(attribute.checkpoint_key)):
                return bool(np.asarray(
                    reader.get_tensor(attribute.checkpoint_key)))
    return None


def read_tokenizer_settings(model_dir: str) -> Optional[TokenizerSettings]:
    """The vocab path and ``do_lower_case`` stored in the SavedModel.

    ``model_dir`` may also be a TF Hub handle (see ``resolve_model_path``).
    Returns ``None`` when the model carries no vocab asset (callers then
    need an explicit ``--vocab_file``).  A model with a vocab asset but no
    ``do_lower_case`` variable is taken as lower-casing, as BERT's Chinese
    model is; that choice is logged.
    """
    model_dir = resolve_model_path(model_dir)
    meta_graph = _read_saved_model_proto(model_dir).meta_graphs[0]
    filename = _find_vocab_filename(meta_graph)
    if filename is None:
        return None
    vocab_path = _join(model_dir, "assets", filename)
    do_lower_case = _read_lower_case_flag(model_dir)
    if do_lower_case is None:
        _LOG.info("%s has no %s variable; assuming do_lower_case=True "
                  "(override with --do_lower_case)", model_dir,
                  _LOWER_CASE_ATTR)
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


# --- interface detection -------------------------------------------------


def _is_spec(value: Any) -> bool:
    """Whether ``value`` is a ``tf.TensorSpec`` (as in traced signatures)."""
    import tensorflow as tf
    return isinstance(value, tf.TensorSpec)


def _has_outputs(outputs: Any, interface: str) -> bool:
    """Whether traced ``outputs`` look like the interface's results."""
    if isinstance(outputs, dict):
        return set(OUTPUT_NAMES) <= set(outputs)
    return (interface == "list" and isinstance(outputs, (list, tuple))
            and len(outputs) >= 2)


def _interface_of(args: tuple, outputs: Any) -> Optional[str]:
    """``list``/``dict`` when a traced call's first argument and outputs fit
    that interface, else None."""
    if not args:
        return None
    first = args[0]
    if (isinstance(first, (list, tuple)) and len(first) == len(INPUT_NAMES)
            and all(_is_spec(s) for s in first)):
        interface = "list"
    elif (isinstance(first, dict) and set(first) == set(INPUT_NAMES)
          and all(_is_spec(s) for s in first.values())):
        interface = "dict"
    else:
        return None
    return interface if _has_outputs(outputs, interface) else None


def _call_candidates(restored) -> list[tuple[str, Any]]:
    """``(interface, input specs)`` for each traced root call that fits."""
    function = getattr(restored, "__call__", None) if callable(restored) else None
    found = []
    for concrete in getattr(function, "concrete_functions", ()) or ():
        args, _ = concrete.structured_input_signature
        interface = _interface_of(args, concrete.structured_outputs)
        if interface:
            found.append((interface, args[0]))
    return found


def _accepts_training(restored) -> bool:
    """Whether the root call takes a ``training`` argument (Keras models),
    which must then be passed as False to disable dropout."""
    function_type = getattr(restored.__call__, "function_type", None)
    parameters = getattr(function_type, "parameters", {}) or {}
    return "training" in parameters


def _signature_fits(signature) -> bool:
    """Whether a signature has exactly the BERT inputs and both outputs."""
    _, inputs = signature.structured_input_signature
    return (set(inputs) == set(INPUT_NAMES)
            and set(OUTPUT_NAMES) <= set(signature.structured_outputs))


def _describe(restored) -> str:
    """Short account of what a restored object offers, for error messages."""
    function = getattr(restored, "__call__", None) if callable(restored) else None
    calls = [str(c.structured_input_signature[0]) for c in
             getattr(function, "concrete_functions", ()) or ()]
    signatures = sorted(getattr(restored, "signatures", {}) or {})
    return (f"root calls: {'; '.join(calls) or 'none'}; signatures: "
            f"{', '.join(signatures) or 'none'}")


class BertSavedModel:
    """A loaded BERT encoder that maps int32 id arrays to numpy embeddings.

    ``interface`` says how the SavedModel is called: ``list``, ``dict`` or
    ``signature`` (see the module docstring).  ``jit_compile`` says whether
    calls go through XLA (it turns False if XLA fails on this model); what
    XLA compiles is published to ``compile_cache`` for later runs (see
    ``model.xla_cache``).
    """

    def __init__(self, model_dir: str, restored,
                 jit_compile: bool = False,
                 compile_cache: Optional[CompileCache] = None) -> None:
        """Detect the interface of ``restored``.

        Raises:
          ModelFormatError: none of the supported interfaces fits.
        """
        self.model_dir = model_dir
        self._restored = restored
        self.interface, self._input_dtypes = self._detect()
        self._training_kwargs = (
            {"training": False}
            if self.interface != "signature" and _accepts_training(restored)
            else {})
        self._compiled = None
        self._compiled_shapes: set[tuple[int, ...]] = set()
        self._compile_cache = compile_cache
        if jit_compile:
            import tensorflow as tf
            # One trace for every batch shape (XLA still compiles each
            # shape), so that the traced function, and with it the compile
            # cache's key, does not depend on which shape came first.
            spec = {name: tf.TensorSpec([None, None], dtype, name=name)
                    for name, dtype in self._input_dtypes.items()}
            self._compiled = tf.function(self._invoke, jit_compile=True,
                                         input_signature=[spec])

    @property
    def jit_compile(self) -> bool:
        return self._compiled is not None

    def _detect(self) -> tuple[str, dict[str, Any]]:
        """The first fitting interface and the input dtypes it expects."""
        candidates = _call_candidates(self._restored)
        for wanted in ("list", "dict"):
            for interface, specs in candidates:
                if interface != wanted:
                    continue
                if interface == "list":
                    specs = dict(zip(INPUT_NAMES, specs))
                return interface, {k: s.dtype for k, s in specs.items()}
        signature = (getattr(self._restored, "signatures", {}) or {}).get(
            "serving_default")
        if signature is not None and _signature_fits(signature):
            _, specs = signature.structured_input_signature
            return "signature", {k: s.dtype for k, s in specs.items()}
        raise ModelFormatError(
            f"{self.model_dir}: SavedModel has no BERT interface (expected "
            "model([input_word_ids, input_mask, segment_ids]) -> [pooled, "
            "sequence], model({input_word_ids, input_mask, segment_ids}) -> "
            "{pooled_output, sequence_output, ...}, or a serving_default "
            "signature with those inputs and outputs); found "
            + _one_line(_describe(self._restored)))

    def _invoke(self, inputs: dict[str, Any]) -> Any:
        """Call the restored model through the detected interface."""
        if self.interface == "list":
            return self._restored([inputs[n] for n in INPUT_NAMES],
                                  **self._training_kwargs)
        if self.interface == "dict":
            return self._restored(inputs, **self._training_kwargs)
        return self._restored.signatures["serving_default"](**inputs)

    def _invoke_compiled(self, inputs: dict[str, Any]) -> Any:
        """Call through XLA.  A new input shape compiles first (about a
        second for BERT-Base on a CPU, logged); compiles run one at a time
        in this process, so that the compile cache only ever publishes
        whole entries."""
        shape = tuple(inputs[INPUT_NAMES[0]].shape)
        if shape in self._compiled_shapes:
            return self._call_xla(inputs)
        with _compile_lock:
            if shape in self._compiled_shapes:
                return self._call_xla(inputs)
            started = time.perf_counter()
            outputs = self._call_xla(inputs)
            if self._compiled is not None:
                self._record_compile(shape, time.perf_counter() - started)
            return outputs

    def _call_xla(self, inputs: dict[str, Any]) -> Any:
        """The compiled call; on an XLA error, warn once and go on (this
        call included) without XLA."""
        import tensorflow as tf
        try:
            return self._compiled(inputs)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
                tf.errors.InternalError) as err:
            # Bad input fails here too and keeps XLA on; otherwise XLA
            # was the problem.
            outputs = self._invoke(inputs)
            _LOG.warning("XLA cannot compile %s (%s); running it without "
                         "XLA", self.model_dir, _one_line(err)[:300])
            self._compiled = None
            return outputs

    def _record_compile(self, shape: tuple[int, ...], seconds: float) -> None:
        """Counts a new shape's first call and publishes what it compiled."""
        self._compiled_shapes.add(shape)
        with _load_lock:
            _compile_stats.shapes += 1
            _compile_stats.first_call_seconds += seconds
            _compile_stats.first_call_tokens += int(np.prod(shape))
        published = (self._compile_cache.publish()
                     if self._compile_cache is not None else 0)
        _LOG.info("XLA compiled the model for input shape %s (first call "
                  "%.1f s; %d shapes in this model; %d new cache entries)",
                  list(shape), seconds, len(self._compiled_shapes), published)

    def __call__(self, input_word_ids: np.ndarray, input_mask: np.ndarray,
                 segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pooled_output [B, H], sequence_output [B, S, H])`` as float32."""
        import tensorflow as tf
        arrays = dict(zip(INPUT_NAMES, (input_word_ids, input_mask, segment_ids)))
        inputs = {name: tf.convert_to_tensor(np.asarray(value),
                                             dtype=self._input_dtypes[name])
                  for name, value in arrays.items()}
        outputs = (self._invoke(inputs) if self._compiled is None
                   else self._invoke_compiled(inputs))
        if isinstance(outputs, dict):
            pooled, sequence = (outputs[n] for n in OUTPUT_NAMES)
        else:
            pooled, sequence = outputs[0], outputs[1]
        return (np.asarray(pooled, dtype=np.float32),
                np.asarray(sequence, dtype=np.float32))


def load_bert_saved_model(model_dir: str, jit_compile: bool = False,
                          compile_cache: Optional[CompileCache] = None
                          ) -> BertSavedModel:
    """Restores the SavedModel at ``model_dir`` (local, ``gs://`` or a TF
    Hub handle) and detects its interface; ``jit_compile`` runs it through
    XLA (see ``BertSavedModel``), publishing what it compiles to
    ``compile_cache`` when given."""
    global _load_count
    import tensorflow as tf
    path = resolve_model_path(model_dir)
    _read_saved_model_proto(path)  # a clear error for a non-model dir
    started = time.perf_counter()
    try:
        restored = tf.saved_model.load(path)
    except (tf.errors.OpError, ValueError, KeyError) as err:
        raise ModelFormatError(f"{path}: cannot restore the SavedModel: "
                               f"{_one_line(err)}") from err
    model = BertSavedModel(path, restored, jit_compile, compile_cache)
    with _load_lock:
        _load_count += 1
        count = _load_count
    _LOG.info("Loaded BERT SavedModel %s (%s interface) in %.1f s (pid %d, "
              "load #%d in this process)", path, model.interface,
              time.perf_counter() - started, os.getpid(), count)
    return model


def probe_model(model_dir: str) -> int:
    """Restores the model, checks its interface with one two-token call and
    returns its hidden size.

    The launcher runs this before any worker starts, so a model with the
    wrong interface fails the job in seconds with one line.  It is not
    counted by ``load_count`` (that counts the workers' loads).
    """
    import tensorflow as tf
    path = resolve_model_path(model_dir)
    _read_saved_model_proto(path)
    try:
        model = BertSavedModel(path, tf.saved_model.load(path))
    except (tf.errors.OpError, KeyError) as err:
        raise ModelFormatError(f"{path}: cannot restore the SavedModel: "
                               f"{_one_line(err)}") from err
    ids = np.array([[101, 102]], dtype=np.int32)
    try:
        pooled, sequence = model(ids, np.ones_like(ids), np.zeros_like(ids))
    except (tf.errors.OpError, ValueError, TypeError) as err:
        raise ModelFormatError(f"{path}: a test call of the model failed: "
                               f"{_one_line(err)}") from err
    if pooled.ndim != 2 or sequence.shape[:2] != (1, 2) or \
            sequence.shape[2] != pooled.shape[1]:
        raise ModelFormatError(
            f"{path}: unexpected output shapes pooled {pooled.shape}, "
            f"sequence {sequence.shape} for a [1, 2] input")
    return int(pooled.shape[1])


def load_count() -> int:
    """How many times this process has loaded a model (for tests and logs)."""
    return _load_count


def compile_stats() -> CompileStats:
    """A copy of this process's XLA compile counts (for benchmarks and
    logs)."""
    with _load_lock:
        return dataclasses.replace(_compile_stats)


def infer_hidden_size(model_dir: str, vocab_size: int) -> int:
    """The model's hidden size, read from its word-embedding table's shape.

    The table is the one ``[vocab_size, hidden]`` variable in the
    checkpoint whose name mentions embeddings; a model with none (the
    vocabulary does not fit the model) or several disagreeing candidates is
    an error.
    """
    import tensorflow as tf
    model_dir = resolve_model_path(model_dir)
    _read_saved_model_proto(model_dir)  # a clear error for a non-model dir
    try:
        shapes = _variables_reader(model_dir).get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError) as err:
        raise ModelFormatError(f"{model_dir}: cannot read the SavedModel's "
                               f"variables: {_one_line(err)}") from err
    tables = [(name, shape) for name, shape in shapes.items()
              if len(shape) == 2 and "embedding" in name.lower()]
    candidates = {shape[1] for _, shape in tables if shape[0] == vocab_size}
    if len(candidates) == 1:
        return int(candidates.pop())
    listed = "; ".join(sorted(f"{name} {list(shape)}" for name, shape in tables))
    if not candidates:
        raise ModelFormatError(
            f"{model_dir}: the vocabulary has {vocab_size} entries but no "
            f"word-embedding table has {vocab_size} rows (wrong vocab for "
            f"this model?); embedding tables: {listed or 'none'}")
    raise ModelFormatError(
        f"{model_dir}: several [vocab_size={vocab_size}, hidden] embedding "
        f"tables with different widths: {listed}")
