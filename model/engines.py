"""Which engine runs the model on a worker, at which precision.

Every engine takes the user's SavedModel as it is and gives
``BertSavedModel``'s call: ``model(input_word_ids, input_mask,
segment_ids) -> (pooled [B, H], sequence [B, S, H])`` as float32 numpy
arrays, so tokenization, batching and outputs do not change with it.

``tensorflow``
    The SavedModel itself (``model.load``), through XLA where the job
    turns it on (float32 only).  ``bfloat16`` is oneDNN's automatic
    rewrite on CPUs and a re-trace with bfloat16 matrix products on GPUs
    (``model.bf16_graph``); no int8.
``openvino``
    The SavedModel converted once to OpenVINO IR (cached on disk) and
    compiled with dynamic batch and length on the CPU
    (``model.openvino_engine``): ``float32``, ``bfloat16``, or ``int8``
    from a model quantized offline (``python -m model.quantize``).

The rule for ``auto`` (``choose_engine``, per worker, logged once in one
line naming the engine, the precision and why):

* engine: TensorFlow where TensorFlow can use a GPU; otherwise OpenVINO
  where it is installed, else TensorFlow.  ``int8`` always runs on
  OpenVINO.  If OpenVINO cannot load the model, the worker warns once and
  runs TensorFlow (not for int8, which only OpenVINO runs).
* precision: bfloat16 where the hardware computes it natively (CPU flags
  ``amx_bf16`` or ``avx512_bf16``; GPUs of compute capability 8.0 or
  later), float32 elsewhere; never int8, which needs its offline model.  A
  bfloat16 that auto picked is kept only if a self-check on fixed probe
  sentences keeps every cosine to float32 at or above its target
  (``model.self_check.ACCURACY_TARGETS``), else the worker warns once and
  runs float32.  The check runs on the loaded model because bfloat16's
  error depends on the weights, not only on the hardware; OpenVINO caches
  its verdict beside the converted model.  TensorFlow's CPU rewrite cannot
  be compared in-process (the rewrite applies to the whole process) and is
  taken as measured (pooled cosine >= 0.9998 on BERT-Base).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from typing import Any, Optional

from model.errors import ModelFormatError, one_line

_LOG = logging.getLogger(__name__)

AUTO, TENSORFLOW, OPENVINO = "auto", "tensorflow", "openvino"
ENGINES = (AUTO, TENSORFLOW, OPENVINO)
PRECISIONS = (AUTO, "float32", "bfloat16", "int8")
CPU, GPU = "cpu", "gpu"


class EngineError(ValueError):
    """A combination of engine, precision and model that cannot run; the
    message is one line."""


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What engine selection looks at on a worker.

    ``gpus``: GPUs TensorFlow can use (empty on CPU workers);
    ``gpu_bfloat16``: whether they all compute bfloat16 natively (None
    until looked at, which needs TensorFlow's runtime); ``openvino``:
    whether the package is installed.
    """
    cpu_flags: frozenset[str] = frozenset()
    gpus: tuple[str, ...] = ()
    gpu_bfloat16: Optional[bool] = None
    openvino: bool = False

    @property
    def cpu_bfloat16(self) -> Optional[str]:
        """The CPU flag that gives native bfloat16, or None."""
        from model.runtime import BF16_CPU_FLAGS
        found = sorted(self.cpu_flags.intersection(BF16_CPU_FLAGS))
        return found[0] if found else None


