"""The OpenVINO engine: the user's SavedModel, converted once, run on CPUs.

``ov.convert_model`` reads a TF2 SavedModel directly (no TensorFlow
involved) into a model with dynamic batch and length; its LayerNorms are
then rewritten as OpenVINO's MVN kernel (``model.ov_layer_norm``).
Converting BERT-Base takes a few seconds, so the result is cached as
OpenVINO IR (``model.xml`` + ``model.bin``, weights kept in float32) under
``openvino/ov<version>-g<rewrites>/<model digest>/`` in the project's
cache directory
(``$BERT_ZH_EMBED_CACHE`` or ``~/.cache/bert_zh_embed``).  The digest
covers ``saved_model.pb`` and the variables, so a changed model never
reuses a stale conversion, and a new OpenVINO converts again.  Entries are
built in a private directory and renamed into place whole, so concurrent
workers never read half an entry; an unwritable cache only costs the
conversion.

Each worker compiles the model once for its precision (``float32``,
``bfloat16`` through ``INFERENCE_PRECISION_HINT``, or an ``int8`` model
made by ``python -m model.quantize``) with ``PERFORMANCE_HINT=THROUGHPUT``
on the worker's usable cores (OpenVINO picks the streams: one per core
on 2 cores), and runs each batch's rows split across the streams, through
each thread's own infer requests.  Such a worker never imports
TensorFlow (about 660 MB of memory): the model's input limits are kept
beside its cached IR (``limits.json``) or in ``int8.json``.
OpenVINO's own compiled-blob cache (``CACHE_DIR``) is not used: on
BERT-Base it saved under 0.3 s of a ~1.3 s compile and stores another
400 MB per precision.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from typing import Any, Optional

import numpy as np

from model.errors import ModelFormatError
from model.files import model_digest
from model.handles import resolve_model_path
from model.load import check_inputs
from model.signature import INPUT_NAMES, OUTPUT_NAMES
from model.variables import ModelLimits, read_model_limits

_LOG = logging.getLogger(__name__)

CACHE_SUBDIR = "openvino"
IR_XML, IR_BIN = "model.xml", "model.bin"
INFO_FILE = "info.json"  # what a cache entry was made from
LIMITS_FILE = "limits.json"  # the model's input limits, beside its IR
INT8_INFO_FILE = "int8.json"  # written by model.quantize
INT8_SUBDIR = "int8"
_HINTS = {"float32": "f32", "bfloat16": "bf16", "int8": "f32"}
# Version of the rewrites applied after conversion: part of the IR cache
# path, so that IR converted by an older version is converted again.
GRAPH_REWRITES = 1


def openvino_version() -> str:
    """The installed OpenVINO's version (e.g. ``2026.4.1``)."""
    from importlib import metadata
    return metadata.version("openvino")


def cache_root() -> str:
    """``openvino/`` under the project's cache directory."""
    from model.runtime import default_cache_dir
    return os.path.join(default_cache_dir(), CACHE_SUBDIR)


def ir_cache_dir(digest: str) -> str:
    """Where the IR of the model with ``digest`` is cached for this
    OpenVINO version."""
    return os.path.join(cache_root(),
                        f"ov{openvino_version()}-g{GRAPH_REWRITES}", digest)


def default_int8_dir(digest: str) -> str:
    """Where ``model.quantize`` puts, and a run finds, the int8 model of
    the SavedModel with ``digest`` when no directory is named."""
    return os.path.join(cache_root(), INT8_SUBDIR, digest)


# --- conversion --------------------------------------------------------------


def _copy_local(model_dir: str, target: str) -> None:
    """Copies the files ``ov.convert_model`` reads (``saved_model.pb`` and
    ``variables/``) from a TensorFlow file-system path to ``target``."""
    import tensorflow as tf
    os.makedirs(os.path.join(target, "variables"))
    base = model_dir.rstrip("/")
    tf.io.gfile.copy(f"{base}/saved_model.pb",
                     os.path.join(target, "saved_model.pb"))
    for path in tf.io.gfile.glob(f"{base}/variables/variables.*"):
        tf.io.gfile.copy(path, os.path.join(
            target, "variables", path.rsplit("/", 1)[-1]))


