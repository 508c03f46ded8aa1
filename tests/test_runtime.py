"""TensorFlow runtime settings: validated, and harmless when applied late."""

from __future__ import annotations

import subprocess
import sys

import pytest

from model.runtime import PRECISIONS, configure_tensorflow, usable_cores
from tests.conftest import ROOT


def test_usable_cores_is_positive():
    assert usable_cores() >= 1


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        configure_tensorflow(precision="int8")
    assert PRECISIONS == ("float32", "bfloat16")


def test_settings_after_runtime_start_are_skipped_not_fatal():
    import tensorflow as tf
    tf.constant(1.0) + 1.0  # the runtime has started
    configure_tensorflow(3, 2)  # must not raise


def test_threads_apply_in_a_fresh_process():
    code = ("from model.runtime import configure_tensorflow\n"
            "import tensorflow as tf\n"
            "configure_tensorflow(1, 1)\n"
            "print(tf.config.threading.get_intra_op_parallelism_threads(),"
            " tf.config.threading.get_inter_op_parallelism_threads())\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1", "1"]
