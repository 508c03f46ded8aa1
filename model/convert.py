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
ignored; missing encoder weights are an error that names them.  Every
tensor's shape is checked against the config, and its bytes against the
file, before it is read, so a corrupt or crafted file is a one-line
``ConversionError`` (exit status 2), never a huge allocation.

``do_lower_case`` is taken from the vocabulary unless given: an uncased
one (no upper-case word pieces that text can produce) gets True, a cased
one the checkpoint's setting or False; the log line says which and why.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import glob
import io
import json
import logging
import math
import os
import pickle
import struct
import sys
import zipfile
from typing import Any, BinaryIO, Callable, Mapping, Optional, Sequence

import numpy as np

from model import console
from model.bert import BertConfig, bert_weight_shapes
from model.errors import one_line
from model.vocab import VOCAB_FILENAME, load_vocab
from transforms.tokenization import (is_cjk_char, is_control,
                                     is_punctuation, is_whitespace)

_LOG = logging.getLogger(__name__)

GOOGLE = "google"
HUGGINGFACE = "huggingface"
LAYOUTS = (GOOGLE, HUGGINGFACE)

GOOGLE_CONFIG = "bert_config.json"
HF_CONFIG = "config.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
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


ShapeCheck = Callable[[str, tuple[int, ...]], None]
"""``check(name, shape)`` raises ``ConversionError`` if a tensor of that
shape must not be read (the readers call it before reading any data)."""


def _element_count(shape: Sequence[int]) -> int:
    """Elements of ``shape``, in Python ints (no int64 overflow)."""
    return math.prod(shape)


