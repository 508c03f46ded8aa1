"""``bench.throughput``'s decisions and report, on made-up inputs.

Which variants run (this build's ``pipeline.run`` flags, this CPU's
instructions), with which flags, and how the table, the ratios, the
accuracy figures and the chart come out.  The benchmark's timings
themselves are not tested (that is what running it is for).
"""

from __future__ import annotations

import numpy as np
import pytest

from bench import report, roofline, throughput
from bench.throughput import BY_NAME, Build, parse_help_options
from pipeline.read_embeddings import Embeddings

TODAY_HELP = """usage: python -m pipeline.run [-h] [--input INPUT]
  --precision {float32,bfloat16}
                        Model arithmetic: float32, or bfloat16.
  --xla {on,off}        Compile the model with XLA.
"""
MERGED_HELP = TODAY_HELP.replace(
    "{float32,bfloat16}", "{auto,float32,bfloat16,int8}") + """
  --engine {auto,tensorflow,openvino}
                        Inference engine.
  --int8_model INT8_MODEL
"""
TODAY = Build(parse_help_options(TODAY_HELP), has_openvino=True,
              has_torch=True)
MERGED = Build(parse_help_options(MERGED_HELP), has_quantize=True,
               has_openvino=True, has_torch=True)
AMX = frozenset({"avx2", "avx512f", "amx_bf16", "amx_int8", "avx512_bf16",
                 "avx512_vnni"})
AVX2 = frozenset({"avx2", "fma"})


def test_help_options_with_choices():
    options = parse_help_options(MERGED_HELP)
    assert options["--precision"] == {"auto", "float32", "bfloat16", "int8"}
    assert options["--engine"] == {"auto", "tensorflow", "openvino"}
    assert options["--xla"] == {"on", "off"}
    assert options["--int8_model"] is None  # free-form value
    assert "--engine" not in parse_help_options(TODAY_HELP)


@pytest.mark.parametrize("name", ["ours_ov_f32", "ours_ov_bf16",
                                  "ours_ov_int8", "ours_auto"])
def test_engine_variants_wait_for_the_engine_flag(name):
    reason = throughput.unavailable(BY_NAME[name], TODAY, AMX)
    assert reason.startswith("not available in this build")
    assert throughput.unavailable(BY_NAME[name], MERGED, AMX) is None


def test_todays_variants_run_on_todays_build():
    for name in ("ours", "baseline", "peer", "ours_noxla",
                 "ours_tf_bf16", "torch_f32", "torch_bf16"):
        assert throughput.unavailable(BY_NAME[name], TODAY, AMX) is None


def test_int8_needs_the_quantizer_and_the_flag():
    no_quantize = Build(MERGED.options, has_quantize=False,
                        has_openvino=True, has_torch=True)
    assert "model.quantize" in throughput.unavailable(
        BY_NAME["ours_ov_int8"], no_quantize, AMX)
    no_openvino = Build(MERGED.options, has_quantize=True,
                        has_openvino=False, has_torch=True)
    assert "openvino" in throughput.unavailable(BY_NAME["ours_ov_bf16"],
                                                no_openvino, AMX)
    no_torch = Build(MERGED.options, has_torch=False)
    assert throughput.unavailable(BY_NAME["torch_f32"], no_torch,
                                  AMX).startswith("not available")


@pytest.mark.parametrize("flags,measurable", [
    (AMX, True), (AVX2, False),
    (frozenset({"avx512_bf16"}), True), (frozenset({"amx_bf16"}), True),
    (frozenset({"avx512_vnni", "avx512f"}), False)])
def test_bfloat16_rows_need_native_bfloat16(flags, measurable):
    for name in ("ours_tf_bf16", "ours_ov_bf16", "torch_bf16"):
        reason = throughput.unavailable(BY_NAME[name], MERGED, flags)
        if measurable:
            assert reason is None
        else:
            assert reason == "not measurable on this CPU: needs AMX-BF16 " \
                             "or AVX512-BF16"
    # float32 and auto rows run anywhere
    for name in ("ours", "ours_ov_f32", "ours_auto", "torch_f32"):
        assert throughput.unavailable(BY_NAME[name], MERGED, flags) is None


@pytest.mark.parametrize("flags,measurable", [
    (AMX, True), (AVX2, False), (frozenset({"avx_vnni"}), True),
    (frozenset({"amx_int8"}), True), (frozenset({"avx512_bf16"}), False)])
def test_int8_rows_need_int8_instructions(flags, measurable):
    reason = throughput.unavailable(BY_NAME["ours_ov_int8"], MERGED, flags)
    assert (reason is None) == measurable
    if not measurable:
        assert reason.startswith("not measurable on this CPU")


