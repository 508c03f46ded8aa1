"""Convert real BERT checkpoints into a TF Hub–compatible SavedModel.

``python -m model.convert --source DIR --output DIR [--do_lower_case
true|false] [--vocab_file PATH]`` reads one of two layouts (detected
automatically) and writes the model through ``model.export`` — the one
exporter — so the result has the TF Hub BERT interface and a
``serving_default`` signature with dynamic batch and sequence length:

``google``
    Google's original TF checkpoint release (``bert_config.json``,
    ``bert_model.ckpt.*``, ``vocab.txt``), variables named
    ``bert/embeddings/word_embeddings`` etc.
``huggingface``
    Hugging Face BERT (``config.json``, ``vocab.txt`` and
    ``model.safetensors`` or ``pytorch_model.bin``, sharded or not).  Both
    weight formats are read with NumPy alone: safetensors by parsing its
    header, ``pytorch_model.bin`` through a restricted unpickler that only
    admits the few PyTorch globals a state dict needs.

Weights outside the encoder (``cls/predictions/...``, optimizer slots) are
ignored; missing encoder weights are an error that names them.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import io
import json
import logging
import os
import pickle
import struct
import sys
import zipfile
from typing import Any, BinaryIO, Callable, Mapping, Optional, Sequence

import numpy as np

from model.bert import BertConfig, bert_weight_shapes

_LOG = logging.getLogger(__name__)

GOOGLE = "google"
HUGGINGFACE = "huggingface"
LAYOUTS = (GOOGLE, HUGGINGFACE)

GOOGLE_CONFIG = "bert_config.json"
HF_CONFIG = "config.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
VOCAB_FILE = "vocab.txt"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
_INDEX_SUFFIX = ".index.json"

# Upper bound on a safetensors JSON header; real ones are well below 1 MB.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


class ConversionError(ValueError):
    """The source cannot be converted; the message is one line."""


# --- safetensors ---------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 values given as their uint16 bit patterns (bfloat16 is
    the top half of a float32, so this is exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _read_safetensors_header(handle: BinaryIO, path: str,
                             size: int) -> dict[str, Any]:
    """The JSON header of a safetensors file, validated for size."""
    prefix = handle.read(8)
    if len(prefix) != 8:
        raise ConversionError(f"{path}: too short for a safetensors file")
    (length,) = struct.unpack("<Q", prefix)
    if length > min(_MAX_SAFETENSORS_HEADER, size - 8):
        raise ConversionError(f"{path}: bad safetensors header length {length}")
    try:
        header = json.loads(handle.read(length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path}: bad safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: safetensors header is not an object")
    header.pop("__metadata__", None)
    return header


def _decode_safetensor(name: str, entry: Mapping[str, Any], raw: bytes,
                       path: str) -> np.ndarray:
    """One tensor from its header entry and raw little-endian bytes."""
    dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise ConversionError(f"{path}: tensor {name} has unsupported dtype "
                              f"{entry.get('dtype')!r}")
    shape = tuple(int(n) for n in entry["shape"])
    if len(raw) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise ConversionError(f"{path}: tensor {name} has {len(raw)} bytes, "
                              f"which does not fit shape {list(shape)}")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if entry["dtype"] == "BF16":
        return bfloat16_to_float32(array)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_safetensors(path: str, keep: Optional[Callable[[str], bool]] = None
                     ) -> dict[str, np.ndarray]:
    """Tensors of a ``.safetensors`` file as NumPy arrays.

    Format: 8-byte little-endian header length, a JSON header mapping each
    name to ``dtype``, ``shape`` and ``data_offsets`` (relative to the end
    of the header), then the raw little-endian data.  BF16 becomes float32.
    Only tensors for which ``keep(name)`` is true are read.
    """
    size = os.path.getsize(path)
    tensors = {}
    with open(path, "rb") as handle:
        header = _read_safetensors_header(handle, path, size)
        data_start = handle.tell()
        for name, entry in header.items():
            if keep is not None and not keep(name):
                continue
            try:
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise ConversionError(
                    f"{path}: bad header entry for {name}") from err
            if not 0 <= begin <= end <= size - data_start:
                raise ConversionError(f"{path}: tensor {name} lies outside "
                                      "the file")
            handle.seek(data_start + begin)
            tensors[name] = _decode_safetensor(name, entry,
                                               handle.read(end - begin), path)
    return tensors


# --- pytorch_model.bin without PyTorch -----------------------------------

_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("f4"), "DoubleStorage": np.dtype("f8"),
    "HalfStorage": np.dtype("f2"), "BFloat16Storage": np.dtype("u2"),
    "LongStorage": np.dtype("i8"), "IntStorage": np.dtype("i4"),
    "ShortStorage": np.dtype("i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
}
_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_HINT = ("re-save it as safetensors (e.g. with transformers' "
               "save_pretrained(safe_serialization=True)) and convert that")


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.<Type>Storage`` class named in a pickle."""
    name: str
    dtype: np.dtype