def _is_size(value: Any) -> bool:
    """Whether ``value`` is a non-negative int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclasses.dataclass(frozen=True)
class _SafetensorSpan:
    """Where one tensor of a safetensors file lies, validated."""
    code: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _safetensor_span(name: str, entry: Any, data_size: int) -> _SafetensorSpan:
    """The validated header entry of tensor ``name``: a known dtype, a shape
    of non-negative ints whose byte count is exactly its data range, and a
    data range inside the file's ``data_size`` bytes of data."""
    if not isinstance(entry, dict):
        raise ConversionError(f"bad header entry for {name}")
    code, shape, offsets = (entry.get("dtype"), entry.get("shape"),
                            entry.get("data_offsets"))
    dtype = _SAFETENSORS_DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise ConversionError(f"tensor {name} has unsupported dtype {code!r}")
    if not isinstance(shape, list) or not all(_is_size(n) for n in shape):
        raise ConversionError(f"tensor {name} has a bad shape {shape!r:.80}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_size(x) for x in offsets)):
        raise ConversionError(f"tensor {name} has bad data_offsets "
                              f"{offsets!r:.80}")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise ConversionError(f"tensor {name} lies outside the file")
    needed = _element_count(shape) * dtype.itemsize
    if end - begin != needed:
        raise ConversionError(
            f"tensor {name} has {end - begin} bytes, but shape {shape} of "
            f"{code} needs {needed}")
    return _SafetensorSpan(code, dtype, tuple(shape), begin, end)


def _decode_safetensor(span: _SafetensorSpan, raw: bytes) -> np.ndarray:
    """One tensor from its validated span and raw little-endian bytes."""
    array = np.frombuffer(raw, dtype=span.dtype).reshape(span.shape)
    if span.code == "BF16":
        return bfloat16_to_float32(array)
    return array.astype(span.dtype.newbyteorder("="), copy=True)


def read_safetensors(path: str, keep: Optional[Callable[[str], bool]] = None,
                     check_shape: Optional[ShapeCheck] = None
                     ) -> dict[str, np.ndarray]:
    """Tensors of a ``.safetensors`` file as NumPy arrays.

    Format: 8-byte little-endian header length, a JSON header mapping each
    name to ``dtype``, ``shape`` and ``data_offsets`` (relative to the end
    of the header), then the raw little-endian data.  BF16 becomes float32.
    Only tensors for which ``keep(name)`` is true are read, and each only
    after its header entry has been checked (and passed ``check_shape``),
    so a crafted header cannot make it read or allocate more than the file
    holds.
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
                span = _safetensor_span(name, entry, size - data_start)
                if check_shape is not None:
                    check_shape(name, span.shape)
            except ConversionError as err:
                raise ConversionError(f"{path}: {err}") from err
            handle.seek(data_start + span.begin)
            tensors[name] = _decode_safetensor(
                span, handle.read(span.end - span.begin))
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
    """One PyTorch storage: ``numel`` elements whose bytes are read (once)
    only when a tensor that passed every check needs them."""

    def __init__(self, storage_type: _StorageType, numel: int,
                 read: Callable[[], bytes], byteorder: str = "little") -> None:
        """A storage of ``numel`` elements whose raw bytes ``read()`` gives."""
        self.storage_type = storage_type
        self.numel = numel
        self._read = read
        self._byteorder = byteorder
        self._array: Optional[np.ndarray] = None

    @property
    def array(self) -> np.ndarray:
        """The contents as a flat array in native byte order."""
        if self._array is None:
            dtype = self.storage_type.dtype.newbyteorder(
                "<" if self._byteorder == "little" else ">")
            raw = self._read()
            if len(raw) != self.numel * dtype.itemsize:
                raise ConversionError(
                    f"storage holds {len(raw)} bytes, expected "
                    f"{self.numel} x {dtype.itemsize}")
            array = np.frombuffer(raw, dtype=dtype).astype(
                dtype.newbyteorder("="))
            if self.storage_type.name == "BFloat16Storage":
                array = bfloat16_to_float32(array)
            self._array = array
        return self._array


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """A tensor as a strided view of a storage, materialised after loading
    (legacy files store the bytes after the pickle that names them)."""
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def check(self) -> None:
        """Raise unless the view is well formed and lies inside its
        storage: no negative sizes, strides or offset, and no more elements
        than the storage holds (so a stride-0 view cannot blow a small
        storage up to terabytes)."""
        if len(self.size) != len(self.stride):
            raise ConversionError(f"size {list(self.size)} and stride "
                                  f"{list(self.stride)} do not match")
        if min(self.size, default=0) < 0 or min(self.stride, default=0) < 0:
            raise ConversionError(f"negative size {list(self.size)} or stride "
                                  f"{list(self.stride)}")
        count = _element_count(self.size)
        if count == 0:
            return
        view = (f"view (size {list(self.size)}, stride {list(self.stride)}, "
                f"offset {self.offset})")
        if count > self.storage.numel:
            raise ConversionError(f"{view} has {count} elements, more than "
                                  f"its storage's {self.storage.numel}")
        last = self.offset + sum((n - 1) * s
                                 for n, s in zip(self.size, self.stride))
        if self.offset < 0 or last >= self.storage.numel:
            raise ConversionError(f"{view} lies outside its storage of "
                                  f"{self.storage.numel} elements")

    def to_numpy(self) -> np.ndarray:
        """Copy the view out as a C-contiguous array, bounds-checked."""
        self.check()
        flat = self.storage.array
        if _element_count(self.size) == 0:
            return np.zeros(self.size, flat.dtype)
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
        numel = int(pid[4])
        if numel < 0:
            raise ConversionError(f"storage {pid[2]!s:.40} has {numel} elements")
        return self._load_storage(pid[1], str(pid[2]), numel)


def _zip_root(archive: zipfile.ZipFile) -> str:
    """Folder prefix of ``data.pkl`` inside a torch zip checkpoint."""
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if len(pickles) != 1:
        raise ConversionError(f"expected one data.pkl in the archive, found "
                              f"{len(pickles)}")
    return pickles[0][: -len("data.pkl")]


# A storage member of a zip checkpoint may expand at most this much when
# decompressed (PyTorch stores members uncompressed; weights barely
# compress), beyond a small allowance for all-zero tensors: a guard
# against a tiny file that inflates to terabytes.
_MAX_INFLATION = 20
_INFLATION_ALLOWANCE = 1 << 20


def _check_inflation(info: zipfile.ZipInfo) -> None:
    """Raise if an archive member would inflate beyond reason."""
    if (info.compress_type != zipfile.ZIP_STORED and info.file_size
            > _MAX_INFLATION * info.compress_size + _INFLATION_ALLOWANCE):
        raise ConversionError(f"{info.filename} inflates from "
                              f"{info.compress_size} to {info.file_size} bytes")


def _check_storage_member(info: zipfile.ZipInfo, numel: int,
                          itemsize: int) -> None:
    """Raise unless the archive member holds exactly ``numel`` elements
    and does not inflate beyond reason."""
    if info.file_size != numel * itemsize:
        raise ConversionError(f"{info.filename} holds {info.file_size} bytes, "
                              f"but its storage has {numel} x {itemsize}")
    _check_inflation(info)


def _load_torch_zip(archive: zipfile.ZipFile) -> Any:
    """Unpickle a zip-format (PyTorch >= 1.6) checkpoint; storages read
    from ``archive`` on demand."""
    root = _zip_root(archive)
    names = set(archive.namelist())
    byteorder = "little"
    if root + "byteorder" in names:
        byteorder = archive.read(root + "byteorder").decode().strip()
    storages: dict[str, _Storage] = {}

    def load_storage(kind: _StorageType, key: str, numel: int) -> _Storage:
        if key not in storages:
            member = f"{root}data/{key}"
            if member not in names:
                raise ConversionError(f"missing storage {member}")
            _check_storage_member(archive.getinfo(member), numel,
                                  kind.dtype.itemsize)
            storages[key] = _Storage(kind, numel,
                                     lambda: archive.read(member), byteorder)
        return storages[key]

    _check_inflation(archive.getinfo(root + "data.pkl"))
    with archive.open(root + "data.pkl") as handle:
        return _RestrictedTorchUnpickler(
            io.BytesIO(handle.read()), load_storage).load()


def _load_torch_legacy(handle: BinaryIO, size: int) -> Any:
    """Unpickle a legacy (pre-zip) checkpoint of ``size`` bytes: magic,
    protocol, system info, the object, the storage keys, then each
    storage's bytes in that order, each preceded by its int64 element
    count.  Storages are located (and their sizes checked against the
    file) here, and read from ``handle`` on demand."""
    def plain_load() -> Any:
        return _RestrictedTorchUnpickler(handle, _no_storage).load()

    if plain_load() != _LEGACY_TORCH_MAGIC:
        raise ConversionError("not a PyTorch checkpoint")
    plain_load()  # protocol version
    plain_load()  # system info
    storages: dict[str, _Storage] = {}
    locations: dict[str, int] = {}

    def read_at(key: str, length: int) -> Callable[[], bytes]:
        def read() -> bytes:
            handle.seek(locations[key])
            return handle.read(length)
        return read

    def load_storage(kind: _StorageType, key: str, numel: int) -> _Storage:
        if key not in storages:
            storages[key] = _Storage(
                kind, numel, read_at(key, numel * kind.dtype.itemsize))
        return storages[key]

    result = _RestrictedTorchUnpickler(handle, load_storage).load()
    for key in plain_load():
        storage = storages.get(str(key))
        if storage is None:
            raise ConversionError(f"storage {key!s:.40} is not used")
        (numel,) = struct.unpack("<q", handle.read(8))
        length = numel * storage.storage_type.dtype.itemsize
        if numel != storage.numel:
            raise ConversionError(f"storage {key} has {numel} elements, "
                                  f"expected {storage.numel}")
        if handle.tell() + length > size:
            raise ConversionError(f"storage {key} ({length} bytes) runs past "
                                  "the end of the file")
        locations[str(key)] = handle.tell()
        handle.seek(length, os.SEEK_CUR)
    missing = sorted(set(storages) - set(locations))
    if missing:
        raise ConversionError(f"storage {missing[0]:.40} is not in the file")
    return result


def _no_storage(kind: _StorageType, key: str, numel: int) -> _Storage:
    """Storage loader for pickles that must not reference storages."""
    raise pickle.UnpicklingError("unexpected storage reference")


def read_torch_bin(path: str, keep: Optional[Callable[[str], bool]] = None,
                   check_shape: Optional[ShapeCheck] = None
                   ) -> dict[str, np.ndarray]:
    """Tensors of a ``pytorch_model.bin`` state dict, without PyTorch.

    Handles the zip format (PyTorch >= 1.6) and the legacy format.  Only
    tensors for which ``keep(name)`` is true are built, each only after its
    shape has passed ``check_shape`` and its view has been checked against
    its storage, and a storage is read only when such a tensor needs it:
    a crafted file cannot make this allocate more than the file holds.

    Raises:
      ConversionError: the file is not a plain state dict of tensors, uses
        a global outside the allow-list, holds a tensor that does not fit
        its storage or fails ``check_shape``, or is otherwise unreadable.
    """
    try:
        with contextlib.ExitStack() as stack:
            if zipfile.is_zipfile(path):
                state = _load_torch_zip(
                    stack.enter_context(zipfile.ZipFile(path)))
            else:
                handle = stack.enter_context(open(path, "rb"))
                state = _load_torch_legacy(handle, os.path.getsize(path))
            if not isinstance(state, dict):
                raise ConversionError(f"holds a {type(state).__name__}, not a "
                                      f"state dict; {_TORCH_HINT}")
            tensors = {}
            for name, value in state.items():
                name = str(name)
                if not isinstance(value, _TensorRef) or (
                        keep is not None and not keep(name)):
                    continue
                if check_shape is not None:
                    check_shape(name, value.size)
                try:
                    tensors[name] = value.to_numpy()
                except ConversionError as err:
                    raise ConversionError(f"tensor {name}: {err}") from err
            return tensors
    except ConversionError as err:
        raise ConversionError(f"{path}: {err}") from err
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError,
            AttributeError, IndexError, OverflowError, NotImplementedError,
            struct.error, zipfile.BadZipFile) as err:
        raise ConversionError(f"{path}: cannot read this PyTorch checkpoint "
                              f"without PyTorch ({one_line(err)}); "
                              f"{_TORCH_HINT}") from err


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
    slots) are ignored; missing encoder variables are an error.  Shapes
    and dtypes are checked against the config from the checkpoint's index
    before any tensor is read.
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
        shapes = reader.get_variable_to_shape_map()
        dtypes = reader.get_variable_to_dtype_map()
    except (tf.errors.OpError, ValueError) as err:
        raise ConversionError(f"cannot read checkpoint {prefix}: "
                              f"{one_line(err)}") from err
    expected = bert_weight_shapes(config)
    _check_missing([n for n in expected if n not in shapes], prefix)
    _check_shape_map({n: tuple(shapes[n]) for n in expected}, config, prefix)
    not_float = [f"{n} ({dtypes[n].name})" for n in expected
                 if not dtypes[n].is_floating]
    if not_float:
        raise ConversionError(f"{prefix}: encoder weights must be floating "
                              f"point: {', '.join(not_float[:5])}")
    weights = {}
    for name in expected:
        try:
            weights[name] = np.asarray(reader.get_tensor(name))
        except (tf.errors.OpError, ValueError, IndexError) as err:
            raise ConversionError(f"cannot read {name} from {prefix}: "
                                  f"{one_line(err)}") from err
    return Checkpoint(GOOGLE, config, weights, os.path.join(source, VOCAB_FILENAME))


def _read_hf_tensors(files: Sequence[str], keep: Callable[[str], bool],
                     check_shape: ShapeCheck) -> dict[str, np.ndarray]:
    """Encoder tensors from every HF weight file (safetensors or .bin)."""
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        reader = (read_safetensors if path.endswith(".safetensors")
                  else read_torch_bin)
        tensors.update(reader(path, keep, check_shape))
    return tensors


def _hf_shape_check(expected: Mapping[str, tuple[int, ...]]) -> ShapeCheck:
    """``check_shape`` for the readers: an HF encoder tensor must have the
    shape the config gives its Google name (transposed for kernels)."""
    def check(name: str, shape: tuple[int, ...]) -> None:
        google = hf_to_google_name(name)
        wanted = expected[google]
        if needs_transpose(google):
            wanted = wanted[::-1]
        if tuple(shape) != wanted:
            raise ConversionError(
                f"{name} has shape {list(shape)}, but the config needs "
                f"{list(wanted)} for {google}")
    return check


def read_huggingface(source: str) -> Checkpoint:
    """Config and encoder weights of a Hugging Face BERT directory; each
    tensor's shape is checked against the config before it is read, and
    tensors the config has no place for are not read at all."""
    config = bert_config_from_hf(_read_json(os.path.join(source, HF_CONFIG)))
    files = _hf_weight_files(source)
    expected = bert_weight_shapes(config)
    tensors = _read_hf_tensors(
        files, lambda n: hf_to_google_name(n) in expected,
        _hf_shape_check(expected))
    weights = hf_to_google_weights(tensors)
    _check_missing([n for n in expected if n not in weights],
                   ", ".join(os.path.basename(f) for f in files))
    hint = None
    tokenizer_config = os.path.join(source, HF_TOKENIZER_CONFIG)
    if os.path.exists(tokenizer_config):
        value = _read_json(tokenizer_config).get("do_lower_case")
        hint = value if isinstance(value, bool) else None
    return Checkpoint(HUGGINGFACE, config,
                      {n: weights[n] for n in expected},
                      os.path.join(source, VOCAB_FILENAME), hint)


def _check_missing(missing: Sequence[str], where: str) -> None:
    """Raise naming the encoder weights that ``where`` lacks."""
    if missing:
        shown = ", ".join(missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise ConversionError(f"{where} lacks {len(missing)} encoder weights: "
                              f"{shown}{more}")


def _check_shape_map(shapes: Mapping[str, tuple[int, ...]], config: BertConfig,
                     where: str = "") -> None:
    """Raise naming every weight (of ``where``) whose shape disagrees with
    the config."""
    bad = [f"{name} {list(shapes[name])} (config: {list(shape)})"
           for name, shape in bert_weight_shapes(config).items()
           if tuple(shapes[name]) != shape]
    if bad:
        raise ConversionError(f"{where + ': ' if where else ''}weights do not "
                              "match the config: " + "; ".join(bad))


def check_shapes(weights: Mapping[str, np.ndarray], config: BertConfig) -> None:
    """Raise naming every weight whose shape disagrees with the config."""
    _check_shape_map({n: np.shape(w) for n, w in weights.items()}, config)


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


# A vocabulary is taken as cased when at least this share of the word
# pieces with letters it can produce have an upper-case letter.  A cased
# BERT vocabulary (English or multilingual) has thousands of such pieces
# (``The``, ``London``, ``##A``); an uncased one has none, or a stray few
# that must not turn its whole corpus into ``[UNK]``s.
_CASED_SHARE = 0.01
_EXAMPLES = 3


def _producible(piece: str) -> bool:
    """Whether BERT's tokenizer can ever look ``piece`` up: a single
    character, or a run of characters that its basic tokenizer keeps
    together (no whitespace, control, punctuation or CJK ideograph, which it
    splits off or drops).  ``[PAD]``, ``<S>`` or ``<T>`` hold punctuation,
    so no text produces them, whatever their case."""
    if len(piece) == 1:
        return True
    return bool(piece) and not any(
        is_whitespace(c) or is_control(c) or is_punctuation(c)
        or is_cjk_char(c) for c in piece)


@dataclasses.dataclass(frozen=True)
class VocabCasing:
    """How many word pieces of a vocabulary carry case, and examples."""
    with_letters: int  # producible pieces with an upper- or lower-case letter
    upper: tuple[str, ...]  # producible pieces with an upper-case letter
    unproducible_upper: tuple[str, ...]  # upper-case entries never produced

    @property
    def is_cased(self) -> bool:
        """Whether the upper-case pieces are a real share of the vocabulary."""
        return bool(self.upper) and (
            len(self.upper) >= _CASED_SHARE * self.with_letters)


def vocab_casing(vocab: Sequence[str]) -> VocabCasing:
    """Count the vocabulary's cased word pieces (``##`` prefix removed)."""
    with_letters, upper, unproducible = 0, [], []
    for token in vocab:
        piece = token[2:] if token.startswith("##") and len(token) > 2 else token
        has_upper = any(c.isupper() for c in piece)
        if not _producible(piece):
            if has_upper:
                unproducible.append(token)
            continue
        if has_upper or any(c.islower() for c in piece):
            with_letters += 1
        if has_upper:
            upper.append(token)
    return VocabCasing(with_letters, tuple(upper), tuple(unproducible))


def _examples(tokens: Sequence[str]) -> str:
    """A few tokens for a log line: ``A, B, C`` (+ how many more)."""
    shown = ", ".join(tokens[:_EXAMPLES])
    more = len(tokens) - _EXAMPLES
    return shown + (f" and {more:,} more" if more > 0 else "")


def choose_do_lower_case(vocab: Sequence[str], flag: Optional[bool],
                         hint: Optional[bool]) -> tuple[bool, str]:
    """The ``do_lower_case`` to store, and why.

    An explicit flag wins.  An uncased vocabulary (see ``VocabCasing``) can
    only be used on lower-cased text: with ``do_lower_case=False`` every
    word with an upper-case letter would become ``[UNK]``.  So it gets
    True, as TF Hub's Chinese BERT has, even where Hugging Face's
    ``bert-base-chinese`` says false in ``tokenizer_config.json``.  Entries
    that no text can produce (``[CLS]``, ``<S>``, ``<T>`` in the Chinese
    vocabulary) do not count.  A cased vocabulary takes the checkpoint's
    own setting if it has one, else False.
    """
    if flag is not None:
        return flag, "given by --do_lower_case"
    casing = vocab_casing(vocab)
    # Whole words tell more than single letters (``The`` before ``A``).
    upper = sorted(casing.upper, key=lambda t: len(t.lstrip("#")) == 1)
    if not casing.is_cased:
        found = (f"only {len(casing.upper):,} of its {casing.with_letters:,} "
                 f"word pieces with letters have upper case "
                 f"({_examples(upper)})" if upper else
                 f"none of its {casing.with_letters:,} word pieces with "
                 "letters has upper case")
        markup = sorted(casing.unproducible_upper,
                        key=lambda t: t.startswith("["))  # <S> before [CLS]
        ignored = (f"; ignored: {_examples(markup)}, which no text produces"
                   if markup else "")
        note = (" (overriding tokenizer_config.json's false)"
                if hint is False else "")
        return True, f"the vocabulary is uncased: {found}{ignored}{note}"
    found = (f"{len(casing.upper):,} of its {casing.with_letters:,} word "
             f"pieces with letters have upper case ({_examples(upper)})")
    if hint is not None:
        return hint, f"from tokenizer_config.json (the vocabulary is cased: {found})"
    return False, f"the vocabulary is cased: {found}"


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
    if not os.path.exists(vocab_path):
        raise ConversionError(
            f"no vocabulary at {vocab_path}: pass --vocab_file")
    vocab = load_vocab(vocab_path)
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
    console.setup_logging(verbose=True)  # its INFO lines say what it does
    try:
        path = convert_checkpoint(args.source, args.output,
                                  args.do_lower_case, args.vocab_file,
                                  args.layout)
    except (ConversionError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
