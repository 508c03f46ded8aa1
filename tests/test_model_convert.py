"""Tests for ``model.convert``: Google TF and Hugging Face checkpoints in,
TF Hub–style SavedModel out, numerically equal to the NumPy reference.

The checkpoints are written here by writers that share no code with the
readers: the Google layout through TensorFlow's raw ``SaveV2`` op, the
safetensors file byte by byte, and ``pytorch_model.bin`` as a zip holding a
hand-built pickle (plus, when PyTorch happens to be installed, files from
``torch.save``).
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
import tensorflow as tf

from model.bert import BertConfig
from model.convert import (ConversionError, bert_config_from_hf,
                           choose_do_lower_case, convert_checkpoint,
                           detect_layout, hf_to_google_name, main,
                           read_safetensors, read_torch_bin)
from model.load import load_bert_saved_model
from model.variables import infer_hidden_size
from model.vocab import read_tokenizer_settings
from tests.bert_reference import ReferenceBert
from model.vocab import load_vocab
from transforms.tokenization import BertWordPieceTokenizer
from tests.conftest import SHARED_ASSETS, SPECIALS

TINY = BertConfig(vocab_size=120, hidden_size=32, num_layers=2, num_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
VOCAB = SPECIALS + [f"w{i}" for i in range(TINY.vocab_size - len(SPECIALS))]

GOOGLE_CONFIG = {
    "attention_probs_dropout_prob": 0.1, "directionality": "bidi",
    "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "hidden_size": TINY.hidden_size, "initializer_range": 0.02,
    "intermediate_size": TINY.intermediate_size,
    "max_position_embeddings": TINY.max_position_embeddings,
    "num_attention_heads": TINY.num_heads,
    "num_hidden_layers": TINY.num_layers, "pooler_fc_size": 768,
    "pooler_num_attention_heads": 12, "pooler_num_fc_layers": 3,
    "pooler_size_per_head": 128, "pooler_type": "first_token_transform",
    "type_vocab_size": 2, "vocab_size": TINY.vocab_size,
}
HF_CONFIG = {
    "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1,
    "classifier_dropout": None, "directionality": "bidi", "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": TINY.hidden_size,
    "initializer_range": 0.02, "intermediate_size": TINY.intermediate_size,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": TINY.max_position_embeddings,
    "model_type": "bert", "num_attention_heads": TINY.num_heads,
    "num_hidden_layers": TINY.num_layers, "pad_token_id": 0,
    "position_embedding_type": "absolute", "torch_dtype": "float32",
    "transformers_version": "4.40.0", "type_vocab_size": 2,
    "use_cache": True, "vocab_size": TINY.vocab_size,
}


# --- writers (independent of the readers under test) ---------------------


def write_google_checkpoint(folder: Path, weights: dict[str, np.ndarray],
                            extra: Optional[dict[str, np.ndarray]] = None,
                            config: Optional[dict] = None,
                            vocab: Optional[list[str]] = None) -> Path:
    """Google's release layout: bert_config.json, vocab.txt and a TF1-style
    checkpoint bert_model.ckpt.{index,data-*} with raw variable names."""
    folder.mkdir(parents=True)
    (folder / "bert_config.json").write_text(json.dumps(config or GOOGLE_CONFIG))
    (folder / "vocab.txt").write_text("\n".join(vocab or VOCAB) + "\n",
                                      encoding="utf-8")
    tensors = {**weights, **(extra or {})}
    names = sorted(tensors)
    tf.raw_ops.SaveV2(prefix=str(folder / "bert_model.ckpt"),
                      tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(tensors[n]) for n in names])
    return folder


def google_to_hf(weights: dict[str, np.ndarray], prefix: str = "bert.",
                 num_layers: int = TINY.num_layers) -> dict[str, np.ndarray]:
    """The Hugging Face state dict of Google-named weights, spelled out
    name by name (nn.Linear stores [out, in], so kernels are transposed)."""
    hf: dict[str, np.ndarray] = {}
    for table in ("word", "position", "token_type"):
        hf[f"{prefix}embeddings.{table}_embeddings.weight"] = weights[
            f"bert/embeddings/{table}_embeddings"]
    hf[f"{prefix}embeddings.LayerNorm.weight"] = weights[
        "bert/embeddings/LayerNorm/gamma"]
    hf[f"{prefix}embeddings.LayerNorm.bias"] = weights[
        "bert/embeddings/LayerNorm/beta"]
    dense = ["attention.self.query", "attention.self.key",
             "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"]
    norms = ["attention.output.LayerNorm", "output.LayerNorm"]
    for layer in range(num_layers):
        ours, theirs = f"bert/encoder/layer_{layer}", f"{prefix}encoder.layer.{layer}"
        for module in dense:
            google = f"{ours}/{module.replace('.', '/')}"
            hf[f"{theirs}.{module}.weight"] = np.ascontiguousarray(
                weights[f"{google}/kernel"].T)
            hf[f"{theirs}.{module}.bias"] = weights[f"{google}/bias"]
        for module in norms:
            google = f"{ours}/{module.replace('.', '/')}"
            hf[f"{theirs}.{module}.weight"] = weights[f"{google}/gamma"]
            hf[f"{theirs}.{module}.bias"] = weights[f"{google}/beta"]
    hf[f"{prefix}pooler.dense.weight"] = np.ascontiguousarray(
        weights["bert/pooler/dense/kernel"].T)
    hf[f"{prefix}pooler.dense.bias"] = weights["bert/pooler/dense/bias"]
    return hf


def hf_extras() -> dict[str, np.ndarray]:
    """Tensors a BertForMaskedLM/BertForPreTraining file carries beyond the
    encoder; the converter must ignore them."""
    rng = np.random.default_rng(5)
    h = TINY.hidden_size
    return {
        "bert.embeddings.position_ids":
            np.arange(TINY.max_position_embeddings, dtype=np.int64)[None],
        "cls.predictions.bias": rng.standard_normal(TINY.vocab_size).astype(np.float32),
        "cls.predictions.transform.dense.weight":
            rng.standard_normal((h, h)).astype(np.float32),
        "cls.predictions.transform.LayerNorm.weight": np.ones(h, np.float32),
        "cls.seq_relationship.weight":
            rng.standard_normal((2, h)).astype(np.float32),
    }


_SAFETENSORS_CODES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16",
                      np.dtype("int64"): "I64"}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray],
                      bf16_bits: Optional[dict[str, tuple]] = None) -> None:
    """Write a .safetensors file: u64 header size, JSON header, data.

    ``bf16_bits`` adds BF16 tensors given as (shape, uint16 bit patterns).
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    items = [(n, _SAFETENSORS_CODES[a.dtype], a.shape,
              a.astype(a.dtype.newbyteorder("<")).tobytes())
             for n, a in tensors.items()]
    for name, (shape, bits) in (bf16_bits or {}).items():
        items.append((name, "BF16", shape, np.asarray(bits, "<u2").tobytes()))
    for name, code, shape, blob in items:
        header[name] = {"dtype": code, "shape": list(shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


class _Global:
    """A ``module.name`` reference written as a pickle GLOBAL opcode."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> None:  # pickle wants callables
        raise AssertionError("never called")


class _FakeStorage:
    """A torch storage to be written as a persistent id."""

    def __init__(self, key: str, kind: str, numel: int) -> None:
        self.key, self.kind, self.numel = key, kind, numel


class _FakeTensor:
    """Pickles like a torch tensor: _rebuild_tensor_v2(storage, ...)."""

    def __init__(self, storage: _FakeStorage, shape: tuple, stride: tuple,
                 offset: int = 0) -> None:
        self.storage, self.shape, self.stride = storage, shape, stride
        self.offset = offset

    def __reduce__(self):
        return (_Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, self.offset, self.shape, self.stride, False,
                 collections.OrderedDict()))


class _TorchLikePickler(pickle._Pickler):  # pure-Python pickler: save()
    """Writes torch globals and storages without importing torch."""

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if isinstance(obj, _FakeStorage):
            return ("storage", _Global("torch", obj.kind), obj.key, "cpu",
                    obj.numel)
        return None


_STORAGE_KINDS = {np.dtype("float32"): "FloatStorage",
                  np.dtype("float16"): "HalfStorage",
                  np.dtype("int64"): "LongStorage"}


def torch_state(tensors: dict[str, np.ndarray],
                transposed: tuple[str, ...] = ()
                ) -> tuple[collections.OrderedDict, dict[str, bytes]]:
    """A state dict of fake tensors and their storages' bytes, by key.

    Tensors named in ``transposed`` are stored as a transposed
    (non-contiguous) view, as ``weight.t()`` would be, to exercise strides.
    """
    state = collections.OrderedDict()
    data = {}
    for index, (name, array) in enumerate(tensors.items()):
        key = str(index)
        if name in transposed:
            stored = np.ascontiguousarray(array.T)
            rows, cols = stored.shape
            shape, stride = (cols, rows), (1, cols)
        else:
            stored = np.ascontiguousarray(array)
            shape = array.shape
            stride = tuple(s // array.itemsize for s in stored.strides)
        storage = _FakeStorage(key, _STORAGE_KINDS[array.dtype], stored.size)
        state[name] = _FakeTensor(storage, tuple(shape), stride)
        data[key] = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    return state, data


def _torch_pickle(obj: Any) -> bytes:
    """``obj`` pickled as torch.save does (protocol 2, storages by id)."""
    buffer = io.BytesIO()
    _TorchLikePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def write_torch_state_zip(path: Path, state: collections.OrderedDict,
                          data: dict[str, bytes]) -> None:
    """The zip format of PyTorch >= 1.6: data.pkl plus one member per
    storage."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", _torch_pickle(state))
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        for key, blob in data.items():
            archive.writestr(f"archive/data/{key}", blob)


def write_torch_state_legacy(path: Path, state: collections.OrderedDict,
                             data: dict[str, bytes],
                             numels: Optional[dict[str, int]] = None) -> None:
    """The legacy format: magic number, protocol, system info, the state,
    the keys of the storages it uses, then per storage its int64 element
    count (from ``numels`` if given, else from the bytes) and its bytes."""
    kinds = {t.storage.key: t.storage.kind for t in state.values()}
    itemsize = {"FloatStorage": 4, "HalfStorage": 2, "LongStorage": 8}
    keys = [key for key in data if key in kinds]
    parts = [pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2),
             pickle.dumps(1001, protocol=2),
             pickle.dumps({"protocol_version": 1001, "little_endian": True},
                          protocol=2),
             _torch_pickle(state), pickle.dumps(keys, protocol=2)]
    for key in keys:
        numel = (numels or {}).get(key, len(data[key]) // itemsize[kinds[key]])
        parts += [struct.pack("<q", numel), data[key]]
    path.write_bytes(b"".join(parts))


def write_torch_zip(path: Path, tensors: dict[str, np.ndarray],
                    transposed: tuple[str, ...] = ()) -> None:
    """A zip-format pytorch_model.bin, written without torch."""
    write_torch_state_zip(path, *torch_state(tensors, transposed))


def write_hf_folder(folder: Path, write_weights: Callable[[Path], None],
                    tokenizer_config: Optional[dict] = None,
                    config: Optional[dict] = None,
                    vocab: Optional[list[str]] = None) -> Path:
    """config.json + vocab.txt (+ tokenizer_config.json) + weights."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or HF_CONFIG))
    (folder / "vocab.txt").write_text("\n".join(vocab or VOCAB) + "\n",
                                      encoding="utf-8")
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config))
    write_weights(folder)
    return folder


# --- fixtures and helpers ------------------------------------------------


@pytest.fixture(scope="module")
def weights(random_bert_weights) -> dict[str, np.ndarray]:
    return random_bert_weights(TINY, seed=77)


@pytest.fixture(scope="module")
def reference(weights) -> ReferenceBert:
    return ReferenceBert(weights, TINY.num_layers, TINY.num_heads,
                         TINY.layer_norm_eps)


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three rows of different real lengths, padded, with two segments."""
    rng = np.random.default_rng(9)
    ids = rng.integers(1, TINY.vocab_size, (3, 17)).astype(np.int32)
    mask = np.ones_like(ids)
    for row, length in enumerate((17, 9, 1)):
        ids[row, length:] = 0
        mask[row, length:] = 0
    segments = np.zeros_like(ids)
    segments[0, 8:] = 1
    return ids, mask, segments


@pytest.fixture(scope="module")
def google_model(tmp_path_factory, weights) -> str:
    """Google layout (with heads and optimizer slots) converted by the CLI,
    with --do_lower_case false."""
    root = tmp_path_factory.mktemp("google")
    rng = np.random.default_rng(1)
    extra = {
        "cls/predictions/transform/dense/kernel":
            rng.standard_normal((32, 32)).astype(np.float32),
        "cls/predictions/output_bias": np.zeros(TINY.vocab_size, np.float32),
        "bert/embeddings/word_embeddings/adam_m":
            np.zeros((TINY.vocab_size, 32), np.float32),
        "global_step": np.array(1000, np.int64),
    }
    source = write_google_checkpoint(root / "ckpt", weights, extra)
    output = root / "saved_model"
    assert main(["--source", str(source), "--output", str(output),
                 "--do_lower_case", "false"]) == 0
    return str(output)


@pytest.fixture(scope="module")
def hf_safetensors_model(tmp_path_factory, weights) -> str:
    """HF layout, safetensors with the bert. prefix and extra heads; its
    tokenizer_config says do_lower_case false, as bert-base-chinese's does."""
    root = tmp_path_factory.mktemp("hf")
    tensors = {**google_to_hf(weights), **hf_extras()}
    source = write_hf_folder(
        root / "hf", lambda f: write_safetensors(f / "model.safetensors",
                                                 tensors),
        tokenizer_config={"do_lower_case": False})
    return convert_checkpoint(str(source), str(root / "saved_model"))


def _outputs(model_dir: str, batch) -> tuple[np.ndarray, np.ndarray]:
    """Outputs of a converted model through the pipeline's loader."""
    return load_bert_saved_model(model_dir)(*batch)


def _assert_matches_reference(model_dir: str, batch, reference,
                              ref_model: Optional[ReferenceBert] = None) -> None:
    """Pooled and (real-token) sequence outputs equal the reference."""
    ids, mask, segments = batch
    pooled, sequence = _outputs(model_dir, batch)
    ref_pooled, ref_sequence = (ref_model or reference)(ids, mask, segments)
    np.testing.assert_allclose(pooled, ref_pooled, atol=1e-4, rtol=0)
    real = mask.astype(bool)
    np.testing.assert_allclose(sequence[real], ref_sequence[real], atol=1e-4,
                               rtol=0)


# --- round trips ----------------------------------------------------------


def test_google_checkpoint_round_trip(google_model, batch, reference):
    _assert_matches_reference(google_model, batch, reference)


def test_hf_safetensors_round_trip(hf_safetensors_model, batch, reference):
    _assert_matches_reference(hf_safetensors_model, batch, reference)


def test_converted_models_agree(google_model, hf_safetensors_model, batch):
    pooled_a, sequence_a = _outputs(google_model, batch)
    pooled_b, sequence_b = _outputs(hf_safetensors_model, batch)
    np.testing.assert_allclose(pooled_a, pooled_b, atol=1e-6, rtol=0)
    np.testing.assert_allclose(sequence_a, sequence_b, atol=1e-6, rtol=0)


def test_converted_model_has_hub_interface(google_model, batch):
    loaded = tf.saved_model.load(google_model)
    ids, mask, segments = batch
    pooled, _ = loaded([tf.constant(ids), tf.constant(mask),
                        tf.constant(segments)])
    serve = loaded.signatures["serving_default"]
    _, inputs = serve.structured_input_signature
    assert set(inputs) == {"input_word_ids", "input_mask", "segment_ids"}
    assert all(spec.shape.as_list() == [None, None] for spec in inputs.values())
    out = serve(input_word_ids=tf.constant(ids[:1, :5]),
                input_mask=tf.constant(mask[:1, :5]),
                segment_ids=tf.constant(segments[:1, :5]))
    assert out["sequence_output"].shape == (1, 5, TINY.hidden_size)
    assert load_bert_saved_model(google_model).interface == "list"
    np.testing.assert_allclose(pooled.numpy(), _outputs(google_model, batch)[0],
                               atol=1e-6)


def test_settings_and_hidden_size_of_converted_models(google_model,
                                                      hf_safetensors_model):
    google = read_tokenizer_settings(google_model)
    assert google.do_lower_case is False  # the CLI flag
    assert Path(google.vocab_path).read_text(
        encoding="utf-8").splitlines() == VOCAB
    hf = read_tokenizer_settings(hf_safetensors_model)
    # An all-lower-case vocab wins over tokenizer_config.json's false.
    assert hf.do_lower_case is True
    for model_dir in (google_model, hf_safetensors_model):
        assert infer_hidden_size(model_dir, len(VOCAB)) == TINY.hidden_size


def test_hf_without_prefix_and_half_precision(tmp_path, weights, batch):
    """Names without ``bert.``, weights stored as F16: the model equals the
    reference run on the same F16-rounded weights."""
    half = {k: v.astype(np.float16) for k, v in weights.items()}
    source = write_hf_folder(tmp_path / "hf", lambda f: write_safetensors(
        f / "model.safetensors", google_to_hf(half, prefix="")))
    output = convert_checkpoint(str(source), str(tmp_path / "out"))
    rounded = ReferenceBert({k: v.astype(np.float32) for k, v in half.items()},
                            TINY.num_layers, TINY.num_heads)
    _assert_matches_reference(output, batch, None, rounded)


def test_sharded_safetensors(tmp_path, weights, batch, reference):
    tensors = google_to_hf(weights)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}

    def write(folder: Path) -> None:
        for shard, members in shards.items():
            write_safetensors(folder / shard, {n: tensors[n] for n in members})
        index = {"weight_map": {n: s for s, ms in shards.items() for n in ms}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    source = write_hf_folder(tmp_path / "hf", write)
    _assert_matches_reference(
        convert_checkpoint(str(source), str(tmp_path / "out")), batch,
        reference)


def test_torch_bin_without_torch(tmp_path, weights, batch, reference):
    tensors = {**google_to_hf(weights), **hf_extras()}
    kernels = tuple(n for n in tensors if n.endswith("query.weight"))
    source = write_hf_folder(tmp_path / "hf", lambda f: write_torch_zip(
        f / "pytorch_model.bin", tensors, transposed=kernels))
    assert detect_layout(str(source)) == "huggingface"
    _assert_matches_reference(
        convert_checkpoint(str(source), str(tmp_path / "out")), batch,
        reference)


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_bin_from_real_torch(tmp_path, weights, batch, reference,
                                   zip_format):
    torch = pytest.importorskip("torch")
    state = collections.OrderedDict(
        (name, torch.from_numpy(np.array(value)))
        for name, value in google_to_hf(weights).items())
    state["bert.embeddings.position_ids"] = torch.arange(64)[None]

    def write(folder: Path) -> None:
        torch.save(state, str(folder / "pytorch_model.bin"),
                   _use_new_zipfile_serialization=zip_format)

    source = write_hf_folder(tmp_path / "hf", write)
    _assert_matches_reference(
        convert_checkpoint(str(source), str(tmp_path / "out")), batch,
        reference)


# --- readers --------------------------------------------------------------


def test_safetensors_dtypes(tmp_path):
    path = tmp_path / "t.safetensors"
    # 1.0, -2.5, 0.375 and 2**-10 as bfloat16 bit patterns.
    write_safetensors(path, {
        "f32": np.array([[1.5, -2.0]], np.float32),
        "f16": np.array([0.5, 65504.0], np.float16),
        "ids": np.arange(3, dtype=np.int64)},
        bf16_bits={"bf16": ((2, 2), [0x3F80, 0xC020, 0x3EC0, 0x3A80])})
    tensors = read_safetensors(str(path))
    np.testing.assert_array_equal(tensors["bf16"], [[1.0, -2.5], [0.375, 2**-10]])
    assert tensors["bf16"].dtype == np.float32
    np.testing.assert_array_equal(tensors["f32"], [[1.5, -2.0]])
    assert tensors["f16"].dtype == np.float16
    np.testing.assert_array_equal(tensors["f16"], [0.5, 65504.0])
    np.testing.assert_array_equal(tensors["ids"], [0, 1, 2])
    assert set(read_safetensors(str(path), keep=lambda n: n.startswith("f"))) == {
        "f32", "f16"}


def test_safetensors_corruption_is_detected(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"x": np.ones((4, 4), np.float32)})
    path.write_bytes(path.read_bytes()[:-8])  # truncated data
    with pytest.raises(ConversionError, match="outside the file"):
        read_safetensors(str(path))
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ConversionError, match="header length"):
        read_safetensors(str(path))