class _Storage:
    """One PyTorch storage: a flat array filled in when its bytes are read."""

    def __init__(self, storage_type: _StorageType, numel: int) -> None:
        """An empty storage of ``numel`` elements of the type's dtype."""
        self.storage_type = storage_type
        self.numel = numel
        self.array: Optional[np.ndarray] = None

    def fill(self, raw: bytes, byteorder: str) -> None:
        """Set the contents from raw bytes in the file's byte order."""
        dtype = self.storage_type.dtype.newbyteorder(
            "<" if byteorder == "little" else ">")
        if len(raw) != self.numel * dtype.itemsize:
            raise ConversionError(
                f"storage holds {len(raw)} bytes, expected "
                f"{self.numel} x {dtype.itemsize}")
        array = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
        if self.storage_type.name == "BFloat16Storage":
            array = bfloat16_to_float32(array)
        self.array = array


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """A tensor as a strided view of a storage, materialised after loading
    (legacy files store the bytes after the pickle that names them)."""
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def to_numpy(self) -> np.ndarray:
        """Copy the view out as a C-contiguous array, bounds-checked."""
        flat = self.storage.array
        if flat is None:
            raise ConversionError("a tensor refers to storage that the file "
                                  "does not contain")
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or min(self.stride, default=0) < 0 or last >= flat.size:
            raise ConversionError("a tensor's view lies outside its storage")
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size,
            strides=[s * flat.itemsize for s in self.stride], writeable=False)
        return np.array(view)


def _rebuild_tensor(storage: _Storage, offset: int, size: Sequence[int],
                    stride: Sequence[int], *unused: Any) -> _TensorRef:
    """Replacement for ``torch._utils._rebuild_tensor_v2``."""
    if not isinstance(storage, _Storage):
        raise ConversionError("malformed tensor record in PyTorch checkpoint")
    return _TensorRef(storage, int(offset), tuple(int(n) for n in size),
                      tuple(int(s) for s in stride))


def _rebuild_parameter(data: _TensorRef, *unused: Any) -> _TensorRef:
    """Replacement for ``torch._utils._rebuild_parameter``: the tensor."""
    return data


