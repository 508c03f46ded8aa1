"""Engine and precision selection (``model.engines``), the per-job XLA
decision, the fallback to TensorFlow, and the launcher's flag checks.

Hardware is faked where the rule depends on it, so these run the same on
an AVX2-only CPU and on one with AMX.
"""

from __future__ import annotations

import dataclasses

import logging

import numpy as np
import pytest

from model import engines, runtime
from model.engines import (AUTO, OPENVINO, TENSORFLOW, EngineError,
                           EngineSpec, Hardware, choose_engine, decide_xla,
                           load_engine, xla_applies)
from model.errors import ModelFormatError
from model.load import BertSavedModel
from model.runtime import cpu_has_fast_bfloat16
from pipeline.run import EXIT_USAGE, main

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
AMX = AVX2 | {"avx512f", "avx512_bf16", "amx_bf16", "amx_int8"}

CPU_AVX2 = Hardware(AVX2, openvino=True)
CPU_AMX = Hardware(AMX, openvino=True)
GPU_A100 = Hardware(AVX2, ("NVIDIA A100-SXM4-40GB",), True, True)

OPENVINO_PRESENT = pytest.mark.skipif(
    not engines.openvino_installed(), reason="openvino is not installed")


# --- the rule ----------------------------------------------------------------


@pytest.mark.parametrize("hardware, engine, precision, device", [
    (CPU_AVX2, OPENVINO, "float32", "cpu"),
    (CPU_AMX, OPENVINO, "bfloat16", "cpu"),
    (Hardware(frozenset({"avx512_bf16"}), openvino=True), OPENVINO,
     "bfloat16", "cpu"),
    (Hardware(AMX, openvino=False), TENSORFLOW, "bfloat16", "cpu"),
    (Hardware(AVX2, openvino=False), TENSORFLOW, "float32", "cpu"),
    (GPU_A100, TENSORFLOW, "bfloat16", "gpu"),
    (Hardware(AMX, ("Tesla T4",), False, True), TENSORFLOW, "float32", "gpu"),
    (Hardware(AMX, ("Tesla T4",), None, True), TENSORFLOW, "float32", "gpu"),
])
def test_auto_picks_by_hardware(hardware, engine, precision, device):
    choice = choose_engine(AUTO, AUTO, hardware)
    assert (choice.engine, choice.precision, choice.device) == \
        (engine, precision, device)
    assert choice.reason.startswith("engine auto: ")
    assert "precision auto: " in choice.reason


def test_auto_never_picks_bfloat16_without_bfloat16_hardware():
    for flags in (AVX2, AVX2 | {"avx512f", "avx512bw"}, frozenset()):
        for openvino in (True, False):
            assert choose_engine(AUTO, AUTO, Hardware(
                flags, openvino=openvino)).precision == "float32"


def test_named_engine_and_precision_are_kept():
    choice = choose_engine(TENSORFLOW, "bfloat16", CPU_AVX2)
    assert (choice.engine, choice.precision) == (TENSORFLOW, "bfloat16")
    assert choice.reason == "--engine tensorflow; --precision bfloat16"
    assert choose_engine(OPENVINO, "float32", CPU_AMX).precision == "float32"
    # OpenVINO computes on the CPU even where a GPU is visible.
    assert choose_engine(OPENVINO, AUTO, GPU_A100).device == "cpu"


def test_int8_runs_on_openvino_only():
    with pytest.raises(EngineError, match="int8 runs on OpenVINO only"):
        choose_engine(TENSORFLOW, "int8", CPU_AMX)
    # auto sends int8 to OpenVINO, GPU or not; never picks int8 itself.
    assert choose_engine(AUTO, "int8", GPU_A100).engine == OPENVINO
    with pytest.raises(EngineError, match="not installed"):
        choose_engine(AUTO, "int8", Hardware(AMX, openvino=False))


def test_openvino_by_name_needs_it_installed():
    with pytest.raises(EngineError, match="OpenVINO is not installed"):
        choose_engine(OPENVINO, "float32", Hardware(AVX2))


