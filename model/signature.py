"""What a BERT SavedModel declares: its ``saved_model.pb`` (read without
restoring the model) and the interface a restored model is called
through.

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
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterator, Optional

import numpy as np

from model.errors import ModelFormatError, one_line
from model.handles import join_path

INPUT_NAMES = ("input_word_ids", "input_mask", "segment_ids")
OUTPUT_NAMES = ("pooled_output", "sequence_output")
# Per-layer token outputs of TF Hub's dict-interface BERT encoders.
ENCODER_OUTPUTS = "encoder_outputs"
INTERFACES = ("list", "dict", "signature")


def read_saved_model_proto(model_dir: str):
    """The parsed ``saved_model.pb`` of ``model_dir`` (local or cloud
    path); ``ModelFormatError`` (one line) for a directory without one or
    a file that does not parse."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2
    path = join_path(model_dir, "saved_model.pb")
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
                               f"{one_line(err)}") from err
    if not proto.meta_graphs:
        raise ModelFormatError(f"{path} holds no meta graph")
    return proto


def breadth_first(nodes, children_of: Callable[[Any], Any]
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


def _serving_signature(restored) -> Any:
    """The restored model's ``serving_default`` signature, or None."""
    return (getattr(restored, "signatures", {}) or {}).get("serving_default")


def _signature_fits(signature) -> bool:
    """Whether a signature has exactly the BERT inputs and both outputs."""
    _, inputs = signature.structured_input_signature
    return (set(inputs) == set(INPUT_NAMES)
            and set(OUTPUT_NAMES) <= set(signature.structured_outputs))


def signature_returns_layers(restored, dtypes: dict[str, Any]) -> bool:
    """Whether the ``serving_default`` signature takes the BERT inputs (of
    ``dtypes``) and returns ``encoder_outputs`` too."""
    signature = _serving_signature(restored)
    if signature is None or not _signature_fits(signature):
        return False
    _, specs = signature.structured_input_signature
    return (_returns_layers(signature.structured_outputs)
            and {k: s.dtype for k, s in specs.items()} == dtypes)


def call_returns_layers(restored, interface: str) -> bool:
    """Whether the detected call's outputs hold ``encoder_outputs`` (only a
    ``dict`` call may)."""
    if interface != "dict":
        return False
    return any(_returns_layers(concrete.structured_outputs)
               for concrete in restored.__call__.concrete_functions)


def layers_of(outputs: Any) -> list[Any]:
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


def accepts_training(restored) -> bool:
    """Whether the root call takes a ``training`` argument (Keras models),
    which must then be passed as False to disable dropout."""
    function_type = getattr(restored.__call__, "function_type", None)
    parameters = getattr(function_type, "parameters", {}) or {}
    return "training" in parameters


def _describe(restored) -> str:
    """Short account of what a restored object offers, for error messages."""
    function = getattr(restored, "__call__", None) if callable(restored) else None
    calls = [str(c.structured_input_signature[0]) for c in
             getattr(function, "concrete_functions", ()) or ()]
    signatures = sorted(getattr(restored, "signatures", {}) or {})
    return (f"root calls: {'; '.join(calls) or 'none'}; signatures: "
            f"{', '.join(signatures) or 'none'}")


def detect_interface(model_dir: str, restored) -> tuple[str, dict[str, Any]]:
    """The first interface of ``INTERFACES`` that the restored model fits,
    and the input dtypes it expects.

    Raises:
      ModelFormatError: none of the supported interfaces fits.
    """
    candidates = _call_candidates(restored)
    for wanted in ("list", "dict"):
        for interface, specs in candidates:
            if interface != wanted:
                continue
            if interface == "list":
                specs = dict(zip(INPUT_NAMES, specs))
            return interface, {k: s.dtype for k, s in specs.items()}
    signature = _serving_signature(restored)
    if signature is not None and _signature_fits(signature):
        _, specs = signature.structured_input_signature
        return "signature", {k: s.dtype for k, s in specs.items()}
    raise ModelFormatError(
        f"{model_dir}: SavedModel has no BERT interface (expected "
        "model([input_word_ids, input_mask, segment_ids]) -> [pooled, "
        "sequence], model({input_word_ids, input_mask, segment_ids}) -> "
        "{pooled_output, sequence_output, ...}, or a serving_default "
        "signature with those inputs and outputs); found "
        + one_line(_describe(restored)))