def _check_interface(model: Any, where: str) -> None:
    """Raises ``ModelFormatError`` unless ``model`` takes the three BERT
    inputs and returns the two outputs by name."""
    inputs = {n for port in model.inputs for n in port.get_names()}
    outputs = {n for port in model.outputs for n in port.get_names()}
    missing = sorted((set(INPUT_NAMES) - inputs) | (set(OUTPUT_NAMES)
                                                     - outputs))
    if missing:
        raise ModelFormatError(
            f"{where}: the OpenVINO model lacks {', '.join(missing)} (inputs "
            f"{sorted(inputs)}, outputs {sorted(outputs)})")


def _only_bert_outputs(model: Any) -> Any:
    """``model`` with only ``pooled_output`` and ``sequence_output`` as
    outputs.  A serving signature may return more (``model.export``'s
    also returns ``encoder_outputs``, every layer's tokens): as outputs
    they would keep each layer's buffer alive and be copied out on every
    call, for nothing."""
    import openvino as ov
    wanted = set(OUTPUT_NAMES)
    kept = [port for port in model.outputs if set(port.get_names()) & wanted]
    if len(kept) == len(model.outputs):
        return model
    return ov.Model([port.get_node() for port in kept],
                    model.get_parameters(), model.get_friendly_name())


def convert(model_dir: str) -> Any:
    """``ov.convert_model`` of the SavedModel at ``model_dir`` (local or a
    TensorFlow file-system path, copied to a temporary directory first),
    checked for the BERT interface, with the other outputs dropped and
    its LayerNorms as MVN (``model.ov_layer_norm``)."""
    import openvino as ov
    from model.ov_layer_norm import fuse_layer_norms
    if "://" not in model_dir:
        model = ov.convert_model(model_dir)
    else:
        local = tempfile.mkdtemp(prefix="bert-zh-embed-model-")
        try:
            _copy_local(model_dir, os.path.join(local, "model"))
            model = ov.convert_model(os.path.join(local, "model"))
        finally:
            shutil.rmtree(local, ignore_errors=True)
    _check_interface(model, model_dir)
    model = _only_bert_outputs(model)
    fused = fuse_layer_norms(model)
    _LOG.info("%d LayerNorms of %s rewritten as MVN", fused, model_dir)
    return model


def _publish_dir(staging: str, target: str) -> bool:
    """Renames the complete directory ``staging`` to ``target``; False (and
    ``staging`` removed) when another process published ``target``
    first."""
    try:
        os.rename(staging, target)
        return True
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if os.path.isfile(os.path.join(target, IR_XML)):
            return False
        raise