def test_build_reasons_come_before_cpu_reasons():
    assert throughput.unavailable(BY_NAME["ours_ov_bf16"], TODAY,
                                  AVX2).startswith("not available")


def test_pipeline_flags_per_build():
    flags = throughput.pipeline_flags
    assert flags(BY_NAME["ours"], TODAY) == ["--precision", "float32",
                                             "--xla", "on"]
    assert flags(BY_NAME["ours"], MERGED) == [
        "--engine", "tensorflow", "--precision", "float32", "--xla", "on"]
    assert flags(BY_NAME["ours_tf_bf16"], TODAY) == ["--precision",
                                                     "bfloat16"]
    assert flags(BY_NAME["ours_ov_int8"], MERGED, "/m/int8") == [
        "--engine", "openvino", "--precision", "int8", "--int8_model",
        "/m/int8"]
    assert flags(BY_NAME["ours_auto"], MERGED) == []
    assert flags(BY_NAME["ours_noxla"], TODAY)[-2:] == ["--xla", "off"]


def test_default_variants_and_parser():
    args = throughput.build_parser().parse_args([])
    assert args.docs == 2048 and args.max_seq_length == 128
    assert args.init_std == 0.02
    assert "ours_noxla" not in args.variants
    assert {"torch_f32", "torch_bf16", "ours_auto",
            "ours_ov_int8"} <= set(args.variants)
    with pytest.raises(SystemExit):
        throughput.build_parser().parse_args(["--variants", "ours,nope"])


def test_the_reference_can_run_once():
    assert throughput.runs_in_round("ours", 1, reference_once=False)
    assert throughput.runs_in_round("ours", 0, reference_once=True)
    assert not throughput.runs_in_round("ours", 1, reference_once=True)
    assert throughput.runs_in_round("ours_ov_int8", 2, reference_once=True)
    parser = throughput.build_parser()
    assert parser.parse_args(["--reference_once"]).reference_once
    assert not parser.parse_args([]).reference_once


def test_bert_like_weights_scale():
    from model.bert import BertConfig
    config = BertConfig(vocab_size=50, hidden_size=32, num_layers=1,
                        num_heads=4, intermediate_size=64)
    weights = throughput.bert_like_weights(config, 0.02, 0)
    kernel = weights["bert/encoder/layer_0/intermediate/dense/kernel"]
    assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002
    assert np.abs(kernel).max() > 0.05  # normal, not truncated at 2 std
    assert (weights["bert/embeddings/LayerNorm/gamma"] == 1).all()
    assert (weights["bert/pooler/dense/bias"] == 0).all()
    assert weights.keys() == throughput.bert_like_weights(config, 0.1,
                                                          1).keys()


def test_calibration_texts_are_not_benchmarked(tmp_path):
    import json
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": f"t{i}"})
                            + "\n" for i in range(50)))
    benchmarked, _ = throughput.sample_corpus(path, 20, 3)
    calibration = throughput.calibration_texts(path, 10, 3, 20)
    assert len(calibration) == 10
    assert not set(calibration) & set(benchmarked)


# --- table, ratios, accuracy, chart ---------------------------------------


def _measured(name, e2e, model, precision="float32", engine="tensorflow"):
    variant = BY_NAME[name]
    return {"variant": name, "wall_s": 100.0, "model_s": 100.0 * e2e / model,
            "documents": 1000, "rows": 1000, "tokens_real": int(e2e * 100),
            "tokens_computed": int(e2e * 100 / 0.9), "peak_rss_mib": 1500.0,
            "engine": engine, "precision": precision or variant.precision}


def _rows(flags=AMX, build=MERGED):
    results = {
        "ours": _measured("ours", 1000, 1100),
        "baseline": _measured("baseline", 400, 500),
        "ours_ov_bf16": _measured("ours_ov_bf16", 5000, 6000, "bfloat16",
                                  "openvino"),
        "ours_ov_int8": _measured("ours_ov_int8", 6000, 7500, "int8",
                                  "openvino"),
        "ours_auto": _measured("ours_auto", 5200, 6100, "auto", "openvino"),
        "torch_f32": _measured("torch_f32", 900, 1000, engine="torch"),
        "torch_bf16": _measured("torch_bf16", 4000, 4500, "bfloat16",
                                "torch"),
    }
    selected = [BY_NAME[n] for n in ("ours", "baseline", "peer",
                                     "ours_ov_bf16", "ours_ov_int8",
                                     "ours_auto", "torch_f32", "torch_bf16")]
    statuses = {v.name: throughput.unavailable(v, build, flags)
                for v in selected}
    statuses["peer"] = "failed: peer: exit 1: boom"
    limits = {"float32": 2000.0, "bfloat16": 10000.0}
    return throughput.table_rows(selected, results, statuses, limits,
                                 flags)


