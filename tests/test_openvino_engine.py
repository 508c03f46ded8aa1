"""The OpenVINO engine: same outputs as TensorFlow, the IR cache, bfloat16
accuracy, and a whole pipeline run on it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("openvino", reason="openvino is not installed")

from model import openvino_engine  # noqa: E402
from model.accuracy import read_texts  # noqa: E402
from model.load import load_bert_saved_model  # noqa: E402
from model.openvino_engine import (OpenVINOBertModel, bf16_note,  # noqa: E402
                                   load_openvino_model)
from model.self_check import (ACCURACY_TARGETS, compare_engines,  # noqa: E402
                              token_batches)
from tests.conftest import E2E_TEXTS, SHARED_ASSETS  # noqa: E402

REAL_VOCAB = SHARED_ASSETS / "bert_zh" / "vocab.txt"
REAL_CORPUS = SHARED_ASSETS / "corpus" / "zh_public_domain.jsonl"


def _documents(rng, rows: int, longest: int, vocab_size: int):
    """``rows`` documents of random lengths (2 to ``longest`` tokens, the
    first ``longest``), padded to ``longest``, as model inputs."""
    lengths = rng.integers(2, longest + 1, rows)
    lengths[0] = longest
    ids = rng.integers(104, vocab_size, (rows, longest)).astype(np.int32)
    ids[:, 0] = 101
    mask = (np.arange(longest)[None] < lengths[:, None]).astype(np.int32)
    return ids * mask, mask, np.zeros_like(ids)


def _batches(seed: int = 0, vocab_size: int = 120):
    """Padded batches of several shapes: rows of different lengths, so
    padding and masking are exercised."""
    rng = np.random.default_rng(seed)
    for batch, width in ((1, 2), (3, 7), (5, 16), (2, 33)):
        yield _documents(rng, batch, width, vocab_size)


def test_float32_matches_tensorflow(tiny_model_dir, small_vocab):
    model = load_openvino_model(tiny_model_dir, "float32")
    reference = load_bert_saved_model(tiny_model_dir)
    assert model.precision == "float32"
    for ids, mask, segments in _batches(vocab_size=len(small_vocab)):
        pooled, sequence = model(ids, mask, segments)
        want_pooled, want_sequence = reference(ids, mask, segments)
        assert pooled.dtype == sequence.dtype == np.float32
        assert sequence.shape == want_sequence.shape
        np.testing.assert_allclose(pooled, want_pooled, atol=1e-4, rtol=0)
        real = mask.astype(bool)
        np.testing.assert_allclose(sequence[real], want_sequence[real],
                                   atol=1e-4, rtol=0)


def test_bad_input_is_our_one_line_error(tiny_model_dir, small_vocab):
    """What TensorFlow's wrapper refuses, this engine refuses too: above
    all an id past the word table, which OpenVINO would embed as zeros."""
    from model.errors import ModelInputError
    model = load_openvino_model(tiny_model_dir, "float32")
    assert model.limits.vocab_size == len(small_vocab)
    ids = np.ones((2, 4), np.int32)
    for args in ((ids, ids[:, :3], ids), (ids[0], ids[0], ids[0]),
                 (ids[:0], ids[:0], ids[:0]),
                 (ids.astype(np.float32), ids, ids),
                 (ids + len(small_vocab), ids, np.zeros_like(ids)),
                 (ids, ids, ids + 5), (ids, ids * 2, np.zeros_like(ids)),
                 (np.ones((1, 129), np.int32),) * 3):
        with pytest.raises(ModelInputError) as err:
            model(*args)
        assert "\n" not in str(err.value)


def test_only_the_two_bert_outputs_are_kept(tiny_model_dir, small_vocab):
    """The exported signature also returns encoder_outputs (every layer):
    the converted model keeps only pooled_output and sequence_output, so
    no call copies the layers out."""
    import openvino as ov
    raw = {n for port in ov.convert_model(tiny_model_dir).outputs
           for n in port.get_names()}
    assert "encoder_outputs" in raw
    model = openvino_engine.convert(tiny_model_dir)
    assert [sorted(port.get_names()) for port in model.outputs] in (
        [["pooled_output"], ["sequence_output"]],
        [["sequence_output"], ["pooled_output"]])
    compiled = OpenVINOBertModel(tiny_model_dir, openvino_engine._compile(
        ov.Core(), model, "float32", None), "float32")
    reference = load_bert_saved_model(tiny_model_dir)
    for ids, mask, segments in _batches(vocab_size=len(small_vocab)):
        pooled, sequence = compiled(ids, mask, segments)
        want_pooled, want_sequence = reference(ids, mask, segments)
        np.testing.assert_allclose(pooled, want_pooled, atol=1e-4)
        real = mask.astype(bool)
        np.testing.assert_allclose(sequence[real], want_sequence[real],
                                   atol=1e-4)


def test_a_tf_hub_handle_is_resolved_first(tiny_model_dir, tmp_path,
                                           monkeypatch):
    """A handle (here from a pre-filled TF Hub cache, no network) runs on
    OpenVINO like its directory, instead of failing over to TensorFlow."""
    import hashlib
    import shutil
    pytest.importorskip("tensorflow_hub")
    handle = "https://tfhub.dev/tensorflow/bert_zh_L-12_H-768_A-12/1"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    shutil.copytree(tiny_model_dir, tmp_path / hashlib.sha1(
        handle.encode("utf-8")).hexdigest())
    model = load_openvino_model(handle, "float32")
    ids, mask, segments = next(_batches(seed=2))
    np.testing.assert_allclose(model(ids, mask, segments)[0],
                               load_bert_saved_model(tiny_model_dir)(
                                   ids, mask, segments)[0], atol=1e-4)


def test_the_ir_is_converted_once_and_cached(tiny_model_dir, monkeypatch):
    digest = openvino_engine.model_digest(tiny_model_dir)
    entry = openvino_engine.ir_cache_dir(digest)
    load_openvino_model(tiny_model_dir, "float32")
    assert {"info.json", "limits.json", "model.bin", "model.xml"} <= set(
        os.listdir(entry))
    info = json.loads(open(os.path.join(entry, "info.json")).read())
    assert info["digest"] == digest
    assert info["openvino"] == openvino_engine.openvino_version()
    # No half-built entries are left beside it.
    assert not [n for n in os.listdir(os.path.dirname(entry))
                if n.startswith(".")]

    def no_conversion(model_dir):
        raise AssertionError("converted again")

    monkeypatch.setattr(openvino_engine, "convert", no_conversion)
    again = load_openvino_model(tiny_model_dir, "float32")
    ids, mask, segments = next(_batches())
    np.testing.assert_allclose(again(ids, mask, segments)[0],
                               load_bert_saved_model(tiny_model_dir)(
                                   ids, mask, segments)[0], atol=1e-4)


def test_cache_key_follows_the_weights(tmp_path, small_vocab,
                                       tiny_model_dir):
    from model.bert import BertConfig
    from model.export import export_bert_saved_model
    config = BertConfig(vocab_size=len(small_vocab), hidden_size=32,
                        num_layers=2, num_heads=4, intermediate_size=64,
                        max_position_embeddings=128)
    other = export_bert_saved_model(str(tmp_path / "other"), config,
                                    small_vocab, seed=8)
    assert openvino_engine.model_digest(other) != \
        openvino_engine.model_digest(tiny_model_dir)
    ids, mask, segments = next(_batches(seed=1))
    a = load_openvino_model(tiny_model_dir, "float32")(ids, mask, segments)
    b = load_openvino_model(other, "float32")(ids, mask, segments)
    assert not np.allclose(a[0], b[0])
    np.testing.assert_allclose(b[0], load_bert_saved_model(other)(
        ids, mask, segments)[0], atol=1e-4)


def test_a_second_publisher_keeps_the_first_entry(tmp_path, tiny_model_dir):
    model = openvino_engine.convert(tiny_model_dir)
    target = str(tmp_path / "entry")
    assert openvino_engine.save_ir(model, target, {"n": 1})
    assert not openvino_engine.save_ir(model, target, {"n": 2})
    assert json.loads((tmp_path / "entry" / "info.json").read_text()) == \
        {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_an_unwritable_cache_only_costs_the_conversion(
        tmp_path, tiny_model_dir, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("BERT_ZH_EMBED_CACHE", str(blocker))
    model = load_openvino_model(tiny_model_dir, "float32")
    assert "cannot cache the OpenVINO IR" in caplog.text
    ids, mask, segments = next(_batches())
    assert model(ids, mask, segments)[0].shape == (1, 32)


def test_models_on_tensorflow_file_systems_are_converted(tiny_model_dir):
    """A gs:// model is copied locally before conversion (tested on
    TensorFlow's in-memory ram:// file system)."""
    from tests.test_model_load import copy_tree_with_gfile
    remote = "ram://models/tiny_bert"
    copy_tree_with_gfile(tiny_model_dir, remote)
    model = openvino_engine.convert(remote)
    compiled = OpenVINOBertModel(remote, openvino_engine._compile(
        __import__("openvino").Core(), model, "float32", None), "float32")
    ids, mask, segments = next(_batches())
    np.testing.assert_allclose(compiled(ids, mask, segments)[0],
                               load_bert_saved_model(tiny_model_dir)(
                                   ids, mask, segments)[0], atol=1e-4)


