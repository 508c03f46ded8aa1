"""The model fingerprint: what produced a run's vectors, as one hash.

Two runs whose fingerprints are equal turn the same text into the same
vectors, so an incremental run may keep a previous row only when its
fingerprint equals this run's.  The hash covers the SavedModel's variables
(``variables/variables.index`` and every data shard, streamed), the
vocabulary file's content, and the settings that change token ids or model
inputs: ``do_lower_case``, ``max_seq_length``, ``long_text``, the chunk
stride and the arithmetic precision, and those that change the vector
written as ``pooled_output``: ``--pooling`` and ``--normalize``.  These two
enter the hash only when they differ from the defaults (``cls``, not
normalized), so runs made before they existed keep their fingerprints.
The model's graph is not hashed: two exports of the same weights with the
same interface give the same vectors.

Hashing BERT-Base's 400 MB of variables takes about a second; the result is
cached per process by file paths, sizes and modification times
(``model.files.hash_files``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from model.files import hash_files, variables_files


def model_fingerprint(model_dir: str, vocab_path: str, do_lower_case: bool,
                      max_seq_length: int, long_text: str = "truncate",
                      chunk_stride: Optional[int] = None,
                      precision: str = "float32", pooling: str = "cls",
                      normalize: bool = False) -> str:
    """32 hex digits identifying the model, vocabulary, token settings and
    pooling.

    ``chunk_stride`` is the effective stride (``None`` when not chunking).
    """
    fields: dict[str, Any] = {
        "do_lower_case": bool(do_lower_case),
        "max_seq_length": int(max_seq_length), "long_text": long_text,
        "chunk_stride": chunk_stride if long_text == "chunk" else None,
        "precision": precision}
    if pooling != "cls" or normalize:
        fields.update(pooling=pooling, normalize=bool(normalize))
    settings = json.dumps(fields, sort_keys=True)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(settings.encode("utf-8"))
    digest.update(hash_files(variables_files(model_dir)).encode("ascii"))
    digest.update(hash_files([vocab_path], with_names=False).encode("ascii"))
    return digest.hexdigest()


def precision_key(precision: str, model_dir: str,
                  int8_model: Optional[str] = None) -> str:
    """The precision as a model fingerprint records it: ``int8`` names the
    digest of its quantized model (``model.openvino_engine``), which the
    vectors depend on; raises that module's error when there is none."""
    if precision != "int8":
        return precision
    from model import openvino_engine
    path = openvino_engine.find_int8_model(model_dir, int8_model)
    return f"int8:{openvino_engine.int8_digest(path)}"


def settings_fingerprint(model_path: str, vocab_path: str,
                         do_lower_case: bool, tokenize: Any,
                         infer: Any) -> str:
    """``model_fingerprint`` of the vectors a run makes with these stage
    settings (``tokenize`` a ``transforms.tokenize.TokenizeSettings``,
    ``infer`` a ``transforms.infer.InferSettings``); ``model_path`` is the
    model's resolved directory.  The launcher and ``pipeline.embed`` both
    compute it so, and must agree."""
    return model_fingerprint(
        model_path, vocab_path, do_lower_case, tokenize.max_seq_length,
        tokenize.long_text, tokenize.effective_stride,
        precision_key(infer.precision, model_path, infer.int8_model),
        infer.pooling, infer.normalize)