def test_table_rows_and_roofline_shares():
    rows = {r.name: r for r in _rows()}
    ours = rows["ours"]
    assert ours.e2e_tokens_per_s == pytest.approx(1000)
    assert ours.model_tokens_per_s == pytest.approx(1100)
    assert ours.e2e_share == pytest.approx(0.5)
    assert ours.model_share == pytest.approx(0.55)
    assert ours.padding == pytest.approx(0.1, abs=1e-3)
    assert rows["ours_ov_bf16"].e2e_share == pytest.approx(0.5)
    assert rows["ours_ov_int8"].e2e_share is None  # no int8 roofline
    auto = rows["ours_auto"]
    assert auto.precision == "bfloat16" and auto.precision_assumed
    assert rows["peer"].status.startswith("failed")
    lines = report.format_table(list(rows.values()))
    assert len(lines) == 1 + len(rows) + 1  # header, rows, footnote
    ours_line = next(l for l in lines if l.startswith("ours TF f32+XLA"))
    assert "1000.0" in ours_line and "50.0%" in ours_line
    assert "55.0%" in ours_line and "1500 MiB" in ours_line
    assert any("failed: peer: exit 1: boom" in l for l in lines)
    assert any("bf16*" in l for l in lines)


def test_ratios_side_by_side():
    lines = report.format_ratios(_rows())
    text = "\n".join(lines)
    assert "ours(auto) / torch bf16" in text
    line = next(l for l in lines if l.startswith("ours(auto) / torch bf16"))
    assert "1.30x end to end" in line and "1.36x in model calls" in line
    line = next(l for l in lines if l.startswith("ours(auto) / ours f32"))
    assert "5.20x end to end" in line
    line = next(l for l in lines if l.startswith("int8 / our bf16"))
    assert "1.20x end to end" in line and "(vs ours_ov_bf16)" in line
    line = next(l for l in lines if l.startswith("ours f32+XLA / peer"))
    assert "n/a" in line and "failed" in line


def test_ratios_on_a_cpu_without_bfloat16():
    rows = _rows(flags=AVX2)
    by_name = {r.name: r for r in rows}
    for name in ("ours_ov_bf16", "torch_bf16"):
        assert by_name[name].status == \
            "not measurable on this CPU: needs AMX-BF16 or AVX512-BF16"
    assert by_name["ours_ov_int8"].status.startswith(
        "not measurable on this CPU")
    lines = report.format_ratios(rows)
    line = next(l for l in lines if l.startswith("ours(auto) / torch bf16"))
    assert "n/a (torch_bf16: not measurable on this CPU" in line
    table = "\n".join(report.format_table(rows))
    assert table.count("not measurable on this CPU") == 3
    # auto on a CPU without bfloat16 is taken as float32
    assert by_name["ours_auto"].precision == "float32"


def test_ratios_before_the_engine_merge():
    rows = _rows(build=TODAY)
    by_name = {r.name: r for r in rows}
    assert by_name["ours_auto"].status == \
        "not available in this build: pipeline.run has no --engine"
    line = next(l for l in report.format_ratios(rows)
                if l.startswith("ours(auto) / torch f32"))
    assert "n/a (ours_auto: not available in this build" in line


def _non_amx_rows(flags, ov_f32=1300.0):
    results = {
        "ours": _measured("ours", 1000, 1100),
        "torch_f32": _measured("torch_f32", 1200, 1300, engine="torch"),
        "ours_ov_f32": _measured("ours_ov_f32", ov_f32, ov_f32 * 1.2,
                                 engine="openvino")}
    selected = [BY_NAME[n] for n in results]
    statuses = {v.name: throughput.unavailable(v, MERGED, flags)
                for v in selected}
    return throughput.table_rows(selected, results, statuses,
                                 {"float32": 2000.0}, flags)


def test_non_amx_rows_on_an_avx512_cpu():
    """On a CPU with AVX-512 its float32 rows stand for N2/C2 (auto runs
    OpenVINO float32 there); the AVX2 class is not measurable, with the
    reason."""
    lines = report.format_non_amx(_non_amx_rows(AMX), AMX)
    torch = next(l for l in lines if "ours(auto) / torch f32" in l)
    assert "AVX-512 without AMX (N2, C2)" in torch
    assert "1.08x end to end" in torch and "target >= 1.1x: NOT met" in torch
    ours = next(l for l in lines if "ours(auto) / ours f32+XLA" in l)
    assert "1.30x end to end" in ours and "target >= 1.0x: met" in ours
    avx2 = next(l for l in lines if "N2D" in l)
    assert "not measurable on this CPU" in avx2 and "MLAS" in avx2
    met = report.format_non_amx(_non_amx_rows(AMX, ov_f32=1400.0), AMX)
    assert "1.17x end to end" in met[1] and "target >= 1.1x: met" in met[1]


