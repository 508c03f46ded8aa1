"""Loading a BERT SavedModel and calling it with checked inputs.

``load_bert_saved_model`` restores the model (found by ``model.handles``),
detects its interface (``model.signature``) and wraps it in
``BertSavedModel``, which maps int32 id arrays to float32 numpy
embeddings.  Inputs are checked before TensorFlow sees them
(``check_inputs``: rank, shapes, dtypes, and ids within the model's
embedding tables, whose sizes ``model.variables`` reads): TensorFlow's own
kernels do not reject every bad input on every CPU, and a bad input must
never pass for an XLA failure.

With ``jit_compile`` the call is compiled by XLA (once per input shape),
which fuses the elementwise work between the matmuls (layer norm, GELU,
softmax); a model that XLA cannot compile falls back to plain TensorFlow
with one warning.  ``probe_model`` and ``probe_encoder_layers`` restore a
model in the launcher to check it with one call before any worker starts.
Every error about the model is a ``ModelFormatError`` with a one-line
message; about an input, a ``ModelInputError``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any, Callable, Optional

import numpy as np

from model.errors import ModelFormatError, ModelInputError, one_line
from model.handles import resolve_model_path
from model.signature import (INPUT_NAMES, OUTPUT_NAMES, accepts_training,
                             call_returns_layers, detect_interface, layers_of,
                             read_saved_model_proto, signature_returns_layers)
from model.variables import ModelLimits, read_model_limits

_LOG = logging.getLogger(__name__)

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
    ``signature`` (see ``model.signature``).  ``jit_compile`` says whether
    calls go through XLA (it turns False if XLA cannot compile this model).
    ``limits`` (see ``model.variables.read_model_limits``) bound the inputs
    each call accepts (see ``check_inputs``).
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
        self.interface, self._input_dtypes = detect_interface(model_dir,
                                                              restored)
        # A model whose call does not return encoder_outputs but whose
        # signature does (model.export writes such models):
        # call_with_layers takes the signature.
        self._layers_via_signature = (
            self.interface != "signature"
            and not call_returns_layers(restored, self.interface)
            and signature_returns_layers(restored, self._input_dtypes))
        self._training_kwargs = (
            {"training": False}
            if self.interface != "signature" and accepts_training(restored)
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

    def _invoke(self, inputs: dict[str, Any]) -> Any:
        """Call the restored model through the detected interface."""
        if self.interface == "list":
            return self._restored([inputs[n] for n in INPUT_NAMES],
                                  **self._training_kwargs)
        if self.interface == "dict":
            return self._restored(inputs, **self._training_kwargs)
        return self._restored.signatures["serving_default"](**inputs)

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
                    f"{shape}: {one_line(err)[:300]}") from err
            _LOG.warning("XLA cannot compile %s (%s); running it without "
                         "XLA", self.model_dir, one_line(err)[:300])
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
            layers = layers_of(outputs)
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
    read_saved_model_proto(path)  # a clear error for a non-model dir
    started = time.perf_counter()
    try:
        restored = tf.saved_model.load(path)
    except (tf.errors.OpError, ValueError, KeyError) as err:
        raise ModelFormatError(f"{path}: cannot restore the SavedModel: "
                               f"{one_line(err)}") from err
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
    read_saved_model_proto(path)
    try:
        return path, BertSavedModel(path, tf.saved_model.load(path),
                                    limits=read_model_limits(path))
    except (tf.errors.OpError, KeyError) as err:
        raise ModelFormatError(f"{path}: cannot restore the SavedModel: "
                               f"{one_line(err)}") from err


def _probe_call(path: str, call: Callable[..., Any]) -> Any:
    """``call`` on one two-token input (``[CLS] [SEP]``);
    ``ModelFormatError`` (one line) if the model fails on it."""
    import tensorflow as tf
    ids = np.array([[101, 102]], dtype=np.int32)
    try:
        return call(ids, np.ones_like(ids), np.zeros_like(ids))
    except (tf.errors.OpError, ValueError, TypeError) as err:
        raise ModelFormatError(f"{path}: a test call of the model failed: "
                               f"{one_line(err)}") from err


def probe_model(model_dir: str) -> int:
    """Restores the model, checks its interface with one two-token call and
    returns its hidden size.

    The launcher runs this before any worker starts, so a model with the
    wrong interface fails the job in seconds with one line.  It is not
    counted by ``load_count`` (that counts the workers' loads).  The
    answer is kept per model (``model.facts``): a later launch of the same
    model neither restores nor calls it.
    """
    from model.facts import remembered
    return remembered(resolve_model_path(model_dir), "output_width",
                      lambda: _probe_width(model_dir))


def _probe_width(model_dir: str) -> int:
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
    not counted by ``load_count``, and its answer is kept per model."""
    from model.facts import remembered

    def probe() -> int:
        path, model = _restore_for_probe(model_dir)
        _, _, layers = _probe_call(path, model.call_with_layers)
        return len(layers)
    return remembered(resolve_model_path(model_dir), "encoder_layers", probe)


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