@dataclasses.dataclass(frozen=True)
class EngineChoice:
    """An engine and precision for a worker, the device it computes on,
    and why each was chosen (for the log line)."""
    engine: str
    precision: str
    device: str
    engine_reason: str
    precision_reason: str

    @property
    def reason(self) -> str:
        return f"{self.engine_reason}; {self.precision_reason}"

    def with_precision(self, precision: str, note: str) -> "EngineChoice":
        """This choice at ``precision``, with ``note`` added to why."""
        return dataclasses.replace(
            self, precision=precision,
            precision_reason=f"{self.precision_reason}; {note}")


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What a job asks of every worker's engine (the model handler holds
    one; see ``load_engine``)."""
    model_dir: str
    engine: str = AUTO
    precision: str = AUTO
    intra_op_threads: Optional[int] = None
    inter_op_threads: Optional[int] = None
    jit_compile: bool = False
    int8_model: Optional[str] = None


def openvino_installed() -> bool:
    """Whether ``openvino`` can be imported (checked without importing)."""
    return importlib.util.find_spec("openvino") is not None


def tensorflow_gpus() -> tuple[str, ...]:
    """GPUs TensorFlow can use here, found without starting its runtime:
    the NVIDIA driver's GPU models, unless ``CUDA_VISIBLE_DEVICES`` hides
    them all or this TensorFlow has no CUDA support."""
    from model.runtime import gpu_models
    models = gpu_models()
    if not models:
        return ()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return ()
    import tensorflow as tf
    return tuple(models) if tf.test.is_built_with_cuda() else ()


def gpus_compute_bfloat16() -> bool:
    """Whether every GPU TensorFlow lists has compute capability 8.0 or
    later (native bfloat16 matrix units)."""
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    capabilities = [tf.config.experimental.get_device_details(gpu).get(
        "compute_capability") for gpu in gpus]
    return bool(capabilities) and all(
        c is not None and tuple(c) >= (8, 0) for c in capabilities)


def detect_hardware() -> Hardware:
    """This worker's ``Hardware`` (``gpu_bfloat16`` left unknown)."""
    from model.runtime import cpu_flags
    return Hardware(cpu_flags(), tensorflow_gpus(), None,
                    openvino_installed())


def _auto_precision(device: str, hardware: Hardware) -> tuple[str, str]:
    """The precision ``auto`` means on ``device``, and why."""
    if device == GPU:
        if hardware.gpu_bfloat16:
            return "bfloat16", "the GPU computes bfloat16 natively"
        return "float32", ("the GPU has no native bfloat16" if
                           hardware.gpu_bfloat16 is False else
                           "GPU bfloat16 support not known")
    flag = hardware.cpu_bfloat16
    if flag:
        return "bfloat16", f"the CPU has {flag}"
    return "float32", "the CPU has no AMX/AVX512-BF16"


def choose_engine(engine: str, precision: str, hardware: Hardware
                  ) -> EngineChoice:
    """The engine and precision a worker with ``hardware`` runs for the
    requested ``engine`` and ``precision`` (see the module docstring for
    the rule).

    Raises EngineError for a request that cannot run: int8 on TensorFlow,
    or OpenVINO (asked for by name, or for int8) where it is not
    installed.
    """
    if engine not in ENGINES or precision not in PRECISIONS:
        raise EngineError(f"engine must be one of {ENGINES} and precision "
                          f"one of {PRECISIONS}, got {engine}, {precision}")
    if engine == AUTO:
        if precision == "int8":
            engine, why = OPENVINO, "int8 runs on OpenVINO"
        elif hardware.gpus:
            engine, why = TENSORFLOW, (f"TensorFlow sees a GPU "
                                       f"({hardware.gpus[0]})")
        elif hardware.openvino:
            engine, why = OPENVINO, ("CPU worker without a visible GPU, "
                                     "OpenVINO installed")
        else:
            engine, why = TENSORFLOW, ("CPU worker, OpenVINO not "
                                       "installed")
        why = f"engine auto: {why}"
    else:
        why = f"--engine {engine}"
    if precision == "int8" and engine == TENSORFLOW:
        raise EngineError("--precision int8 runs on OpenVINO only: use "
                          "--engine openvino or auto")
    if engine == OPENVINO and not hardware.openvino:
        raise EngineError("OpenVINO is not installed (pip install "
                          "openvino): use --engine tensorflow or auto")
    device = GPU if engine == TENSORFLOW and hardware.gpus else CPU
    if precision == AUTO:
        precision, because = _auto_precision(device, hardware)
        because = f"precision auto: {because}"
    else:
        because = f"--precision {precision}"
    return EngineChoice(engine, precision, device, why, because)