def test_torch_reader_refuses_unknown_globals(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (_Global("os", "system"), (f"touch {marker}",))

    buffer = io.BytesIO()
    _TorchLikePickler(buffer, protocol=2).dump({"x": Evil()})
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
    with pytest.raises(ConversionError) as err:
        read_torch_bin(str(path))
    assert "refusing global os.system" in str(err.value)
    assert "safetensors" in str(err.value)  # says how to get a readable file
    assert not marker.exists()


def test_torch_reader_non_contiguous_and_offset_views(tmp_path):
    base = np.arange(12, dtype=np.float32)
    storage = _FakeStorage("0", "FloatStorage", 12)
    state = collections.OrderedDict(
        t=_FakeTensor(storage, (3, 2), (1, 3)),           # transposed 2x3
        tail=_FakeTensor(storage, (4,), (1,), offset=8))  # base[8:]
    buffer = io.BytesIO()
    _TorchLikePickler(buffer, protocol=2).dump(state)
    path = tmp_path / "x.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/data.pkl", buffer.getvalue())
        archive.writestr("m/data/0", base.astype("<f4").tobytes())
    tensors = read_torch_bin(str(path))
    np.testing.assert_array_equal(tensors["t"], base[:6].reshape(2, 3).T)
    np.testing.assert_array_equal(tensors["tail"], base[8:])