def test_non_amx_rows_on_an_avx2_cpu_and_without_the_openvino_row():
    lines = report.format_non_amx(_non_amx_rows(AVX2), AVX2)
    assert "AVX2 only (N2D, C2D, T2D): ours(auto) / torch f32" in lines[1]
    assert "N2, C2): not measurable on this CPU: this CPU has no AVX-512" \
        in lines[-1]
    rows = [r for r in _non_amx_rows(AVX2) if r.name != "ours_ov_f32"]
    lines = report.format_non_amx(rows, AVX2)
    assert "n/a (ours_ov_f32: not run)" in lines[1]


def _embeddings(ids, pooled, sequences):
    return Embeddings(ids=list(ids),
                      num_tokens=np.array([len(s) for s in sequences]),
                      truncated=np.zeros(len(ids), bool),
                      pooled_output=np.asarray(pooled, np.float32),
                      sequence_output=[np.asarray(s, np.float32)
                                       for s in sequences])


def test_accuracy_matches_documents_by_id():
    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(4, 8))
    sequences = [rng.normal(size=(n, 8)) for n in (3, 5, 2, 4)]
    reference = _embeddings(["a", "b", "c", "d"], pooled, sequences)
    # Another order, one document missing, one perturbed, one tokenized
    # differently (a token more).
    other_seq = [sequences[2], sequences[0] + 0.01, np.vstack(
        [sequences[1], np.full((1, 8), 3.0)])]
    other = _embeddings(["c", "a", "b"], pooled[[2, 0, 1]], other_seq)
    result = throughput.accuracy(reference, other)
    assert result["docs"] == 3 and result["missing"] == 1
    assert result["token_diffs"] == 1
    assert result["max_abs_pooled"] == pytest.approx(0, abs=1e-6)
    assert result["max_abs_sequence"] == pytest.approx(0.01, abs=1e-5)
    assert result["pooled_cos_min"] == pytest.approx(1.0)
    assert result["mean_cos_min"] < 0.999  # b's mean moved by the extra row
    lines = report.format_accuracy({"ours_ov_bf16": result},
                                   {"ours_ov_bf16": "ours OpenVINO bf16"},
                                   1000)
    assert lines[1].startswith("ours OpenVINO bf16")
    assert "under 1,000 documents" in lines[-1]
    assert "no document ids" in throughput.accuracy(
        reference, _embeddings(["x"], pooled[:1], sequences[:1]))["error"]


def test_roofline_tokens_take_the_best_engine():
    gflops = {"tensorflow": {"float32": 300.0, "bfloat16": 1400.0},
              "torch": {"float32": 350.0, "bfloat16": 2400.0},
              "openvino": {"int8": 4000.0}}
    limits = throughput.roofline_tokens(gflops, 64)
    per_token = throughput.flops_per_token(64)
    assert limits["float32"] == pytest.approx(350e9 / per_token)
    assert limits["bfloat16"] == pytest.approx(2400e9 / per_token)
    assert limits["int8"] == pytest.approx(4000e9 / per_token)
    lines = report.format_rooflines(gflops, limits, per_token / 1e6, {})
    assert any("(torch)" in l and "roofline bf16" in l for l in lines)


def test_cpu_flag_sets():
    assert roofline.precision_measurable("float32", frozenset())
    assert not roofline.precision_measurable("bfloat16", AVX2)
    assert roofline.precision_measurable("int8", frozenset({"avx_vnni"}))


def test_chart_is_a_real_picture(tmp_path):
    pytest.importorskip("matplotlib")  # the bench extra
    from PIL import Image
    path = str(tmp_path / "chart.png")
    rows = _rows(flags=AVX2)
    report.write_chart(rows, {"float32": 2000.0}, "test chart", path)
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert width >= 800 and height >= 300
    assert height >= 45 * len(rows)  # grows with the rows
    non_white = (pixels < 240).any(axis=2).mean()
    assert 0.01 < non_white < 0.9
    bar_blue = np.array([0x31, 0x82, 0xbd])
    assert (np.abs(pixels.astype(int) - bar_blue).sum(axis=2) < 30).sum() \
        > 500  # the end-to-end bars are drawn
    red = np.array([0xa5, 0x0f, 0x15])
    assert (np.abs(pixels.astype(int) - red).sum(axis=2) < 60).sum() > 20