_WITHOUT_TENSORFLOW = """
import json, sys
sys.modules["tensorflow"] = None  # any import of it fails
import numpy as np
from model.engines import EngineSpec, load_engine
model = load_engine(EngineSpec(sys.argv[1], sys.argv[2], sys.argv[3],
                               int8_model=sys.argv[4] or None))
ids = np.array([[101, 104, 105, 102]], np.int32)
pooled, _ = model(ids, np.ones_like(ids), np.zeros_like(ids))
print(json.dumps({"engine": model.engine_choice.engine,
                  "precision": model.precision,
                  "limits": model.limits.__dict__,
                  "pooled": pooled[0].tolist()}))
"""


def run_without_tensorflow(model_dir: str, engine: str = "openvino",
                           precision: str = "float32",
                           int8_model: str = "") -> dict:
    """Loads the model as a worker does, in a process where importing
    TensorFlow fails, and returns what it loaded and its output for one
    document (the cache directory is this test session's)."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW, model_dir, engine,
         precision, int8_model], cwd=root, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=str(root)), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_worker_with_a_cached_ir_never_imports_tensorflow(
        tiny_model_dir, small_vocab):
    """TensorFlow adds about 660 MB to a worker: once the IR is cached
    (here by this process), an OpenVINO worker loads and runs the model
    without it, with the same input limits and outputs, also for auto
    (its bfloat16 self-check verdict is cached too)."""
    from model.variables import read_model_limits
    here = load_openvino_model(tiny_model_dir, "float32")
    got = run_without_tensorflow(tiny_model_dir)
    assert got["engine"] == "openvino" and got["precision"] == "float32"
    assert got["limits"] == read_model_limits(tiny_model_dir).__dict__
    ids = np.array([[101, 104, 105, 102]], np.int32)
    np.testing.assert_allclose(got["pooled"], here(
        ids, np.ones_like(ids), np.zeros_like(ids))[0][0], atol=1e-6)
    load_openvino_model(tiny_model_dir, "bfloat16", check_accuracy=True)
    assert run_without_tensorflow(tiny_model_dir, "auto", "auto")[
        "engine"] == "openvino"


def test_local_model_files_hash_as_through_tensorflow(tiny_model_dir):
    """Local paths are hashed without TensorFlow, to the same digest that
    TensorFlow's file system gives (its file:// URLs), so IR cache keys,
    int8 source digests and run fingerprints do not change."""
    from model import files as fingerprint
    local = fingerprint.variables_files(tiny_model_dir)
    through_tf = fingerprint.variables_files("file://" + tiny_model_dir)
    assert [p[len("file://"):] for p in through_tf] == local
    assert fingerprint.hash_files(local) == fingerprint.hash_files(through_tf)
    vocab = os.path.join(tiny_model_dir, "assets", "vocab.txt")
    assert fingerprint.file_sha256(vocab) == \
        fingerprint.file_sha256("file://" + vocab)


def test_limits_are_kept_beside_the_ir_and_reread_when_damaged(
        tiny_model_dir, monkeypatch):
    from model.variables import read_model_limits
    entry = openvino_engine.ir_cache_dir(
        openvino_engine.model_digest(tiny_model_dir))
    load_openvino_model(tiny_model_dir, "float32")
    path = os.path.join(entry, openvino_engine.LIMITS_FILE)
    want = read_model_limits(tiny_model_dir)
    assert json.loads(open(path).read()) == want.__dict__
    for damage in ("{", "[1, 2]", '{"vocab_size": 3, "other": 1}'):
        with open(path, "w") as handle:
            handle.write(damage)
        assert openvino_engine.model_limits(tiny_model_dir, entry) == want
        assert json.loads(open(path).read()) == want.__dict__
    calls = []
    monkeypatch.setattr(openvino_engine, "read_model_limits",
                        lambda d: calls.append(d))
    assert openvino_engine.model_limits(tiny_model_dir, entry) == want
    assert not calls  # read from the file, not from the model


def test_compile_settings():
    from model.runtime import usable_cores
    assert openvino_engine.compile_config("bfloat16") == {
        "PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS":
        usable_cores(), "INFERENCE_PRECISION_HINT": "bf16"}
    assert openvino_engine.compile_config("float32", 3)[
        "INFERENCE_NUM_THREADS"] == 3
    # An int8 model keeps what is not quantized in float32.
    assert openvino_engine.compile_config("int8")[
        "INFERENCE_PRECISION_HINT"] == "f32"


@pytest.mark.parametrize("rows,parts", [(1, 2), (2, 2), (5, 2), (32, 2),
                                        (3, 4), (7, 3), (4, 1), (9, 16)])
def test_row_splits_cover_every_row_once(rows, parts):
    splits = openvino_engine.row_splits(rows, parts)
    assert len(splits) == min(rows, parts)
    assert [i for start, stop in splits for i in range(start, stop)] == \
        list(range(rows))
    sizes = [stop - start for start, stop in splits]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_each_document_gets_what_the_model_gives_it_alone(
        tiny_model_dir, small_vocab, streams, monkeypatch):
    """However a batch is split across streams and however much padding
    it carries, a document's pooled output and real tokens are what the
    model gives that document alone, unpadded."""
    model = load_openvino_model(tiny_model_dir, "float32")
    monkeypatch.setattr(OpenVINOBertModel, "streams", streams)
    rng = np.random.default_rng(streams)
    ids, mask, segments = _documents(rng, 7, 20, len(small_vocab))
    pooled, sequence = model(ids, mask, segments)
    extra = 13  # more padding columns, mask 0
    wide = [np.pad(a, ((0, 0), (0, extra))) for a in (ids, mask, segments)]
    wide_pooled, wide_sequence = model(*wide)
    assert wide_sequence.shape == (7, 20 + extra, 32)
    for row, length in enumerate(mask.sum(axis=1)):
        alone = [a[row:row + 1, :length] for a in (ids, mask, segments)]
        want_pooled, want_sequence = model(*alone)
        for got_pooled, got_sequence in ((pooled, sequence),
                                         (wide_pooled, wide_sequence)):
            np.testing.assert_allclose(got_pooled[row], want_pooled[0],
                                       atol=2e-5, rtol=0)
            np.testing.assert_allclose(got_sequence[row, :length],
                                       want_sequence[0], atol=2e-5, rtol=0)


def test_a_batch_runs_on_every_stream_at_once(tiny_model_dir, small_vocab):
    """The compiled model runs several requests at once (throughput
    mode), and a batch's rows go to all of them."""
    model = load_openvino_model(tiny_model_dir, "float32")
    from model.runtime import usable_cores
    if usable_cores() < 2:
        pytest.skip("one usable core: OpenVINO runs one stream")
    assert model.streams >= 2
    rng = np.random.default_rng(4)
    ids, mask, segments = _documents(rng, 5, 9, len(small_vocab))
    model(ids, mask, segments)
    requests = model._requests()
    assert len(requests) == model.streams
    sizes = [stop - start for start, stop in
             openvino_engine.row_splits(len(ids), model.streams)]
    assert len(sizes) >= 2
    assert [request.get_tensor(model._outputs[1]).shape[0]
            for request in requests[:len(sizes)]] == sizes