def test_hf_names_map_to_google_names():
    assert hf_to_google_name("bert.encoder.layer.11.attention.self.query.weight") \
        == "bert/encoder/layer_11/attention/self/query/kernel"
    assert hf_to_google_name("encoder.layer.0.output.LayerNorm.bias") \
        == "bert/encoder/layer_0/output/LayerNorm/beta"
    assert hf_to_google_name("bert.embeddings.LayerNorm.gamma") \
        == "bert/embeddings/LayerNorm/gamma"
    assert hf_to_google_name("embeddings.token_type_embeddings.weight") \
        == "bert/embeddings/token_type_embeddings"
    assert hf_to_google_name("bert.pooler.dense.bias") == "bert/pooler/dense/bias"
    for ignored in ("cls.predictions.bias", "bert.embeddings.position_ids",
                    "cls.predictions.transform.dense.weight", "classifier.weight"):
        assert hf_to_google_name(ignored) is None


def test_hf_config_mapping():
    assert bert_config_from_hf(HF_CONFIG) == TINY
    for bad, match in ((dict(HF_CONFIG, hidden_act="gelu_new"), "hidden_act"),
                       (dict(HF_CONFIG, model_type="roberta"), "model_type"),
                       (dict(HF_CONFIG, position_embedding_type="relative_key"),
                        "absolute")):
        with pytest.raises(ConversionError, match=match):
            bert_config_from_hf(bad)


