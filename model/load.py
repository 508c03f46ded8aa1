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
    ``pooled_output`` and ``sequence_output`` (and ``encoder_outputs``,
    each layer's tokens, which only ``call_with_layers`` reads; other keys
    are ignored).
``signature``
    Any SavedModel whose ``serving_default`` signature takes those three
    inputs by name and returns those two outputs by name.

``call_with_layers`` also wants ``encoder_outputs``: from the ``dict``
call where it returns them, else from a ``serving_default`` signature that
does (stacked ``[layers, batch, seq, hidden]``, as ``model.export`` writes
it); every other call goes through the detected interface.

Models may be local directories, paths on any TensorFlow file system
(``gs://...``), or TF Hub / Kaggle handles resolved by ``resolve_model_path``
(needs the optional ``tensorflow_hub`` package; a pre-filled
``TFHUB_CACHE_DIR`` makes that work offline).

With ``jit_compile`` the call is compiled by XLA (once per input shape),
which fuses the elementwise work between the matmuls (layer norm, GELU,
softmax); a model that XLA cannot compile falls back to plain TensorFlow
with one warning.  Inputs are checked before TensorFlow sees them (rank,
shapes, dtypes, and ids within the model's embedding tables, whose sizes
``read_model_limits`` reads from the variables): TensorFlow's own kernels do
not reject every bad input on every CPU, and a bad input must never pass
for an XLA failure.

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

_LOG = logging.getLogger(__name__)

_VOCAB_ATTR = "vocab_file"
_LOWER_CASE_ATTR = "do_lower_case"
_VOCAB_PATTERN = "vocab*.txt"
_VARIABLE_VALUE = "VARIABLE_VALUE"
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"

INPUT_NAMES = ("input_word_ids", "input_mask", "segment_ids")
OUTPUT_NAMES = ("pooled_output", "sequence_output")
# Per-layer token outputs of TF Hub's dict-interface BERT encoders.
ENCODER_OUTPUTS = "encoder_outputs"
INTERFACES = ("list", "dict", "signature")

# Handle prefixes that only tensorflow_hub can turn into a local directory.
_HUB_URL_PREFIXES = ("http://", "https://")
_HUB_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")

_load_lock = threading.Lock()
_load_count = 0
# One XLA compile at a time in this process (see _invoke_compiled);
# re-entrant, since a failed compile probes XLA while holding it.
_compile_lock = threading.RLock()


def _xla_errors() -> tuple[type, ...]:
    """The TensorFlow errors an XLA compile or run raises."""
    import tensorflow as tf
    return (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
            tf.errors.InternalError)


@dataclasses.dataclass
class CompileStats:
    """XLA in this process: input shapes compiled, and the seconds and
    padded tokens (batch x width) of their first calls (compile plus one
    run)."""
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


class SequenceLengthError(ModelFormatError):
    """The run's ``max_seq_length`` is longer than the model's position
    table (a usage error: launchers exit 2 on it, as on other
    ``ModelFormatError``s)."""


class ModelInputError(ValueError):
    """Arrays handed to the model are not a valid BERT batch."""


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


def _checkpoint_object_graph(reader):
    """The checkpoint's own object graph (which names every variable's
    checkpoint key and full name), or None when it has none."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2
    if not reader.has_tensor(_OBJECT_GRAPH_KEY):
        return None
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(_OBJECT_GRAPH_KEY))
    return graph


def _read_lower_case_flag(model_dir: str) -> Optional[bool]:
    """Value of the ``do_lower_case`` variable nearest the root, if any.

    Looks the variable up in the checkpoint's own object graph, so its
    checkpoint key is exact wherever in the model it is attached.
    """
    import tensorflow as tf
    try:
        reader = _variables_reader(model_dir)
    except (tf.errors.OpError, ValueError):
        return None  # a model without variables
    graph = _checkpoint_object_graph(reader)
    if graph is None:
        return None
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


def _returns_layers(outputs: Any) -> bool:
    """Whether traced or returned ``outputs`` hold ``encoder_outputs``."""
    return isinstance(outputs, dict) and ENCODER_OUTPUTS in outputs


def _signature_returns_layers(restored, dtypes: dict[str, Any]) -> bool:
    """Whether the ``serving_default`` signature takes the BERT inputs (of
    ``dtypes``) and returns ``encoder_outputs`` too."""
    signature = (getattr(restored, "signatures", {}) or {}).get(
        "serving_default")
    if signature is None or not _signature_fits(signature):
        return False
    _, specs = signature.structured_input_signature
    return (_returns_layers(signature.structured_outputs)
            and {k: s.dtype for k, s in specs.items()} == dtypes)


def _layers_of(outputs: Any) -> list[Any]:
    """The per-layer token outputs in a model's ``outputs``: a list (the
    ``dict`` call) or a ``[num_layers, B, S, H]`` stack (a signature, whose
    outputs are tensors); none when there are none."""
    value = outputs.get(ENCODER_OUTPUTS) if isinstance(outputs, dict) else None
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    stacked = np.asarray(value)
    return list(stacked) if stacked.ndim == 4 else []


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


def _value_range(values: np.ndarray) -> str:
    """``"from MIN to MAX"`` of an array, for error messages."""
    return f"from {values.min()} to {values.max()}"


def check_inputs(arrays: dict[str, Any], limits: ModelLimits = ModelLimits(),
                 dtypes: Optional[dict[str, Any]] = None
                 ) -> dict[str, np.ndarray]:
    """``arrays`` (keyed by ``INPUT_NAMES``) as numpy arrays, once they
    are a valid BERT batch; else ``ModelInputError`` with one line.

    Checked, in this order: each is 2-D; all three have one shape; batch
    and sequence length are at least 1; the dtypes are integers; the
    sequence fits the position table; ids lie in ``[0, vocab_size)``,
    segment ids in ``[0, type_vocab_size)`` and mask values in {0, 1}.
    Limits the model does not state (None) are not checked, but values
    must still fit the model's input ``dtypes`` (TensorFlow dtypes).
    TensorFlow itself does not reject all of these on every CPU (oneDNN
    broadcasts a narrower mask without a word), so the wrapper must.
    """
    values = {name: np.asarray(arrays[name]) for name in INPUT_NAMES}
    for name, value in values.items():
        if value.ndim != 2:
            raise ModelInputError(
                f"{name} must be a 2-D [batch, seq_length] array, got shape "
                f"{list(value.shape)}")
    shapes = {value.shape for value in values.values()}
    if len(shapes) != 1:
        raise ModelInputError(
            f"{', '.join(INPUT_NAMES)} must have one shape, got "
            + ", ".join(f"{name} {list(v.shape)}"
                        for name, v in values.items()))
    batch, width = shapes.pop()
    if batch == 0 or width == 0:
        raise ModelInputError(f"empty input of shape [{batch}, {width}]: "
                              "batch and sequence length must be at least 1")
    for name, value in values.items():
        if not np.issubdtype(value.dtype, np.integer):
            raise ModelInputError(f"{name} must hold integers, got "
                                  f"{value.dtype}")
    if limits.max_positions is not None and width > limits.max_positions:
        raise ModelInputError(
            f"sequence length {width} exceeds the model's "
            f"{limits.max_positions} positions")
    bounds = {"input_word_ids": (limits.vocab_size, "the model's vocabulary"),
              "segment_ids": (limits.type_vocab_size,
                              "the model's token types"),
              "input_mask": (2, "mask values are 0 and 1")}
    for name, (limit, what) in bounds.items():
        value = values[name]
        if limit is None and dtypes is not None and dtypes[name].is_integer:
            limit = int(dtypes[name].max) + 1
            what = f"the model's {dtypes[name].name} input"
        if value.min() < 0 or (limit is not None and value.max() >= limit):
            allowed = f"[0, {limit})" if limit is not None else "[0, ...)"
            raise ModelInputError(
                f"{name} must lie in {allowed} ({what}), got values "
                f"{_value_range(value)}")
    return values


class BertSavedModel:
    """A loaded BERT encoder that maps int32 id arrays to numpy embeddings.

    ``interface`` says how the SavedModel is called: ``list``, ``dict`` or
    ``signature`` (see the module docstring).  ``jit_compile`` says whether
    calls go through XLA (it turns False if XLA cannot compile this model).
    ``limits`` (see ``read_model_limits``) bound the
    inputs each call accepts (see ``check_inputs``).
    """

    def __init__(self, model_dir: str, restored,
                 jit_compile: bool = False,
                 limits: ModelLimits = ModelLimits()) -> None:
        """Detect the interface of ``restored``.

        Raises:
          ModelFormatError: none of the supported interfaces fits.
        """
        self.model_dir = model_dir
        self.limits = limits
        self._restored = restored
        self.interface, self._input_dtypes = self._detect()
        # A model whose call does not return encoder_outputs but whose
        # signature does (model.export writes such models):
        # call_with_layers takes the signature.
        self._layers_via_signature = (
            self.interface != "signature"
            and not self._call_returns_layers()
            and _signature_returns_layers(restored, self._input_dtypes))
        self._training_kwargs = (
            {"training": False}
            if self.interface != "signature" and _accepts_training(restored)
            else {})
        self._compiled = None
        # The compiled call that returns encoder_outputs too, where that is
        # another call than the plain one (built on first use).
        self._compiled_layers = None
        self._compiled_shapes: set[tuple[Any, ...]] = set()
        # Whether XLA compiles this model at all (None: not known yet).
        self._xla_compiles: Optional[bool] = None
        if jit_compile:
            self._compiled = self._compile(self._invoke)

    def _compile(self, call: Callable[[dict[str, Any]], Any]) -> Any:
        """``call`` compiled by XLA.  One trace for every batch shape (XLA
        still compiles each shape), so that the traced function does not
        depend on which shape came first."""
        import tensorflow as tf
        spec = {name: tf.TensorSpec([None, None], dtype, name=name)
                for name, dtype in self._input_dtypes.items()}
        return tf.function(call, jit_compile=True, input_signature=[spec])

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

    def _call_returns_layers(self) -> bool:
        """Whether the detected call's outputs hold ``encoder_outputs``."""
        if self.interface != "dict":
            return False
        function = self._restored.__call__
        return any(_returns_layers(concrete.structured_outputs)
                   for concrete in function.concrete_functions)

    def _invoke_layers(self, inputs: dict[str, Any]) -> Any:
        """Call the restored model so that it returns ``encoder_outputs``
        if it can: through the signature where the detected call does not
        return them."""
        if self._layers_via_signature:
            return self._restored.signatures["serving_default"](**inputs)
        return self._invoke(inputs)

    def _compiled_call(self, with_layers: bool) -> Any:
        """The XLA-compiled call (None once XLA is off for this model);
        ``with_layers``: the one that returns ``encoder_outputs``."""
        if not with_layers or not self._layers_via_signature or \
                self._compiled is None:
            return self._compiled
        if self._compiled_layers is None:
            self._compiled_layers = self._compile(self._invoke_layers)
        return self._compiled_layers

    def _invoke_compiled(self, inputs: dict[str, Any],
                         with_layers: bool = False) -> Any:
        """Call through XLA.  A new input shape compiles first (about a
        second for BERT-Base on a CPU, logged); compiles run one at a time
        in this process."""
        shape = tuple(inputs[INPUT_NAMES[0]].shape)
        # The call with layers is another function (where it differs):
        # its shapes compile apart.
        key = shape + (("layers",)
                       if with_layers and self._layers_via_signature
                       else ())
        if key in self._compiled_shapes:
            return self._call_xla(inputs, with_layers)
        with _compile_lock:
            if key in self._compiled_shapes:
                return self._call_xla(inputs, with_layers)
            started = time.perf_counter()
            outputs = self._call_xla(inputs, with_layers)
            if self._compiled is not None:
                self._record_compile(key, time.perf_counter() - started)
            return outputs

    def _call_xla(self, inputs: dict[str, Any],
                  with_layers: bool = False) -> Any:
        """The compiled call of a checked input.

        On an XLA error, whether XLA compiles this model at all is decided
        on a minimal well-formed batch, never on the failed input: if it
        does not, warn once and go on (this call included) without XLA; if
        it does, this input is the problem, so raise ``ModelInputError``
        and keep XLA on.
        """
        try:
            return self._compiled_call(with_layers)(inputs)
        except _xla_errors() as err:
            if self._xla_compiles_model():
                shape = list(inputs[INPUT_NAMES[0]].shape)
                raise ModelInputError(
                    f"XLA compiles {self.model_dir} but fails on input shape "
                    f"{shape}: {_one_line(err)[:300]}") from err
            _LOG.warning("XLA cannot compile %s (%s); running it without "
                         "XLA", self.model_dir, _one_line(err)[:300])
            self._compiled = self._compiled_layers = None
            return (self._invoke_layers if with_layers
                    else self._invoke)(inputs)

    def _xla_compiles_model(self) -> bool:
        """Whether XLA compiles and runs this model on a minimal
        well-formed batch (one row of two tokens: id 0, mask 1, segment 0);
        found out once per model, under the compile lock since it compiles
        too."""
        import tensorflow as tf
        with _compile_lock:
            if self._xla_compiles is None:
                probe = {name: tf.zeros([1, 2], dtype)
                         for name, dtype in self._input_dtypes.items()}
                probe["input_mask"] = tf.ones(
                    [1, 2], self._input_dtypes["input_mask"])
                try:
                    self._compiled(probe)
                    self._xla_compiles = True
                except _xla_errors():
                    self._xla_compiles = False
            return self._xla_compiles

    def _record_compile(self, key: tuple[Any, ...], seconds: float) -> None:
        """Counts a new shape's first call and logs it.  ``key`` is the
        input shape, ending in ``"layers"`` for the call that returns
        ``encoder_outputs`` where that is another function."""
        self._compiled_shapes.add(key)
        shape = tuple(n for n in key if isinstance(n, int))
        label = str(list(shape)) + (" (with encoder_outputs)"
                                    if len(key) > len(shape) else "")
        self._xla_compiles = True
        with _load_lock:
            _compile_stats.shapes += 1
            _compile_stats.first_call_seconds += seconds
            _compile_stats.first_call_tokens += int(np.prod(shape))
        _LOG.info("XLA compiled the model for input shape %s (first call "
                  "%.1f s; %d shapes in this model)", label, seconds,
                  len(self._compiled_shapes))

    def __call__(self, input_word_ids: np.ndarray, input_mask: np.ndarray,
                 segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pooled_output [B, H], sequence_output [B, S, H])`` as float32.

        Raises ``ModelInputError`` (one line) for arrays that are not a
        valid batch for this model (see ``check_inputs``), before
        TensorFlow sees them.
        """
        outputs = self._outputs(input_word_ids, input_mask, segment_ids)
        if isinstance(outputs, dict):
            pooled, sequence = (outputs[n] for n in OUTPUT_NAMES)
        else:
            pooled, sequence = outputs[0], outputs[1]
        return (np.asarray(pooled, dtype=np.float32),
                np.asarray(sequence, dtype=np.float32))

    def _outputs(self, input_word_ids: np.ndarray, input_mask: np.ndarray,
                 segment_ids: np.ndarray, with_layers: bool = False) -> Any:
        """The model's raw outputs for a checked batch (see ``__call__``);
        ``with_layers``: through the call that returns ``encoder_outputs``
        (see ``call_with_layers``)."""
        import tensorflow as tf
        arrays = check_inputs(
            dict(zip(INPUT_NAMES, (input_word_ids, input_mask, segment_ids))),
            self.limits, self._input_dtypes)
        inputs = {name: tf.convert_to_tensor(value,
                                             dtype=self._input_dtypes[name])
                  for name, value in arrays.items()}
        if self._compiled is not None:
            return self._invoke_compiled(inputs, with_layers)
        return (self._invoke_layers if with_layers else self._invoke)(inputs)

    def call_with_layers(self, input_word_ids: np.ndarray,
                         input_mask: np.ndarray, segment_ids: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """``__call__``'s outputs plus ``encoder_outputs``: each transformer
        layer's ``[B, S, H]`` token outputs, first layer first, as float32
        (an empty list when the model does not return them).  A ``dict``
        call or a ``serving_default`` signature with an ``encoder_outputs``
        output gives them (the models ``model.export`` and
        ``model.convert`` write have such a signature)."""
        outputs = self._outputs(input_word_ids, input_mask, segment_ids,
                                with_layers=True)
        if isinstance(outputs, dict):
            pooled, sequence = (outputs[n] for n in OUTPUT_NAMES)
            layers = _layers_of(outputs)
        else:
            pooled, sequence, layers = outputs[0], outputs[1], []
        return (np.asarray(pooled, dtype=np.float32),
                np.asarray(sequence, dtype=np.float32),
                [np.asarray(layer, dtype=np.float32) for layer in layers])


def load_bert_saved_model(model_dir: str, jit_compile: bool = False
                          ) -> BertSavedModel:
    """Restores the SavedModel at ``model_dir`` (local, ``gs://`` or a TF
    Hub handle) and detects its interface; ``jit_compile`` runs it through
    XLA (see ``BertSavedModel``)."""
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
    model = BertSavedModel(path, restored, jit_compile,
                           read_model_limits(path))
    with _load_lock:
        _load_count += 1
        count = _load_count
    _LOG.info("Loaded BERT SavedModel %s (%s interface) in %.1f s (pid %d, "
              "load #%d in this process)", path, model.interface,
              time.perf_counter() - started, os.getpid(), count)
    return model


def _restore_for_probe(model_dir: str) -> tuple[str, "BertSavedModel"]:
    """``(path, model)``: the SavedModel restored in this process for a
    launcher's probe; ``ModelFormatError`` (one line) if it cannot be."""
    import tensorflow as tf
    path = resolve_model_path(model_dir)
    _read_saved_model_proto(path)
    try:
        return path, BertSavedModel(path, tf.saved_model.load(path),
                                    limits=read_model_limits(path))
    except (tf.errors.OpError, KeyError) as err:
        raise ModelFormatError(f"{path}: cannot restore the SavedModel: "
                               f"{_one_line(err)}") from err