def xla_applies(jit_compile: bool, precision: str,
                engine: str = TENSORFLOW) -> bool:
    """Whether a worker may run the model through XLA: the job turns XLA
    on, the engine may be TensorFlow, and the precision may be float32 or
    bfloat16 (which only GPU workers compile: ``xla_compiles``)."""
    return (jit_compile and engine in (AUTO, TENSORFLOW)
            and precision in (AUTO, "float32", "bfloat16"))


def xla_compiles(precision: str, device: str) -> bool:
    """Whether the TensorFlow engine's model at ``precision`` on
    ``device`` is a graph XLA compiles: float32 anywhere, bfloat16 on GPUs
    (the re-trace); on CPUs bfloat16 is oneDNN's rewrite, which XLA does
    not see."""
    return precision == "float32" or (precision == "bfloat16"
                                      and device == GPU)


# --- loading -----------------------------------------------------------------


def _tensorflow_bfloat16_gpu(spec: EngineSpec, choice: EngineChoice
                             ) -> tuple[Optional[Any], EngineChoice]:
    """The bfloat16 re-trace for a GPU worker, self-checked when auto
    picked it; (None, float32 choice) when it cannot be had, (the float32
    model, float32 choice) when it misses its target."""
    from model.bf16_graph import load_bfloat16_model
    from model.load import load_bert_saved_model
    try:
        model = load_bfloat16_model(spec.model_dir, spec.jit_compile)
    except ModelFormatError as err:
        _LOG.warning("bfloat16 on the GPU is not available for %s (%s); "
                     "running float32", spec.model_dir, err)
        return None, choice.with_precision(
            "float32", "no bfloat16 re-trace for this model")
    if spec.precision != AUTO:
        return model, choice
    from model.self_check import (ACCURACY_TARGETS, compare_engines,
                                  probe_batches)
    reference = load_bert_saved_model(spec.model_dir)
    stats = compare_engines(reference, model, probe_batches(spec.model_dir))
    target = ACCURACY_TARGETS["bfloat16"]
    note = (f"self-check on {stats.documents} probe sentences: min cosine "
            f"to float32 {stats.min_cosine:.6f}")
    if stats.meets(target):
        return model, choice.with_precision("bfloat16", f"{note} >= {target}")
    _LOG.warning("bfloat16 misses its accuracy target on %s (%s < %s); "
                 "running float32", spec.model_dir, note, target)
    return reference, choice.with_precision("float32", f"{note} < {target}")


def _load_tensorflow(spec: EngineSpec, choice: EngineChoice,
                     hardware: Hardware) -> tuple[Any, EngineChoice]:
    """The TensorFlow engine: thread and precision settings first, then
    the model (bfloat16 re-trace on GPUs; XLA, when on, for float32 and
    the re-trace)."""
    from model.load import load_bert_saved_model
    from model.runtime import configure_tensorflow
    threads = (spec.intra_op_threads, spec.inter_op_threads)
    model = None
    if choice.device == GPU:
        configure_tensorflow(*threads, precision="float32")
        if spec.precision == AUTO:  # needs TensorFlow's device list
            hardware = dataclasses.replace(
                hardware, gpu_bfloat16=gpus_compute_bfloat16())
            precision, because = _auto_precision(GPU, hardware)
            choice = dataclasses.replace(
                choice, precision=precision,
                precision_reason=f"precision auto: {because}")
        if choice.precision == "bfloat16":
            model, choice = _tensorflow_bfloat16_gpu(spec, choice)
    else:
        configure_tensorflow(*threads, precision=choice.precision)
    if model is None:
        jit = spec.jit_compile and xla_compiles(choice.precision,
                                                choice.device)
        model = load_bert_saved_model(spec.model_dir, jit)
    return model, choice


def _load_openvino(spec: EngineSpec, choice: EngineChoice
                   ) -> tuple[Any, EngineChoice]:
    from model.openvino_engine import load_openvino_model
    model = load_openvino_model(
        spec.model_dir, choice.precision, spec.intra_op_threads,
        spec.int8_model, check_accuracy=spec.precision == AUTO)
    if model.notes or model.precision != choice.precision:
        choice = choice.with_precision(model.precision,
                                       "; ".join(model.notes))
    return model, choice