# --- do_lower_case ---------------------------------------------------------

REAL_VOCAB = SHARED_ASSETS / "bert_zh" / "vocab.txt"
needs_real_vocab = pytest.mark.skipif(
    not REAL_VOCAB.exists(), reason="no real Chinese BERT vocabulary in "
    "../shared/assets/bert_zh (see README there)")
# BERT (lower-casing, as Google's Chinese model is used) tokenizes this as
# below; without lower-casing every word with a capital becomes [UNK].
SAMPLE = "C盘有近200G，EMAIL Café"
BERT_TOKENS = ["c", "盘", "有", "近", "200", "##g", "，", "email", "cafe"]


def english_cased_vocab() -> list[str]:
    """A small vocabulary built like English cased BERT's: specials,
    single characters of both cases, ## pieces, lower-case words and many
    capitalised ones."""
    lower = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    upper = [c.upper() for c in lower]
    words = ["the", "of", "and", "in", "to", "was", "he", "is", "for", "on",
             "city", "river", "music", "##ing", "##ed", "##s", "##ly"]
    capitalised = ["The", "In", "He", "It", "A", "London", "John", "New",
                   "American", "University", "Paris", "France", "British",
                   "##A", "##S", "##M", "##ON", "NASA", "BBC", "McDonald"]
    return (SPECIALS + list(".,;:!?()[]'\"-") + lower + upper
            + [f"##{c}" for c in lower + upper] + words + capitalised)