def _probe_call(path: str, call: Callable[..., Any]) -> Any:
    """``call`` on one two-token input (``[CLS] [SEP]``);
    ``ModelFormatError`` (one line) if the model fails on it."""
    import tensorflow as tf
    ids = np.array([[101, 102]], dtype=np.int32)
    try:
        return call(ids, np.ones_like(ids), np.zeros_like(ids))
    except (tf.errors.OpError, ValueError, TypeError) as err:
        raise ModelFormatError(f"{path}: a test call of the model failed: "
                               f"{_one_line(err)}") from err


def probe_model(model_dir: str) -> int:
    """Restores the model, checks its interface with one two-token call and
    returns its hidden size.

    The launcher runs this before any worker starts, so a model with the
    wrong interface fails the job in seconds with one line.  It is not
    counted by ``load_count`` (that counts the workers' loads).
    """
    path, model = _restore_for_probe(model_dir)
    pooled, sequence = _probe_call(path, model.__call__)
    if pooled.ndim != 2 or sequence.shape[:2] != (1, 2) or \
            sequence.shape[2] != pooled.shape[1]:
        raise ModelFormatError(
            f"{path}: unexpected output shapes pooled {pooled.shape}, "
            f"sequence {sequence.shape} for a [1, 2] input")
    return int(pooled.shape[1])