_ALLOWED_TORCH_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedTorchUnpickler(pickle.Unpickler):
    """Unpickles a PyTorch state dict into ``_TensorRef`` values.

    Only allow-listed globals resolve (``OrderedDict``, the two tensor
    rebuild helpers, storage classes); anything else is refused, so a
    malicious checkpoint cannot run code.  ``load_storage(storage_type,
    key, numel)`` supplies the storage each persistent id names.
    """

    def __init__(self, handle: BinaryIO,
                 load_storage: Callable[[_StorageType, str, int], _Storage]
                 ) -> None:
        """Read from ``handle``; storages come from ``load_storage``."""
        super().__init__(handle)
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only allow-listed globals."""
        if (module, name) in _ALLOWED_TORCH_GLOBALS:
            return _ALLOWED_TORCH_GLOBALS[(module, name)]
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(name, _TORCH_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(
            f"refusing global {module}.{name} (not needed for a BERT state "
            "dict)")

    def persistent_load(self, pid: Any) -> _Storage:
        """``('storage', type, key, location, numel[, view])`` -> storage."""
        if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        return self._load_storage(pid[1], str(pid[2]), int(pid[4]))


def _zip_root(archive: zipfile.ZipFile, path: str) -> str:
    """Folder prefix of ``data.pkl`` inside a torch zip checkpoint."""
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if len(pickles) != 1:
        raise ConversionError(f"{path}: expected one data.pkl in the archive, "
                              f"found {len(pickles)}")
    return pickles[0][: -len("data.pkl")]


def _load_torch_zip(path: str) -> Any:
    """Unpickle a zip-format (PyTorch >= 1.6) checkpoint."""
    with zipfile.ZipFile(path) as archive:
        root = _zip_root(archive, path)
        names = set(archive.namelist())
        byteorder = "little"
        if root + "byteorder" in names:
            byteorder = archive.read(root + "byteorder").decode().strip()
        storages: dict[str, _Storage] = {}

        def load_storage(kind: _StorageType, key: str, numel: int) -> _Storage:
            if key not in storages:
                member = f"{root}data/{key}"
                if member not in names:
                    raise ConversionError(f"{path}: missing storage {member}")
                storages[key] = _Storage(kind, numel)
                storages[key].fill(archive.read(member), byteorder)
            return storages[key]

        with archive.open(root + "data.pkl") as handle:
            return _RestrictedTorchUnpickler(
                io.BytesIO(handle.read()), load_storage).load()


def _load_torch_legacy(path: str) -> Any:
    """Unpickle a legacy (pre-zip) checkpoint: magic, protocol, system info,
    the object, the storage keys, then each storage's bytes in that order,
    each preceded by its int64 element count."""
    with open(path, "rb") as handle:
        def plain_load() -> Any:
            return _RestrictedTorchUnpickler(handle, _no_storage).load()

        if plain_load() != _LEGACY_TORCH_MAGIC:
            raise ConversionError(f"{path}: not a PyTorch checkpoint")
        plain_load()  # protocol version
        plain_load()  # system info
        storages: dict[str, _Storage] = {}

        def load_storage(kind: _StorageType, key: str, numel: int) -> _Storage:
            return storages.setdefault(key, _Storage(kind, numel))

        result = _RestrictedTorchUnpickler(handle, load_storage).load()
        for key in plain_load():
            storage = storages[str(key)]
            (numel,) = struct.unpack("<q", handle.read(8))
            if numel != storage.numel:
                raise ConversionError(f"{path}: storage {key} has {numel} "
                                      f"elements, expected {storage.numel}")
            storage.fill(handle.read(numel * storage.storage_type.dtype.itemsize),
                         "little")
        return result


def _no_storage(kind: _StorageType, key: str, numel: int) -> _Storage:
    """Storage loader for pickles that must not reference storages."""
    raise pickle.UnpicklingError("unexpected storage reference")


def read_torch_bin(path: str) -> dict[str, np.ndarray]:
    """Tensors of a ``pytorch_model.bin`` state dict, without PyTorch.

    Handles the zip format (PyTorch >= 1.6) and the legacy format.

    Raises:
      ConversionError: the file is not a plain state dict of tensors, uses
        a global outside the allow-list, or is otherwise unreadable; the
        message says how to get a readable file instead.
    """
    try:
        if zipfile.is_zipfile(path):
            state = _load_torch_zip(path)
        else:
            state = _load_torch_legacy(path)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError,
            AttributeError, IndexError, struct.error,
            zipfile.BadZipFile) as err:
        message = " ".join(str(err).split())
        raise ConversionError(f"{path}: cannot read this PyTorch checkpoint "
                              f"without PyTorch ({message}); {_TORCH_HINT}") from err
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: holds a {type(state).__name__}, not a "
                              f"state dict; {_TORCH_HINT}")
    return {str(name): value.to_numpy() for name, value in state.items()
            if isinstance(value, _TensorRef)}


# --- Hugging Face names and config ---------------------------------------

_HF_CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps",
    "initializer_range": "initializer_range",
}
_HF_LAYER_NORM_LEAVES = {"weight": "gamma", "bias": "beta",
                         "gamma": "gamma", "beta": "beta"}
_HF_DENSE_LEAVES = {"weight": "kernel", "bias": "bias"}


def bert_config_from_hf(data: Mapping[str, Any]) -> BertConfig:
    """A ``BertConfig`` from a Hugging Face ``config.json`` dict.

    Keys this encoder does not need (dropout, ids, architectures, ...) are
    ignored; settings it cannot reproduce are an error.
    """
    model_type = data.get("model_type", "bert")
    if model_type != "bert":
        raise ConversionError(f"config.json model_type is {model_type!r}; "
                              "only 'bert' is supported")
    if data.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"hidden_act {data['hidden_act']!r} is not "
                              "supported; only exact 'gelu'")
    if data.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError("only absolute position embeddings are "
                              "supported")
    kwargs = {ours: data[theirs] for theirs, ours in _HF_CONFIG_FIELDS.items()
              if theirs in data}
    if "vocab_size" not in kwargs:
        raise ConversionError("config.json is missing 'vocab_size'")
    try:
        return BertConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConversionError(f"config.json: {err}") from err


def _hf_path_to_google(path: Sequence[str]) -> list[str]:
    """``['encoder', 'layer', '3', 'output']`` -> ``['encoder', 'layer_3',
    'output']``."""
    out: list[str] = []
    index = 0
    while index < len(path):
        if (path[index] == "layer" and index + 1 < len(path)
                and path[index + 1].isdigit()):
            out.append(f"layer_{path[index + 1]}")
            index += 2
        else:
            out.append(path[index])
            index += 1
    return out


def hf_to_google_name(name: str) -> Optional[str]:
    """Google checkpoint name of a Hugging Face BERT parameter, or None for
    parameters outside the encoder (heads, buffers such as position_ids).

    ``bert.encoder.layer.0.attention.self.query.weight`` ->
    ``bert/encoder/layer_0/attention/self/query/kernel``; the ``bert.``
    prefix is optional.  Kernels must also be transposed (see
    ``needs_transpose``).
    """
    parts = name.split(".")
    if parts[0] == "bert":
        parts = parts[1:]
    if len(parts) < 2 or parts[0] not in ("embeddings", "encoder", "pooler"):
        return None
    path, leaf = _hf_path_to_google(parts[:-1]), parts[-1]
    if path[-1] == "LayerNorm":
        mapped = _HF_LAYER_NORM_LEAVES.get(leaf)
    elif path[-1].endswith("_embeddings"):
        return "bert/" + "/".join(path) if leaf == "weight" else None
    else:
        mapped = _HF_DENSE_LEAVES.get(leaf)
    return None if mapped is None else "bert/" + "/".join(path + [mapped])


def needs_transpose(google_name: str) -> bool:
    """HF ``nn.Linear`` weights are [out, in]; Google kernels are [in, out]."""
    return google_name.endswith("/kernel")


def hf_to_google_weights(tensors: Mapping[str, np.ndarray]
                         ) -> dict[str, np.ndarray]:
    """Rename (and transpose) the encoder's HF tensors to Google names.

    Unmapped tensors are dropped.  A name present both with and without the
    ``bert.`` prefix is an error rather than a silent choice.
    """
    weights: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    for name, value in tensors.items():
        google = hf_to_google_name(name)
        if google is None:
            continue
        if google in weights:
            raise ConversionError(f"{sources[google]} and {name} both map to "
                                  f"{google}")
        sources[google] = name
        weights[google] = value.T if needs_transpose(google) else value
    return weights


# --- reading whole sources -----------------------------------------------


@dataclasses.dataclass
class Checkpoint:
    """An encoder read from a source directory, ready for export."""
    layout: str
    config: BertConfig
    weights: dict[str, np.ndarray]
    vocab_path: str
    do_lower_case_hint: Optional[bool] = None


def _has_google_checkpoint(source: str) -> bool:
    """Whether ``source`` holds a TF checkpoint index file."""
    return bool(glob.glob(os.path.join(glob.escape(source), "*.index")))


def _hf_weight_files(source: str) -> list[str]:
    """The weight files of an HF directory: safetensors before .bin, a
    sharded set (``*.index.json``) before a single file."""
    for single in (SAFETENSORS_FILE, TORCH_FILE):
        index_path = os.path.join(source, single + _INDEX_SUFFIX)
        if os.path.exists(index_path):
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index_path} has no weight_map")
            shards = sorted(set(weight_map.values()))
            return [os.path.join(source, shard) for shard in shards]
        if os.path.exists(os.path.join(source, single)):
            return [os.path.join(source, single)]
    return []


def detect_layout(source: str) -> str:
    """``google`` or ``huggingface``, from the files in ``source``."""
    if not os.path.isdir(source):
        raise ConversionError(f"{source} is not a directory")
    if (os.path.exists(os.path.join(source, GOOGLE_CONFIG))
            and _has_google_checkpoint(source)):
        return GOOGLE
    if (os.path.exists(os.path.join(source, HF_CONFIG))
            and _hf_weight_files(source)):
        return HUGGINGFACE
    raise ConversionError(
        f"{source} holds neither a Google BERT checkpoint ({GOOGLE_CONFIG} + "
        f"*.ckpt.index) nor Hugging Face BERT weights ({HF_CONFIG} + "
        f"{SAFETENSORS_FILE} or {TORCH_FILE}); found: "
        f"{', '.join(sorted(os.listdir(source))) or 'nothing'}")


def _google_checkpoint_prefix(source: str) -> str:
    """The checkpoint prefix in ``source`` (``bert_model.ckpt`` preferred)."""
    indexes = sorted(glob.glob(os.path.join(glob.escape(source), "*.index")))
    prefixes = [path[: -len(".index")] for path in indexes]
    preferred = os.path.join(source, "bert_model.ckpt")
    if preferred in prefixes:
        return preferred
    if len(prefixes) == 1:
        return prefixes[0]
    raise ConversionError(f"{source}: several checkpoints "
                          f"({', '.join(os.path.basename(p) for p in prefixes)})"
                          "; keep only one")


def _read_json(path: str) -> dict[str, Any]:
    """A JSON object from ``path``, as a one-line error if malformed."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return data