def test_a_failing_part_is_raised_after_every_part_finished(
        tiny_model_dir, small_vocab, monkeypatch):
    """When one stream's request fails, the error reaches the caller, but
    only once the others are done (none still writes into its buffers)."""
    model = load_openvino_model(tiny_model_dir, "float32")
    monkeypatch.setattr(OpenVINOBertModel, "streams", 3)
    waited = []

    class Failing:
        def __init__(self, request):
            self.request = request

        def start_async(self, *args, **kwargs):
            self.request.start_async(*args, **kwargs)

        def wait(self):
            self.request.wait()
            waited.append(self)
            if len(waited) == 1:
                raise RuntimeError("stream failed")

        def get_tensor(self, port):
            return self.request.get_tensor(port)

    requests = [Failing(r) for r in model._requests()]
    monkeypatch.setattr(model, "_requests", lambda: requests)
    rng = np.random.default_rng(5)
    ids, mask, segments = _documents(rng, 6, 8, len(small_vocab))
    with pytest.raises(RuntimeError, match="stream failed"):
        model(ids, mask, segments)
    assert waited == requests


def test_bfloat16_without_hardware_is_reported():
    amx = frozenset({"amx_bf16", "avx512f"})
    assert bf16_note("float32", "f32", frozenset()) == ("float32", None)
    assert bf16_note("bfloat16", "bf16", amx) == ("bfloat16", None)
    precision, warning = bf16_note("bfloat16", "f32", frozenset({"avx2"}))
    assert precision == "float32" and "runs float32 instead" in warning
    precision, warning = bf16_note("bfloat16", "bf16", frozenset({"avx512f"}))
    assert precision == "bfloat16" and "emulates it" in warning