def test_do_lower_case_flag_wins():
    for vocab in (["[UNK]", "a", "##b"], english_cased_vocab()):
        for flag in (True, False):
            for hint in (None, True, False):
                chosen, reason = choose_do_lower_case(vocab, flag, hint)
                assert chosen is flag and "--do_lower_case" in reason


def test_entries_no_text_produces_do_not_make_a_vocab_cased():
    """<S>, <T> (in Google's Chinese vocabulary), [CLS], [unused1] hold
    punctuation, so the tokenizer never looks them up: their capitals say
    nothing about the casing of the text the model expects."""
    vocab = SPECIALS + ["<S>", "<T>", "<UNK>", "[Foo]", "a", "b", "##c",
                        "hello", "##world", "中", "国"]
    for hint in (None, False):
        chosen, reason = choose_do_lower_case(vocab, None, hint)
        assert chosen is True, reason
        assert "uncased" in reason and "<S>, <T>" in reason
    assert "overriding tokenizer_config.json" in choose_do_lower_case(
        vocab, None, False)[1]


def test_cased_vocab_keeps_case():
    vocab = english_cased_vocab()
    chosen, reason = choose_do_lower_case(vocab, None, None)
    assert chosen is False
    assert reason.startswith("the vocabulary is cased") and "The" in reason
    # A cased vocabulary follows the checkpoint's own setting if it has one.
    assert choose_do_lower_case(vocab, None, True)[0] is True
    assert choose_do_lower_case(vocab, None, False)[0] is False


def test_a_stray_capital_does_not_make_a_vocab_cased():
    """One capitalised piece among hundreds of lower-case ones: lower-casing
    only loses that piece; not lower-casing would turn every capitalised
    word of the corpus into [UNK]."""
    vocab = SPECIALS + [f"w{i}" for i in range(400)] + ["Xylophone"]
    chosen, reason = choose_do_lower_case(vocab, None, None)
    assert chosen is True
    assert "only 1 of its 401" in reason and "Xylophone" in reason


def config_dicts(config: BertConfig) -> tuple[dict, dict]:
    """GOOGLE_CONFIG and HF_CONFIG changed to ``config``'s sizes."""
    sizes = {"vocab_size": config.vocab_size,
             "hidden_size": config.hidden_size,
             "num_hidden_layers": config.num_layers,
             "num_attention_heads": config.num_heads,
             "intermediate_size": config.intermediate_size,
             "max_position_embeddings": config.max_position_embeddings}
    return dict(GOOGLE_CONFIG, **sizes), dict(HF_CONFIG, **sizes)