def read_google_checkpoint(source: str) -> Checkpoint:
    """Config and encoder weights of a Google BERT checkpoint directory.

    Variables outside the encoder (``cls/...``, ``global_step``, Adam
    slots) are ignored; missing encoder variables are an error.
    """
    import tensorflow as tf
    try:
        config = BertConfig.from_dict(_read_json(os.path.join(source,
                                                              GOOGLE_CONFIG)))
    except ValueError as err:
        raise ConversionError(f"{GOOGLE_CONFIG}: {err}") from err
    prefix = _google_checkpoint_prefix(source)
    try:
        reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    except (tf.errors.OpError, ValueError) as err:
        raise ConversionError(f"cannot read checkpoint {prefix}: "
                              f"{' '.join(str(err).split())}") from err
    expected = bert_weight_shapes(config)
    _check_missing([n for n in expected if not reader.has_tensor(n)], prefix)
    weights = {name: np.asarray(reader.get_tensor(name)) for name in expected}
    return Checkpoint(GOOGLE, config, weights, os.path.join(source, VOCAB_FILE))


def _read_hf_tensors(files: Sequence[str],
                     keep: Callable[[str], bool]) -> dict[str, np.ndarray]:
    """Encoder tensors from every HF weight file (safetensors or .bin)."""
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        if path.endswith(".safetensors"):
            tensors.update(read_safetensors(path, keep))
        else:
            tensors.update({k: v for k, v in read_torch_bin(path).items()
                            if keep(k)})
    return tensors