# --- bfloat16 accuracy on a BERT-scale model ---------------------------------


@pytest.fixture(scope="module")
def bert_scale(tmp_path_factory):
    """2 layers of BERT-Base's width, BERT's initialisation (normal, std
    0.02, as real checkpoints' scale), the real Chinese vocabulary where
    available; and real documents tokenized with it."""
    from model.bert import BertConfig
    from model.export import export_bert_saved_model
    from tests.conftest import build_small_vocab
    from model.vocab import load_vocab
    if REAL_VOCAB.exists():
        vocab = load_vocab(str(REAL_VOCAB))
        texts = read_texts([str(REAL_CORPUS)], limit=200, seed=3) \
            if REAL_CORPUS.exists() else list(E2E_TEXTS)
    else:
        vocab = build_small_vocab(E2E_TEXTS)
        texts = list(E2E_TEXTS)
    config = BertConfig(vocab_size=len(vocab), hidden_size=768, num_layers=2,
                        num_heads=12, intermediate_size=3072,
                        max_position_embeddings=128)
    path = export_bert_saved_model(
        str(tmp_path_factory.mktemp("bert_scale") / "model"), config, vocab,
        seed=11)
    return path, token_batches(texts, vocab, True, 128)


def test_bfloat16_keeps_cosine_to_float32(bert_scale):
    path, batches = bert_scale
    model = load_openvino_model(path, "bfloat16")
    stats = compare_engines(load_bert_saved_model(path), model, batches)
    assert stats.documents >= len(E2E_TEXTS) - 2
    assert stats.meets(ACCURACY_TARGETS["bfloat16"]), stats.summary()
    if model.precision == "bfloat16":
        assert stats.max_abs_pooled > 0  # it really ran bfloat16