@needs_real_vocab
@pytest.mark.parametrize("layout,flags,expected", [
    ("google", [], True),
    ("huggingface", [], True),
    ("google", ["--do_lower_case", "false"], False),
])
def test_real_chinese_vocab_gets_lower_casing(tmp_path, random_bert_weights,
                                              caplog, layout, flags, expected):
    """Both release layouts of Chinese BERT, converted with default flags,
    store do_lower_case=True, so the pipeline's tokenizer, configured from
    the converted model, tokenizes as BERT does; --do_lower_case overrides.
    The Hugging Face folder says false in tokenizer_config.json, as
    bert-base-chinese's does."""
    vocab = load_vocab(str(REAL_VOCAB))
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_layers=1,
                        num_heads=2, intermediate_size=32,
                        max_position_embeddings=32)
    google_config, hf_config = config_dicts(config)
    weights = random_bert_weights(config, seed=21)
    if layout == "google":
        source = write_google_checkpoint(tmp_path / "src", weights,
                                         config=google_config, vocab=vocab)
    else:
        source = write_hf_folder(
            tmp_path / "src", lambda f: write_safetensors(
                f / "model.safetensors", google_to_hf(weights, num_layers=1)),
            tokenizer_config={"do_lower_case": False}, config=hf_config,
            vocab=vocab)
    output = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="model.convert"):
        assert main(["--source", str(source), "--output", str(output)]
                    + flags) == 0
    assert f"do_lower_case={expected}" in caplog.text
    if not flags:  # the log says why
        assert "the vocabulary is uncased" in caplog.text
        assert "<S>, <T>" in caplog.text
    settings = read_tokenizer_settings(str(output))
    assert settings.do_lower_case is expected
    tokenizer = BertWordPieceTokenizer(load_vocab(settings.vocab_path),
                                       settings.do_lower_case)
    tokens = tokenizer.tokenize(SAMPLE)
    if expected:
        assert tokens == BERT_TOKENS
    else:
        assert tokens.count("[UNK]") == 4  # C, 200G, EMAIL, Café


# --- errors ---------------------------------------------------------------


def test_missing_encoder_weights_are_named(tmp_path, weights):
    partial = dict(weights)
    del partial["bert/pooler/dense/bias"]
    del partial["bert/encoder/layer_1/attention/self/key/kernel"]
    source = write_google_checkpoint(tmp_path / "g", partial)
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(str(source), str(tmp_path / "out"))
    assert "bert/pooler/dense/bias" in str(err.value)
    assert "bert/encoder/layer_1/attention/self/key/kernel" in str(err.value)
    assert not (tmp_path / "out").exists()

    tensors = google_to_hf(weights)
    del tensors["bert.encoder.layer.1.output.LayerNorm.weight"]
    hf = write_hf_folder(tmp_path / "hf", lambda f: write_safetensors(
        f / "model.safetensors", tensors))
    with pytest.raises(ConversionError,
                       match="bert/encoder/layer_1/output/LayerNorm/gamma"):
        convert_checkpoint(str(hf), str(tmp_path / "out"))


def test_wrong_shapes_are_named(tmp_path, weights):
    tensors = google_to_hf(weights)
    tensors["bert.pooler.dense.weight"] = tensors["bert.pooler.dense.weight"][:, :8]
    hf = write_hf_folder(tmp_path / "hf", lambda f: write_safetensors(
        f / "model.safetensors", tensors))
    with pytest.raises(ConversionError, match="bert/pooler/dense/kernel"):
        convert_checkpoint(str(hf), str(tmp_path / "out"))