def test_unknown_names_are_refused():
    with pytest.raises(EngineError):
        choose_engine("onnx", AUTO, CPU_AVX2)
    with pytest.raises(EngineError):
        choose_engine(AUTO, "float16", CPU_AVX2)


def test_gpus_count_only_when_tensorflow_can_use_them(monkeypatch):
    import tensorflow as tf
    monkeypatch.setattr(runtime, "gpu_models", lambda: [])
    assert engines.tensorflow_gpus() == ()
    monkeypatch.setattr(runtime, "gpu_models", lambda: ["NVIDIA L4"])
    monkeypatch.setattr(tf.test, "is_built_with_cuda", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert engines.tensorflow_gpus() == ("NVIDIA L4",)
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert engines.tensorflow_gpus() == ()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(tf.test, "is_built_with_cuda", lambda: False)
    assert engines.tensorflow_gpus() == ()


def test_detect_hardware_reads_cpu_flags_and_openvino(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: AMX)
    monkeypatch.setattr(runtime, "gpu_models", lambda: [])
    monkeypatch.setattr(engines, "openvino_installed", lambda: False)
    hardware = engines.detect_hardware()
    assert hardware == Hardware(AMX, (), None, False)
    assert hardware.cpu_bfloat16 == "amx_bf16"


def test_xla_applies_only_where_tensorflow_may_run_it():
    assert xla_applies(True, "float32", TENSORFLOW)
    assert xla_applies(True, AUTO, AUTO)
    # GPU workers compile the bfloat16 re-trace (CPU workers ignore it).
    assert xla_applies(True, "bfloat16", TENSORFLOW)
    assert not xla_applies(False, "float32", TENSORFLOW)
    assert not xla_applies(True, "float32", OPENVINO)
    assert not xla_applies(True, "bfloat16", OPENVINO)
    assert not xla_applies(True, "int8", AUTO)


def test_xla_compiles_float32_anywhere_bfloat16_on_gpus():
    assert engines.xla_compiles("float32", engines.CPU)
    assert engines.xla_compiles("float32", engines.GPU)
    assert engines.xla_compiles("bfloat16", engines.GPU)
    assert not engines.xla_compiles("bfloat16", engines.CPU)
    assert not engines.xla_compiles("int8", engines.CPU)


# --- the per-job XLA decision ------------------------------------------------


def _tf32() -> engines.EngineChoice:
    return choose_engine(TENSORFLOW, "float32", CPU_AVX2)


def test_xla_on_and_off_are_kept():
    assert decide_xla("on", choose_engine(AUTO, AUTO, CPU_AMX), 10, 1)[0]
    assert not decide_xla("off", _tf32(), 10 << 30, 1)[0]


def test_xla_auto_compiles_only_large_tensorflow_float32_jobs():
    big = engines.XLA_AUTO_MIN_BYTES_PER_WORKER
    on, why = decide_xla(AUTO, _tf32(), big, 1)
    assert on and ">=" in why
    on, why = decide_xla(AUTO, _tf32(), 300 * 200, 1)
    assert not on and "<" in why  # a 300-document job runs the plain graph
    # Each worker compiles for itself: the input is split among them.
    assert not decide_xla(AUTO, _tf32(), 3 * big, 4)[0]
    assert decide_xla(AUTO, _tf32(), 4 * big, 4)[0]
    # Unknown size (compressed input) counts as small.
    assert not decide_xla(AUTO, _tf32(), None, 1)[0]
    # Engines and precisions that do not use XLA.
    assert not decide_xla(AUTO, choose_engine(AUTO, AUTO, CPU_AVX2), 10 * big,
                          1)[0]
    assert not decide_xla(AUTO, choose_engine(TENSORFLOW, "bfloat16",
                                              CPU_AMX), 10 * big, 1)[0]
    # On a GPU the bfloat16 re-trace compiles like float32.
    gpu_bf16 = dataclasses.replace(_tf32(), precision="bfloat16",
                                   device=engines.GPU)
    assert decide_xla(AUTO, gpu_bf16, big, 1)[0]
    assert not decide_xla(AUTO, gpu_bf16, big // 2, 1)[0]


# --- loading and falling back ------------------------------------------------


def _batch():
    ids = np.array([[101, 120, 130, 140, 102], [101, 150, 102, 0, 0]],
                   np.int32)
    return ids, (ids > 0).astype(np.int32), np.zeros_like(ids)


@OPENVINO_PRESENT
def test_auto_loads_openvino_on_a_cpu_and_logs_one_line(tiny_model_dir,
                                                         caplog):
    from model.openvino_engine import OpenVINOBertModel
    caplog.set_level(logging.INFO, logger="model.engines")
    model = load_engine(EngineSpec(tiny_model_dir, AUTO, "float32"),
                        CPU_AVX2)
    assert isinstance(model, OpenVINOBertModel)
    lines = [r.getMessage() for r in caplog.records
             if r.name == "model.engines"]
    assert len(lines) == 1
    assert lines[0].startswith("Inference engine: openvino, precision "
                               "float32 on the CPU (engine auto: CPU worker")
    assert model.engine_choice.engine == OPENVINO


def test_auto_without_openvino_loads_tensorflow(tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="model.engines")
    model = load_engine(EngineSpec(tiny_model_dir, AUTO, AUTO),
                        Hardware(AVX2, openvino=False))
    assert isinstance(model, BertSavedModel)
    assert model.engine_choice.reason.startswith(
        "engine auto: CPU worker, OpenVINO not installed")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("failure", ["import", "convert"])
def test_openvino_failure_falls_back_to_tensorflow_with_one_warning(
        failure, tiny_model_dir, monkeypatch, caplog):
    """An OpenVINO that cannot be imported, or cannot read the model: the
    worker warns once and runs TensorFlow, with the same outputs."""
    import sys
    from model import openvino_engine
    if failure == "import":
        monkeypatch.setitem(sys.modules, "openvino", None)
    else:
        monkeypatch.setattr(openvino_engine, "convert", _cannot_convert)
        monkeypatch.setattr(openvino_engine, "ir_cache_dir",
                            lambda digest: "/nonexistent/ir/" + digest)
    caplog.set_level(logging.INFO, logger="model.engines")
    model = load_engine(EngineSpec(tiny_model_dir, AUTO, "float32"),
                        CPU_AVX2)
    assert isinstance(model, BertSavedModel)
    assert model.engine_choice.engine == TENSORFLOW
    assert model.engine_choice.engine_reason == \
        "OpenVINO failed to load the model"
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "falling back to TensorFlow" in warnings[0]
    reference = BertSavedModel(tiny_model_dir, __import__(
        "tensorflow").saved_model.load(tiny_model_dir))
    for got, want in zip(model(*_batch()), reference(*_batch())):
        np.testing.assert_allclose(got, want, atol=1e-6)


def _cannot_convert(model_dir: str):
    raise RuntimeError("Check 'unsupported operation' failed at frontend")


def test_int8_does_not_fall_back(tiny_model_dir, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ModelFormatError, match="OpenVINO cannot run the "
                                               "int8 model"):
        load_engine(EngineSpec(tiny_model_dir, AUTO, "int8"), CPU_AMX)


def test_each_engine_load_counts_once(tiny_model_dir):
    from model import load as model_load
    before = model_load.load_count()
    load_engine(EngineSpec(tiny_model_dir, TENSORFLOW, "float32"), CPU_AVX2)
    assert model_load.load_count() == before + 1
    if engines.openvino_installed():
        load_engine(EngineSpec(tiny_model_dir, OPENVINO, "float32"),
                    CPU_AVX2)
        assert model_load.load_count() == before + 2


@OPENVINO_PRESENT
@pytest.mark.skipif(not cpu_has_fast_bfloat16(),
                    reason="needs a CPU with AMX or AVX512-BF16")
def test_auto_bfloat16_that_misses_its_target_runs_float32(
        tiny_model_dir, monkeypatch, caplog):
    """The load-time self-check: with a target bfloat16 cannot reach, auto
    warns once and compiles float32; a met target keeps bfloat16, and the
    verdict is cached beside the IR for the next load."""
    from model import self_check
    caplog.set_level(logging.INFO)
    kept = load_engine(EngineSpec(tiny_model_dir, AUTO, AUTO), CPU_AMX)
    assert kept.precision == "bfloat16"
    assert "self-check on 12 probe sentences" in \
        kept.engine_choice.precision_reason
    again = load_engine(EngineSpec(tiny_model_dir, AUTO, AUTO), CPU_AMX)
    assert "(cached)" in again.engine_choice.precision_reason
    monkeypatch.setitem(self_check.ACCURACY_TARGETS, "bfloat16", 1.5)
    caplog.clear()
    model = load_engine(EngineSpec(tiny_model_dir, AUTO, AUTO), CPU_AMX)
    assert model.precision == "float32"
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "misses its accuracy target" in warnings[0]
    # Asked for by name, bfloat16 is not second-guessed.
    assert load_engine(EngineSpec(tiny_model_dir, AUTO, "bfloat16"),
                       CPU_AMX).precision == "bfloat16"


# --- the launcher's checks (exit 2 before any work) --------------------------


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("今天天气很好。\n", encoding="utf-8")
    return path


def _launch(corpus, tmp_path, model_dir, *flags) -> int:
    return main(["--input", str(corpus), "--output", str(tmp_path / "o"),
                 "--model", model_dir, "--max_seq_length", "32", *flags])


@pytest.mark.parametrize("flags, message", [
    (("--engine", "tensorflow", "--precision", "int8"),
     "error: --precision int8 runs on OpenVINO only"),
    (("--int8_model", "/somewhere"), "error: --int8_model needs --precision "
                                     "int8"),
])
def test_bad_engine_combinations_exit_2(flags, message, corpus, tmp_path,
                                        tiny_model_dir, capsys):
    assert _launch(corpus, tmp_path, tiny_model_dir, *flags) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)
    assert not list(tmp_path.glob("o*"))


def test_openvino_by_name_without_openvino_exits_2(corpus, tmp_path,
                                                   tiny_model_dir, capsys,
                                                   monkeypatch):
    monkeypatch.setattr(engines, "openvino_installed", lambda: False)
    assert _launch(corpus, tmp_path, tiny_model_dir, "--engine",
                   "openvino") == EXIT_USAGE
    assert "OpenVINO is not installed" in capsys.readouterr().err


@OPENVINO_PRESENT
def test_int8_without_a_quantized_model_exits_2(corpus, tmp_path,
                                                tiny_model_dir, capsys):
    assert _launch(corpus, tmp_path, tiny_model_dir, "--precision",
                   "int8") == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "needs a quantized model" in err[0] and "model.quantize" in err[0]
    not_one = tmp_path / "not_int8"
    not_one.mkdir()
    assert _launch(corpus, tmp_path, tiny_model_dir, "--precision", "int8",
                   "--int8_model", str(not_one)) == EXIT_USAGE
    assert "is not an int8 model" in capsys.readouterr().err


def test_int8_on_dataflow_needs_a_cloud_int8_model(tmp_path):
    from apache_beam.options.pipeline_options import PipelineOptions
    from pipeline.options import EmbedOptions
    from pipeline.cli import UsageError
    from pipeline.run import resolve_job
    common = ["--input", "gs://bucket/in/*.jsonl", "--output",
              "gs://bucket/out/emb", "--model", "gs://bucket/model",
              "--runner", "DataflowRunner", "--precision", "int8"]
    for extra, message in (([], "needs --int8_model"),
                           (["--int8_model", str(tmp_path)],
                            f"--int8_model {tmp_path}")):
        options = PipelineOptions(common + extra).view_as(EmbedOptions)
        with pytest.raises(UsageError, match=message):
            resolve_job(options)