# --- a whole run on OpenVINO ---------------------------------------------------


def test_pipeline_on_openvino_writes_what_tensorflow_writes(
        tmp_path, e2e_corpus, tiny_model_dir, caplog):
    import logging
    from pipeline.read_embeddings import load_embeddings
    from pipeline.run import run
    caplog.set_level(logging.INFO, logger="model.engines")
    summaries = {}
    for engine in ("openvino", "tensorflow"):
        summaries[engine] = run([
            "--input", str(e2e_corpus), "--output",
            str(tmp_path / engine / "emb"), "--model", tiny_model_dir,
            "--max_seq_length", "32", "--batch_size", "3", "--engine", engine,
            "--precision", "float32", "--xla", "off",
            "--runner", "DirectRunner"])
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith("Inference engine:")]
    assert [line.split(",")[0] for line in lines] == [
        "Inference engine: openvino", "Inference engine: tensorflow"]
    a = load_embeddings(str(tmp_path / "openvino" / "emb-*-of-*.parquet"))
    b = load_embeddings(str(tmp_path / "tensorflow" / "emb-*-of-*.parquet"))
    assert a.ids == b.ids and len(a.ids) == len(E2E_TEXTS) - 2
    np.testing.assert_array_equal(a.num_tokens, b.num_tokens)
    np.testing.assert_array_equal(a.truncated, b.truncated)
    np.testing.assert_allclose(a.pooled_output, b.pooled_output, atol=1e-4)
    for x, y in zip(a.sequence_output, b.sequence_output):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, atol=1e-4)
    ov, tf_ = summaries["openvino"], summaries["tensorflow"]
    assert ov.counts == tf_.counts and ov.reconciled
    assert ov.model_loads == 1
    # Same vectors, same fingerprint: engines are interchangeable.
    assert ov.model_fingerprint == tf_.model_fingerprint