def probe_encoder_layers(model_dir: str) -> int:
    """How many per-layer ``encoder_outputs`` the model returns (0: none),
    from one two-token call; launchers ask before a pooling that needs
    them (``first_last_avg``) starts any work.  Like ``probe_model`` it is
    not counted by ``load_count``."""
    path, model = _restore_for_probe(model_dir)
    _, _, layers = _probe_call(path, model.call_with_layers)
    return len(layers)


def count_load() -> int:
    """Counts one model load by an engine that does not go through
    ``load_bert_saved_model`` (``model.engines``); returns the count."""
    global _load_count
    with _load_lock:
        _load_count += 1
        return _load_count


def load_count() -> int:
    """How many times this process has loaded a model (for tests and logs)."""
    return _load_count


def compile_stats() -> CompileStats:
    """A copy of this process's XLA compile counts (for benchmarks and
    logs)."""
    with _load_lock:
        return dataclasses.replace(_compile_stats)


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
    run), so the launcher can check the model cheaply."""
    import tensorflow as tf
    _read_saved_model_proto(model_dir)  # a clear error for a non-model dir
    try:
        reader = _variables_reader(model_dir)
        shapes = reader.get_variable_to_shape_map()
        graph = _checkpoint_object_graph(reader)
    except (tf.errors.OpError, ValueError) as err:
        raise ModelFormatError(f"{model_dir}: cannot read the SavedModel's "
                               f"variables: {_one_line(err)}") from err
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