def test_vocab_size_mismatch(tmp_path, weights):
    source = write_google_checkpoint(tmp_path / "g", weights)
    short = tmp_path / "short_vocab.txt"
    short.write_text("\n".join(VOCAB[:-3]) + "\n", encoding="utf-8")
    with pytest.raises(ConversionError, match="117 entries .* 120 rows"):
        convert_checkpoint(str(source), str(tmp_path / "out"),
                           vocab_file=str(short))
    os.remove(source / "vocab.txt")
    with pytest.raises(ConversionError, match="--vocab_file"):
        convert_checkpoint(str(source), str(tmp_path / "out"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("x")
    assert main(["--source", str(tmp_path / "src"),
                 "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "neither a Google BERT checkpoint" in err and "notes.txt" in err
    assert main(["--source", str(tmp_path / "src"),
                 "--output", str(tmp_path / "src")]) == 2
    assert "already exists" in capsys.readouterr().err


# --- crafted files: checked before anything is read or built ---------------


def _assert_cli_refuses(source: Path, tmp_path: Path, capsys,
                        *needles: str) -> None:
    """The CLI exits 2 with one ``error:`` line naming ``needles`` and
    writes no model."""
    output = tmp_path / "out"
    assert main(["--source", str(source), "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not output.exists()


def _crafted(storage_numel: int, size: tuple, stride: tuple, offset: int = 0
             ) -> tuple[_FakeTensor, bytes]:
    """A float tensor record over a storage holding 4 floats (whatever the
    record claims the storage holds)."""
    storage = _FakeStorage("crafted", "FloatStorage", storage_numel)
    return (_FakeTensor(storage, size, stride, offset),
            np.arange(4, dtype="<f4").tobytes())


_BAD_VIEWS = {
    # stride 0 over 4 floats: 10^12 elements (4 TB) from a 16-byte storage
    "stride_0_terabytes": (4, (10**6, 10**6), (0, 0), 0),
    "negative_size": (4, (-1, 4), (4, 1), 0),
    "size_beyond_storage": (4, (5,), (1,), 0),
    "offset_beyond_storage": (4, (2,), (1,), 3),
    "negative_offset": (4, (2,), (1,), -1),
    "stride_rank_mismatch": (4, (2, 2), (1,), 0),
}
# Storages whose size disagrees with the file: the file is refused whole.
_BAD_STORAGES = {
    "negative_storage_numel": (-4, (2,), (1,), 0),
    # the record (and, in the legacy format, the file) claims 10^12
    # elements; the file holds 4
    "storage_numel_beyond_file": (10**12, (4,), (1,), 0),
}


@pytest.mark.parametrize("writer", [write_torch_state_zip,
                                    write_torch_state_legacy],
                         ids=["zip", "legacy"])
@pytest.mark.parametrize("case", sorted(_BAD_VIEWS) + sorted(_BAD_STORAGES))
def test_torch_reader_refuses_views_outside_their_storage(tmp_path, writer,
                                                          case):
    numel, size, stride, offset = {**_BAD_VIEWS, **_BAD_STORAGES}[case]
    tensor, blob = _crafted(numel, size, stride, offset)
    state = collections.OrderedDict(
        ok=_FakeTensor(_FakeStorage("ok", "FloatStorage", 2), (2,), (1,)),
        bad=tensor)
    data = {"ok": np.ones(2, "<f4").tobytes(), "crafted": blob}
    path = tmp_path / "pytorch_model.bin"
    if writer is write_torch_state_legacy:
        writer(path, state, data, numels={"crafted": numel})
    else:
        writer(path, state, data)
    with pytest.raises(ConversionError) as err:
        read_torch_bin(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    # Tensors left out are not built, nor their storages read.
    if case in _BAD_VIEWS:
        assert set(read_torch_bin(str(path), keep=lambda n: n == "ok")) == {
            "ok"}


@pytest.mark.parametrize("writer", [write_torch_state_zip,
                                    write_torch_state_legacy],
                         ids=["zip", "legacy"])
def test_crafted_torch_bin_is_refused_before_allocating(tmp_path, capsys,
                                                        weights, writer):
    """An encoder weight claiming 10^6 x 10^6 elements through stride 0 is
    checked against the config first: one line, exit 2, no model.  The
    same record under a name outside the encoder is never built."""
    state, data = torch_state(google_to_hf(weights))
    tensor, blob = _crafted(4, (10**6, 10**6), (0, 0))
    data["crafted"] = blob
    bad = collections.OrderedDict(state, **{"bert.pooler.dense.weight": tensor})
    write_hf_folder(tmp_path / "bad", lambda f: writer(
        f / "pytorch_model.bin", bad, data))
    _assert_cli_refuses(tmp_path / "bad", tmp_path, capsys,
                        "bert.pooler.dense.weight", "[1000000, 1000000]",
                        "bert/pooler/dense/kernel")

    ignored = collections.OrderedDict(
        state, **{"cls.predictions.decoder.weight": tensor})
    source = write_hf_folder(tmp_path / "ignored", lambda f: writer(
        f / "pytorch_model.bin", ignored, data))
    convert_checkpoint(str(source), str(tmp_path / "model"))


def test_torch_zip_members_may_not_inflate_beyond_reason(tmp_path):
    """PyTorch stores members uncompressed; a deflated one is read if it
    inflates like real weights do, refused if it is a bomb (16 MB of zeros
    from a few kilobytes)."""
    rng = np.random.default_rng(0)
    blobs = {"weights": rng.standard_normal(1 << 19).astype("<f4").tobytes(),
             "bomb": bytes(1 << 24)}
    for key, blob in blobs.items():
        storage = _FakeStorage(key, "FloatStorage", len(blob) // 4)
        state = collections.OrderedDict(x=_FakeTensor(storage, (2,), (1,)))
        path = tmp_path / f"{key}.bin"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("archive/data.pkl", _torch_pickle(state))
            archive.writestr(f"archive/data/{key}", blob)
        if key == "weights":
            np.testing.assert_array_equal(read_torch_bin(str(path))["x"],
                                          np.frombuffer(blob, "<f4")[:2])
        else:
            with pytest.raises(ConversionError, match="inflates"):
                read_torch_bin(str(path))


def test_legacy_torch_bin_round_trip(tmp_path, weights, batch, reference):
    tensors = google_to_hf(weights)
    kernels = tuple(n for n in tensors if n.endswith("key.weight"))
    source = write_hf_folder(tmp_path / "hf", lambda f: write_torch_state_legacy(
        f / "pytorch_model.bin", *torch_state(tensors, kernels)))
    _assert_matches_reference(
        convert_checkpoint(str(source), str(tmp_path / "out")), batch,
        reference)


def _write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    """A safetensors file with exactly this header and data."""
    text = json.dumps(header).encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


_BAD_SAFETENSORS = {
    "negative_shape": ({"dtype": "F32", "shape": [-2, -2],
                        "data_offsets": [0, 16]}, "bad shape"),
    # 2^62 x 4 floats is 2^66 bytes, 0 in int64 arithmetic
    "overflowing_shape": ({"dtype": "F32", "shape": [2**62, 4],
                           "data_offsets": [0, 0]}, "needs"),
    "shape_not_a_list": ({"dtype": "F32", "shape": 16,
                          "data_offsets": [0, 64]}, "bad shape"),
    "float_dimension": ({"dtype": "F32", "shape": [4.5],
                         "data_offsets": [0, 16]}, "bad shape"),
    "bytes_do_not_fit_shape": ({"dtype": "F32", "shape": [4, 4],
                                "data_offsets": [0, 32]}, "needs 64"),
    "dtype_does_not_fit_bytes": ({"dtype": "F64", "shape": [16],
                                  "data_offsets": [0, 64]}, "needs 128"),
    "end_beyond_file": ({"dtype": "F32", "shape": [32],
                         "data_offsets": [0, 128]}, "outside the file"),
    "begin_after_end": ({"dtype": "F32", "shape": [0],
                         "data_offsets": [32, 16]}, "outside the file"),
    "string_offsets": ({"dtype": "F32", "shape": [4],
                        "data_offsets": ["0", 16]}, "bad data_offsets"),
    "unknown_dtype": ({"dtype": "F8_E4M3", "shape": [4],
                       "data_offsets": [0, 4]}, "unsupported dtype"),
    "entry_not_an_object": ([0, 16], "bad header entry"),
}


@pytest.mark.parametrize("case", sorted(_BAD_SAFETENSORS))
def test_safetensors_header_is_checked_before_reading(tmp_path, case):
    entry, message = _BAD_SAFETENSORS[case]
    path = tmp_path / "model.safetensors"
    _write_raw_safetensors(path, {"x": entry}, bytes(64))
    with pytest.raises(ConversionError, match=message) as err:
        read_safetensors(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_safetensors_shape_is_checked_against_the_config_first(tmp_path,
                                                              capsys, weights):
    tensors = google_to_hf(weights)
    tensors["bert.encoder.layer.1.intermediate.dense.weight"] = np.zeros(
        (64, 8), np.float32)
    source = write_hf_folder(tmp_path / "hf", lambda f: write_safetensors(
        f / "model.safetensors", tensors))
    _assert_cli_refuses(source, tmp_path, capsys,
                        "bert.encoder.layer.1.intermediate.dense.weight",
                        "[64, 8]", "[64, 32]")


class _CountingReader:
    """A TF checkpoint reader that records which tensors were read."""

    def __init__(self, reader) -> None:
        self._reader, self.read = reader, []

    def get_tensor(self, name: str):
        self.read.append(name)
        return self._reader.get_tensor(name)

    def __getattr__(self, name: str):
        return getattr(self._reader, name)


def test_google_shapes_are_checked_before_any_tensor_is_read(
        tmp_path, capsys, weights, monkeypatch):
    bad = dict(weights)
    bad["bert/pooler/dense/kernel"] = np.zeros((32, 8), np.float32)
    bad["bert/embeddings/word_embeddings"] = np.zeros((121, 32), np.float32)
    source = write_google_checkpoint(tmp_path / "g", bad)
    readers = []
    real = tf.compat.v1.train.NewCheckpointReader

    def counting(prefix):
        readers.append(_CountingReader(real(prefix)))
        return readers[-1]

    monkeypatch.setattr(tf.compat.v1.train, "NewCheckpointReader", counting)
    _assert_cli_refuses(source, tmp_path, capsys, "bert/pooler/dense/kernel",
                        "[32, 8]", "bert/embeddings/word_embeddings")
    assert readers and all(r.read == [] for r in readers)


def test_google_checkpoint_faults_are_one_line_errors(tmp_path, capsys,
                                                      weights):
    ints = {k: v.astype(np.int32) if k.endswith("/bias") else v
            for k, v in weights.items()}
    _assert_cli_refuses(write_google_checkpoint(tmp_path / "ints", ints),
                        tmp_path, capsys, "floating point", "int32")
    source = write_google_checkpoint(tmp_path / "cut", weights)
    (data,) = source.glob("bert_model.ckpt.data-*")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    _assert_cli_refuses(source, tmp_path, capsys, "bert_model.ckpt")


# --- real weights (opt-in: runs only where they are supplied) -------------


def _real_weights_dir() -> Optional[Path]:
    """A folder under ../shared/assets holding real Chinese BERT weights."""
    folder = SHARED_ASSETS / "bert_zh"
    markers = ("bert_model.ckpt.index", "model.safetensors", "pytorch_model.bin")
    return folder if any((folder / m).exists() for m in markers) else None


@pytest.mark.skipif(_real_weights_dir() is None,
                    reason="no real Chinese BERT weights in ../shared/assets/"
                           "bert_zh (see README there)")
def test_real_chinese_bert_semantics(tmp_path):
    from model.vocab import load_vocab
    from transforms.tokenization import BertWordPieceTokenizer
    output = convert_checkpoint(str(_real_weights_dir()), str(tmp_path / "m"))
    model = load_bert_saved_model(output)
    settings = read_tokenizer_settings(output)
    tokenizer = BertWordPieceTokenizer(load_vocab(settings.vocab_path),
                                       settings.do_lower_case)

    def embed(text: str) -> np.ndarray:
        ids = tokenizer.encode(text, 128).input_word_ids[None]
        mask = (ids != 0).astype(np.int32)
        _, sequence = model(ids, mask, np.zeros_like(ids))
        return sequence[0][mask[0].astype(bool)].mean(axis=0)

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    path = SHARED_ASSETS / "eval" / "zh_similarity_triples.jsonl"
    margins = []
    for line in path.read_text(encoding="utf-8").splitlines():
        triple = json.loads(line)
        anchor = embed(triple["anchor"])
        margins.append(cosine(anchor, embed(triple["similar"]))
                       - cosine(anchor, embed(triple["unrelated"])))
    # A smoke test, not proof of semantics: shared characters alone let a
    # tiny randomly initialised model win 15 of 16 triples (mean margin
    # about 0.03), so this catches conversions that give NaN or
    # near-constant outputs; a real BERT should clear both bars easily.
    wins = sum(m > 0 for m in margins)
    assert wins >= 0.75 * len(margins), margins
    assert np.mean(margins) > 0.01, margins