def save_ir(model: Any, target: str, info: dict[str, Any],
            info_file: str = INFO_FILE) -> bool:
    """Writes ``model`` (weights in float32) and ``info`` as JSON to a
    private sibling of ``target``, then renames it into place whole.
    Returns False when ``target`` was published by someone else first."""
    import openvino as ov
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(target)}.tmp-"
                           f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(staging)
    try:
        ov.save_model(model, os.path.join(staging, IR_XML),
                      compress_to_fp16=False)
        with open(os.path.join(staging, info_file), "w",
                  encoding="utf-8") as handle:
            json.dump(info, handle, indent=2, sort_keys=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _publish_dir(staging, target)


def _write_json_atomically(path: str, data: dict[str, Any]) -> None:
    """Writes ``data`` as JSON to ``path`` whole
    (``model.files.write_whole``)."""
    from model.files import write_whole
    write_whole(path, json.dumps(data, indent=2, sort_keys=True))


def converted_model(model_dir: str, core: Any) -> tuple[Any, Optional[str]]:
    """The model as OpenVINO IR, from the cache or converted now (and
    cached); returns it with its cache directory (None when the cache
    could not be written)."""
    digest = model_digest(model_dir)
    target = ir_cache_dir(digest)
    xml = os.path.join(target, IR_XML)
    if os.path.isfile(xml):
        started = time.perf_counter()
        model = core.read_model(xml)
        _LOG.info("OpenVINO IR of %s read from the cache %s in %.1f s",
                  model_dir, target, time.perf_counter() - started)
        return model, target
    started = time.perf_counter()
    model = convert(model_dir)
    seconds = time.perf_counter() - started
    info = {"source": model_dir, "digest": digest,
            "openvino": openvino_version(), "convert_seconds":
            round(seconds, 2)}
    try:
        save_ir(model, target, info)
    except OSError as err:
        _LOG.warning("cannot cache the OpenVINO IR at %s (%s); later runs "
                     "convert again", target, err)
        return model, None
    _LOG.info("Converted %s to OpenVINO IR in %.1f s (cached at %s)",
              model_dir, seconds, target)
    return model, target


def limits_from_json(data: Any) -> Optional[ModelLimits]:
    """``ModelLimits`` from its ``dataclasses.asdict`` form, or None when
    ``data`` is not one."""
    if not isinstance(data, dict):
        return None
    try:
        return ModelLimits(**data)
    except TypeError:
        return None


def model_limits(model_dir: str, entry: Optional[str]) -> ModelLimits:
    """The model's input limits (``model.load.read_model_limits``), kept
    as ``limits.json`` in ``entry`` (its IR cache directory; None: not
    kept).  Reading them from the SavedModel needs TensorFlow, about
    660 MB of a worker's memory; a worker whose cache entry holds them
    never imports it."""
    path = os.path.join(entry, LIMITS_FILE) if entry else None
    if path and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as handle:
                limits = limits_from_json(json.load(handle))
            if limits is not None:
                return limits
        except (OSError, ValueError):
            pass  # read them again
    limits = read_model_limits(model_dir)
    if path:
        try:
            _write_json_atomically(path, dataclasses.asdict(limits))
        except OSError:
            pass  # read from the model again next time
    return limits


# --- int8 models -------------------------------------------------------------


def read_int8_info(int8_dir: str) -> dict[str, Any]:
    """The ``int8.json`` of a quantized model directory (local or a
    TensorFlow file-system path such as ``gs://``); ModelFormatError when
    the directory is not one."""
    base = int8_dir.rstrip("/")
    info_path = f"{base}/{INT8_INFO_FILE}"
    if "://" in base:  # TensorFlow's file systems; local ones need no TF
        import tensorflow as tf
        exists, read_errors = tf.io.gfile.exists, (tf.errors.OpError,
                                                   ValueError)

        def read() -> str:
            with tf.io.gfile.GFile(info_path, "r") as handle:
                return handle.read()
    else:
        exists, read_errors = os.path.exists, (OSError, ValueError)

        def read() -> str:
            with open(info_path, encoding="utf-8") as handle:
                return handle.read()
    if not exists(f"{base}/{IR_XML}") or not exists(info_path):
        raise ModelFormatError(
            f"{int8_dir} is not an int8 model of python -m model.quantize "
            f"(no {IR_XML} or {INT8_INFO_FILE})")
    try:
        return json.loads(read())
    except read_errors as err:
        raise ModelFormatError(f"{info_path}: unreadable ({err})") from err


def _local_int8_dir(int8_dir: str) -> str:
    """``int8_dir`` itself when local, else a local copy of its IR (in a
    temporary directory removed at exit), which OpenVINO can read."""
    if "://" not in int8_dir:
        return int8_dir
    import atexit
    import tensorflow as tf
    local = tempfile.mkdtemp(prefix="bert-zh-embed-int8-")
    atexit.register(shutil.rmtree, local, ignore_errors=True)
    for name in (IR_XML, IR_BIN):
        tf.io.gfile.copy(f"{int8_dir.rstrip('/')}/{name}",
                         os.path.join(local, name))
    return local


def find_int8_model(model_dir: str, int8_model: Optional[str]) -> str:
    """The int8 model to run for the SavedModel at ``model_dir``: the
    directory given, or the one ``model.quantize`` cached for this model.

    Raises ModelFormatError (one line) when there is none, or when it was
    quantized from another model.
    """
    digest = model_digest(model_dir)
    path = int8_model or default_int8_dir(digest)
    if int8_model is None and not os.path.isdir(path):
        raise ModelFormatError(
            f"--precision int8 needs a quantized model and none is cached "
            f"for {model_dir}: run python -m model.quantize --model "
            f"{model_dir} --calibration CORPUS.jsonl, or pass --int8_model "
            "DIR")
    info = read_int8_info(path)
    if info.get("source_digest") != digest:
        raise ModelFormatError(
            f"{path} was quantized from another model (digest "
            f"{info.get('source_digest')}, {model_dir} is {digest})")
    return path


def int8_digest(int8_dir: str) -> str:
    """Hash of a quantized model's files: part of the run's fingerprint, so
    a re-calibrated model counts as a different model."""
    from model.files import hash_files
    base = int8_dir.rstrip("/")
    return hash_files([f"{base}/{IR_XML}", f"{base}/{IR_BIN}"])


# --- compiling and running ---------------------------------------------------


def compile_config(precision: str, threads: Optional[int] = None
                   ) -> dict[str, Any]:
    """OpenVINO CPU settings for ``precision``: throughput mode (OpenVINO
    picks the streams, one per core on a 2-core worker), ``threads``
    (default: this process's usable cores), and the precision hint (an
    int8 model keeps its other operations in float32).

    Throughput mode, with each batch's rows split across the streams
    (``OpenVINOBertModel``), rather than one latency-mode stream whose
    threads meet at every operation: on the 2-vCPU AMX Xeon, sharing its
    cores with other work, 1.1-1.5x the real tokens/s on the same real
    batches, interleaved (bench/RESULTS.md).
    """
    from model.runtime import usable_cores
    return {"PERFORMANCE_HINT": "THROUGHPUT",
            "INFERENCE_NUM_THREADS": int(threads or usable_cores()),
            "INFERENCE_PRECISION_HINT": _HINTS[precision]}


def row_splits(rows: int, parts: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of at most ``parts`` contiguous, non-empty row
    ranges that cover ``rows`` rows, as equal as can be."""
    parts = max(1, min(parts, rows))
    return [(i * rows // parts, (i + 1) * rows // parts)
            for i in range(parts)]


def bf16_note(requested: str, compiled_hint: str,
              cpu_flags: frozenset[str]) -> tuple[str, Optional[str]]:
    """The precision a compiled model really runs, and a warning to log
    when it differs from ``requested`` or is slow: OpenVINO ignores a
    bfloat16 hint where the CPU cannot do bfloat16 and emulates it on
    AVX-512 CPUs without AVX512-BF16/AMX."""
    from model.runtime import BF16_CPU_FLAGS
    if requested != "bfloat16":
        return requested, None
    if compiled_hint.lower() not in ("bf16", "bfloat16"):
        return "float32", ("this CPU has no bfloat16 (AVX512-BF16/AMX): "
                           "OpenVINO runs float32 instead")
    if cpu_flags.isdisjoint(BF16_CPU_FLAGS):
        return "bfloat16", ("this CPU has no native bfloat16 "
                            "(AVX512-BF16/AMX): OpenVINO emulates it, "
                            "slower than float32")
    return "bfloat16", None


class OpenVINOBertModel:
    """A compiled OpenVINO BERT with ``BertSavedModel``'s call:
    ``model(input_word_ids, input_mask, segment_ids) -> (pooled [B, H],
    sequence [B, S, H])`` as float32 numpy arrays.

    ``precision`` is what the compiled model runs; ``limits`` bound the
    inputs each call accepts (``model.load.check_inputs``: OpenVINO
    itself would read an id past the word table as zeros).  Safe to call
    from several threads (each gets its own infer requests).
    """

    engine = "openvino"

    def __init__(self, model_dir: str, compiled: Any, precision: str,
                 limits: ModelLimits = ModelLimits()) -> None:
        self.model_dir = model_dir
        self.precision = precision
        self.limits = limits
        self._compiled = compiled
        self._inputs = {name: compiled.input(name) for name in INPUT_NAMES}
        self._dtypes = {name: port.get_element_type().to_dtype()
                        for name, port in self._inputs.items()}
        self._outputs = [compiled.output(name) for name in OUTPUT_NAMES]
        self._local = threading.local()
        self.notes: list[str] = []  # how the precision was arrived at

    @property
    def streams(self) -> int:
        """Requests the compiled model runs at once: a batch's rows are
        split into this many parts."""
        return max(1, int(self._compiled.get_property(
            "OPTIMAL_NUMBER_OF_INFER_REQUESTS")))

    def _requests(self) -> list[Any]:
        """This thread's infer requests, one per stream."""
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = [
                self._compiled.create_infer_request()
                for _ in range(self.streams)]
        return requests

    def __call__(self, input_word_ids: np.ndarray, input_mask: np.ndarray,
                 segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pooled_output, sequence_output)``; ``ModelInputError`` (one
        line) for arrays that are not a valid batch for this model.

        The rows are split across the streams (``row_splits``) and run at
        once; BERT computes each row on its own, so the parts' outputs are
        the whole batch's.  Each part's outputs are copied once, straight
        into the result (the requests' buffers are reused by their next
        call).
        """
        arrays = check_inputs(dict(zip(INPUT_NAMES, (
            input_word_ids, input_mask, segment_ids))), self.limits)
        feed = {self._inputs[n]: np.ascontiguousarray(a, self._dtypes[n])
                for n, a in arrays.items()}
        rows = len(input_word_ids)
        running = list(zip(self._requests(), row_splits(rows, self.streams)))
        for request, (start, stop) in running:
            request.start_async({port: array[start:stop]
                                 for port, array in feed.items()},
                                share_inputs=True)
        return self._collect(running, rows)

    def _collect(self, running: list[tuple[Any, tuple[int, int]]],
                 rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Waits for every started request (all of them, also when one
        fails, so none is still writing when the error is raised) and
        gathers their outputs into ``(pooled, sequence)`` float32 arrays
        of ``rows`` rows."""
        error: Optional[BaseException] = None
        outputs: list[np.ndarray] = []
        for request, (start, stop) in running:
            try:
                request.wait()
            except Exception as err:  # pylint: disable=broad-except
                error = error or err
                continue
            if error is not None:
                continue
            parts = [request.get_tensor(port).data for port in self._outputs]
            if not outputs:
                outputs = [np.empty((rows,) + part.shape[1:], np.float32)
                           for part in parts]
            for output, part in zip(outputs, parts):
                output[start:stop] = part
        if error is not None:
            raise error
        pooled, sequence = outputs
        return pooled, sequence


def _compile(core: Any, model: Any, precision: str,
             threads: Optional[int]) -> Any:
    started = time.perf_counter()
    compiled = core.compile_model(model, "CPU",
                                  compile_config(precision, threads))
    _LOG.info("OpenVINO compiled the model for %s in %.1f s", precision,
              time.perf_counter() - started)
    return compiled


def _self_check_file(ir_dir: Optional[str], precision: str) -> Optional[str]:
    """Where the verdict of ``precision``'s self-check on this CPU kind is
    kept beside the cached IR (None without a cache entry)."""
    if ir_dir is None:
        return None
    import hashlib
    from model.runtime import cpu_flags, cpu_model_name
    cpu = hashlib.sha256((cpu_model_name() + " " + " ".join(
        sorted(cpu_flags()))).encode("utf-8")).hexdigest()[:16]
    return os.path.join(ir_dir, f"selfcheck-{precision}-{cpu}.json")


def self_check(model_dir: str, core: Any, model: Any, candidate: Any,
               precision: str, threads: Optional[int],
               ir_dir: Optional[str]) -> tuple[bool, str]:
    """Whether ``candidate`` (compiled at ``precision``) keeps its
    accuracy target against float32 on the probe sentences, and a note
    saying by how much.  The verdict is cached beside the IR per CPU kind,
    so later runs on such a CPU skip the float32 compile."""
    from model.self_check import (ACCURACY_TARGETS, compare_engines,
                                  probe_batches)
    target = ACCURACY_TARGETS[precision]
    cached = _self_check_file(ir_dir, precision)
    if cached and os.path.isfile(cached):
        try:
            with open(cached, encoding="utf-8") as handle:
                verdict = json.load(handle)
            if verdict.get("target") == target:
                return bool(verdict["ok"]), verdict["note"] + " (cached)"
        except (OSError, ValueError, KeyError):
            pass  # recompute
    reference = OpenVINOBertModel(
        model_dir, _compile(core, model, "float32", threads), "float32",
        candidate.limits)
    stats = compare_engines(reference, candidate, probe_batches(model_dir))
    ok = stats.meets(target)
    note = (f"self-check on {stats.documents} probe sentences: min cosine "
            f"to float32 {stats.min_cosine:.6f} "
            f"{'>=' if ok else '<'} {target}")
    if cached:
        try:
            _write_json_atomically(cached, {"ok": ok, "note": note,
                                            "target": target,
                                            **stats.to_dict()})
        except OSError:
            pass  # a verdict not cached is computed again next time
    return ok, note


def load_openvino_model(model_dir: str, precision: str,
                        threads: Optional[int] = None,
                        int8_model: Optional[str] = None,
                        check_accuracy: bool = False
                        ) -> OpenVINOBertModel:
    """Loads the SavedModel at ``model_dir`` (a directory, or a TF Hub
    handle: see ``model.handles.resolve_model_path``) into OpenVINO at
    ``precision`` (``float32``, ``bfloat16`` or ``int8``).

    ``int8`` runs the quantized model ``int8_model`` (or the cached one,
    see ``find_int8_model``).  ``check_accuracy`` (for a precision that
    ``--precision auto`` picked) runs the self-check and falls back to
    float32 with one warning when the precision misses its target.  The
    returned model's ``precision`` is what it runs and ``notes`` says why.
    """
    import openvino as ov
    from model.runtime import cpu_flags
    model_dir = resolve_model_path(model_dir)
    core = ov.Core()
    notes = []
    ir_dir = None
    if precision == "int8":
        path = find_int8_model(model_dir, int8_model)
        model = core.read_model(os.path.join(_local_int8_dir(path), IR_XML))
        notes.append(f"int8 model {path}")
        limits = limits_from_json(read_int8_info(path).get("limits"))
        if limits is None:
            entry = ir_cache_dir(model_digest(model_dir))
            limits = model_limits(model_dir, entry if os.path.isfile(
                os.path.join(entry, IR_XML)) else None)
    else:
        model, ir_dir = converted_model(model_dir, core)
        limits = model_limits(model_dir, ir_dir)
    compiled = _compile(core, model, precision, threads)
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    hint = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    effective, warning = bf16_note(precision, hint, cpu_flags())
    if warning:
        _LOG.warning("%s", warning)
        notes.append(warning)
    result = OpenVINOBertModel(model_dir, compiled, effective, limits)
    if check_accuracy and effective != "float32":
        ok, note = self_check(model_dir, core, model, result, effective,
                              threads, ir_dir)
        notes.append(note)
        if not ok:
            _LOG.warning("%s misses its accuracy target on %s (%s); running "
                         "float32", effective, model_dir, note)
            result = OpenVINOBertModel(
                model_dir, _compile(core, model, "float32", threads),
                "float32", limits)
    result.notes = notes
    return result
