"""Runtime settings for a worker: TensorFlow's threads and precision, the
hardware it runs on (CPU flags, GPU models) and where caches live.

Applied once per worker process, just before the model is loaded (the model
handler's ``load_model``), because TensorFlow fixes its thread pools when its
runtime starts.  A setting that comes too late (the runtime already started
in this process, e.g. in a single-process DirectRunner run whose launcher
used TensorFlow) is logged and skipped, never an error.
"""

from __future__ import annotations

import glob
import logging
import os
import platform
from typing import Optional

_LOG = logging.getLogger(__name__)

PRECISIONS = ("float32", "bfloat16")

# CPU flags that make oneDNN's bfloat16 kernels fast (native bf16 dot
# products); without them TensorFlow emulates bf16 and it is slower.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

CACHE_ENV_VAR = "BERT_ZH_EMBED_CACHE"


def default_cache_dir() -> str:
    """``$BERT_ZH_EMBED_CACHE`` if set (non-empty), else ``~/.cache/bert_zh_embed``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return os.path.expanduser(configured)
    return os.path.join(os.path.expanduser("~"), ".cache", "bert_zh_embed")


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpuinfo() -> str:
    """``/proc/cpuinfo`` ("" where there is none, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return ""


def cpu_model_name() -> str:
    """The CPU's model name, for benchmark reports."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``avx2``, ``avx512_bf16``, ...); empty where
    ``/proc/cpuinfo`` has none."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def gpu_models() -> list[str]:
    """The NVIDIA GPU models this machine's driver lists in its /proc files
    (empty without a driver); engine selection reads them without starting
    TensorFlow."""
    models = []
    for path in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        try:
            with open(path, encoding="utf-8") as handle:
                models += [line.split(":", 1)[1].strip() for line in handle
                           if line.startswith("Model:")]
        except OSError:
            continue
    return models


def cpu_has_fast_bfloat16() -> bool:
    """Whether the CPU has native bfloat16 instructions."""
    return not cpu_flags().isdisjoint(BF16_CPU_FLAGS)


def configure_tensorflow(intra_op_threads: Optional[int] = None,
                         inter_op_threads: Optional[int] = None,
                         precision: str = "float32") -> None:
    """Sets TensorFlow's thread pools and precision for this process.

    ``intra_op_threads`` (threads inside one matmul) defaults to the usable
    cores; ``inter_op_threads`` (ops run side by side) to 1, since BERT's
    graph is one long chain and a second pool only competes for the same
    cores.  ``bfloat16`` turns on oneDNN's automatic bfloat16 rewrite of the
    model's graph, which TensorFlow applies on CPUs with native bfloat16
    (AVX512-BF16 or AMX) only.
    """
    import tensorflow as tf
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    intra = intra_op_threads or usable_cores()
    inter = inter_op_threads or 1
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
        _LOG.info("TensorFlow threads: intra-op %d, inter-op %d", intra,
                  inter)
    except RuntimeError:
        _LOG.info("TensorFlow runtime already started in this process; "
                  "keeping its thread settings (intra-op %d, inter-op %d)",
                  tf.config.threading.get_intra_op_parallelism_threads(),
                  tf.config.threading.get_inter_op_parallelism_threads())
    if precision == "bfloat16":
        if tf.config.list_physical_devices("GPU"):
            _LOG.warning("--precision bfloat16 rewrites CPU graphs only "
                         "(oneDNN); the GPU runs float32")
        elif not cpu_has_fast_bfloat16():
            _LOG.warning("this CPU has no native bfloat16 (AVX512-BF16/AMX):"
                         " TensorFlow's oneDNN bfloat16 rewrite is not "
                         "expected to apply (on an AVX2 machine it left the "
                         "outputs bit-identical to float32)")
        tf.config.optimizer.set_experimental_options(
            {"auto_mixed_precision_onednn_bfloat16": True})