def load_engine(spec: EngineSpec, hardware: Optional[Hardware] = None
                ) -> Any:
    """Loads the model for this worker with the engine and precision that
    ``spec`` and ``hardware`` (default: this machine's) call for, and logs
    the choice in one line.  The model's ``engine_choice`` holds it.

    Raises EngineError for a combination that cannot run here, and
    ``model.errors.ModelFormatError`` when no engine can load the model.
    """
    hardware = hardware or detect_hardware()
    choice = choose_engine(spec.engine, spec.precision, hardware)
    model = None
    if choice.engine == OPENVINO:
        try:
            model, choice = _load_openvino(spec, choice)
        except Exception as err:  # pylint: disable=broad-except
            # OpenVINO raises plain RuntimeErrors for models it cannot
            # convert or compile; any of them means "use TensorFlow".
            if choice.precision == "int8":
                if isinstance(err, ModelFormatError):
                    raise
                raise ModelFormatError(
                    f"OpenVINO cannot run the int8 model for "
                    f"{spec.model_dir}: {type(err).__name__}: "
                    + one_line(err)[:300]) from err
            _LOG.warning("OpenVINO cannot run %s (%s: %s); falling back to "
                         "TensorFlow", spec.model_dir, type(err).__name__,
                         one_line(err)[:300])
            choice = dataclasses.replace(
                choose_engine(TENSORFLOW, spec.precision, hardware),
                engine_reason="OpenVINO failed to load the model")
    from model.load import count_load, load_count
    loads = load_count()
    if model is None:
        model, choice = _load_tensorflow(spec, choice, hardware)
    if load_count() == loads:  # engines other than load_bert_saved_model
        count_load()
    model.engine_choice = choice
    _LOG.info("Inference engine: %s, precision %s on the %s (%s) [pid %d]",
              choice.engine, choice.precision, choice.device.upper(),
              choice.reason, os.getpid())
    return model


# --- per-job XLA decision ----------------------------------------------------

XLA_SETTINGS = (AUTO, "on", "off")
# Input per worker from which --xla auto compiles.  XLA saves ~10% of
# BERT-Base's float32 model time (1,657 vs 1,492 tokens/s at 32x48 on 2
# cores) after 3-8 s of compiling per batch shape, 16-32 shapes per
# worker: ~100-250 s, repaid after ~1,000-2,500 s of plain-graph work,
# ~1.5-3.7M tokens.  Chinese UTF-8 text is ~3 bytes per token, so ~8 MiB
# of input per worker; the demo model (2.7 s per shape, ~25% faster)
# breaks even at a similar size.  A smaller job runs the plain graph.
XLA_AUTO_MIN_BYTES_PER_WORKER = 8 << 20


def decide_xla(setting: str, choice: EngineChoice,
               input_bytes: Optional[int], workers: int) -> tuple[bool, str]:
    """Whether a job compiles with XLA (``--xla on|off|auto``), and why.

    ``auto`` is on only where XLA can apply (the TensorFlow engine at
    float32, or at bfloat16 on a GPU, as ``choice`` predicts it for the
    launcher's machine) and pays: the input is at least
    ``XLA_AUTO_MIN_BYTES_PER_WORKER`` per worker (``input_bytes`` None:
    unknown, e.g. compressed input, counts as small).
    """
    if setting not in XLA_SETTINGS:
        raise EngineError(f"--xla must be one of {XLA_SETTINGS}")
    if setting != AUTO:
        return setting == "on", f"--xla {setting}"
    if (choice.engine != TENSORFLOW
            or not xla_compiles(choice.precision, choice.device)):
        return False, (f"xla auto: {choice.engine} at {choice.precision} "
                       f"on {choice.device} does not use XLA")
    if input_bytes is None:
        return False, ("xla auto: input size unknown (compressed); pass "
                       "--xla on for a large job")
    per_worker = input_bytes / max(1, workers)
    verdict = per_worker >= XLA_AUTO_MIN_BYTES_PER_WORKER
    return verdict, (f"xla auto: {per_worker / 2**20:.1f} MiB of input per "
                     f"worker {'>=' if verdict else '<'} "
                     f"{XLA_AUTO_MIN_BYTES_PER_WORKER >> 20} MiB")