def read_huggingface(source: str) -> Checkpoint:
    """Config and encoder weights of a Hugging Face BERT directory."""
    config = bert_config_from_hf(_read_json(os.path.join(source, HF_CONFIG)))
    files = _hf_weight_files(source)
    tensors = _read_hf_tensors(files, lambda n: hf_to_google_name(n) is not None)
    weights = hf_to_google_weights(tensors)
    expected = bert_weight_shapes(config)
    _check_missing([n for n in expected if n not in weights],
                   ", ".join(os.path.basename(f) for f in files))
    hint = None
    tokenizer_config = os.path.join(source, HF_TOKENIZER_CONFIG)
    if os.path.exists(tokenizer_config):
        value = _read_json(tokenizer_config).get("do_lower_case")
        hint = value if isinstance(value, bool) else None
    return Checkpoint(HUGGINGFACE, config,
                      {n: weights[n] for n in expected},
                      os.path.join(source, VOCAB_FILE), hint)


def _check_missing(missing: Sequence[str], where: str) -> None:
    """Raise naming the encoder weights that ``where`` lacks."""
    if missing:
        shown = ", ".join(missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise ConversionError(f"{where} lacks {len(missing)} encoder weights: "
                              f"{shown}{more}")


def check_shapes(weights: Mapping[str, np.ndarray], config: BertConfig) -> None:
    """Raise naming every weight whose shape disagrees with the config."""
    bad = [f"{name} {list(np.shape(weights[name]))} (config: {list(shape)})"
           for name, shape in bert_weight_shapes(config).items()
           if tuple(np.shape(weights[name])) != shape]
    if bad:
        raise ConversionError("weights do not match the config: "
                              + "; ".join(bad))


def read_checkpoint(source: str, layout: str = "auto") -> Checkpoint:
    """Read ``source`` in the given or detected layout, shapes checked."""
    layout = detect_layout(source) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown layout {layout!r}")
    checkpoint = (read_google_checkpoint(source) if layout == GOOGLE
                  else read_huggingface(source))
    checkpoint.weights = {k: np.asarray(v, dtype=np.float32)
                          for k, v in checkpoint.weights.items()}
    check_shapes(checkpoint.weights, checkpoint.config)
    return checkpoint


# --- vocabulary and lower-casing -----------------------------------------


def _read_vocab(path: str) -> list[str]:
    """Vocab tokens, one per line (trailing newline/CR removed)."""
    if not os.path.exists(path):
        raise ConversionError(f"no vocabulary at {path}: pass --vocab_file")
    with open(path, encoding="utf-8") as handle:
        return [line.rstrip("\r\n") for line in handle]


def _has_cased_entries(vocab: Sequence[str]) -> bool:
    """Whether any non-special token contains an upper-case letter."""
    return any(any(c.isupper() for c in token) for token in vocab
               if not (token.startswith("[") and token.endswith("]")))


def choose_do_lower_case(vocab: Sequence[str], flag: Optional[bool],
                         hint: Optional[bool]) -> tuple[bool, str]:
    """The ``do_lower_case`` to store, and why.

    An explicit flag wins.  A vocabulary without upper-case entries can only
    be used on lower-cased text (upper-case letters would all become
    ``[UNK]``), so it gets True, as TF Hub's Chinese BERT has; Hugging
    Face's ``bert-base-chinese`` says False in its tokenizer config but has
    such a vocabulary.  Otherwise the checkpoint's own setting, else False.
    """
    if flag is not None:
        return flag, "given by --do_lower_case"
    if not _has_cased_entries(vocab):
        note = "" if hint is not False else (
            " (overriding tokenizer_config.json's false)")
        return True, "the vocabulary has no upper-case entries" + note
    if hint is not None:
        return hint, "from tokenizer_config.json"
    return False, "the vocabulary is cased"


# --- conversion ----------------------------------------------------------


def convert_checkpoint(source: str, output: str,
                       do_lower_case: Optional[bool] = None,
                       vocab_file: Optional[str] = None,
                       layout: str = "auto") -> str:
    """Convert the checkpoint in ``source`` into a SavedModel at ``output``.

    Returns the absolute output path.  Raises ``ConversionError`` (one-line
    message) for unreadable or incomplete sources and ``FileExistsError``
    if ``output`` exists.
    """
    from model.export import export_bert_saved_model
    if os.path.exists(output):
        raise FileExistsError(f"output already exists: {output}")
    checkpoint = read_checkpoint(source, layout)
    vocab_path = vocab_file or checkpoint.vocab_path
    vocab = _read_vocab(vocab_path)
    rows = checkpoint.config.vocab_size
    if len(vocab) != rows:
        raise ConversionError(f"{vocab_path} has {len(vocab)} entries but the "
                              f"word-embedding table has {rows} rows")
    lower, reason = choose_do_lower_case(vocab, do_lower_case,
                                         checkpoint.do_lower_case_hint)
    _LOG.info("Converting %s checkpoint %s (%d layers, hidden %d); "
              "do_lower_case=%s: %s", checkpoint.layout, source,
              checkpoint.config.num_layers, checkpoint.config.hidden_size,
              lower, reason)
    path = export_bert_saved_model(output, checkpoint.config, vocab_path,
                                   do_lower_case=lower,
                                   weights=checkpoint.weights)
    _LOG.info("Wrote %s", path)
    return path


def _parse_bool(value: str) -> bool:
    """``true``/``false`` (any case) for ``--do_lower_case``."""
    lowered = value.lower()
    if lowered not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return lowered == "true"


def build_arg_parser() -> argparse.ArgumentParser:
    """Flags of ``python -m model.convert``."""
    parser = argparse.ArgumentParser(
        prog="python -m model.convert",
        description="Convert a Google TF or Hugging Face BERT checkpoint "
                    "into a TF Hub-compatible SavedModel.")
    parser.add_argument("--source", required=True,
                        help="checkpoint directory (layout auto-detected)")
    parser.add_argument("--output", required=True,
                        help="SavedModel directory to create (must not exist)")
    parser.add_argument("--do_lower_case", type=_parse_bool, default=None,
                        help="true|false; default: from the vocabulary and "
                             "the checkpoint")
    parser.add_argument("--vocab_file", default=None,
                        help="vocabulary to use instead of SOURCE/vocab.txt")
    parser.add_argument("--layout", choices=("auto",) + LAYOUTS,
                        default="auto", help="source layout (default: auto)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: 0 on success, 2 with a one-line error otherwise."""
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        path = convert_checkpoint(args.source, args.output,
                                  args.do_lower_case, args.vocab_file,
                                  args.layout)
    except (ConversionError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
