"""The peer a user picks instead of our pipeline: Hugging Face ``BertModel``
on PyTorch, with the same weights, corpus, token budget and output.

    python -m bench.hf_peer convert --model SAVEDMODEL --output HF_DIR
    python -m bench.hf_peer embed --hf_model HF_DIR --corpus DOCS.jsonl \\
        --output PREFIX [--precision float32|bfloat16]

``convert`` reads the weights of a SavedModel exported by ``model/export.py``
(or converted by ``model/convert.py``, which exports through it), renames
them to ``transformers``' ``BertModel`` layout (``model.convert``'s name
map, run backwards) and saves the model and its tokenizer (the model's own
``vocab.txt``) with ``save_pretrained``, as a user would have them.

``embed`` is the user's script, timed end to end: load the model and the
tokenizer (``from_pretrained``), read the JSONL, tokenize (Hugging Face's
BERT tokenizer, on the same vocabulary and lower-casing as ours), sort the
documents by token length and cut batches with the same limits as ours
(most ``--batch_size`` documents and ``--max_tokens_per_batch`` padded
tokens), run the model under ``torch.inference_mode`` with as many torch
threads as usable cores (``--precision bfloat16`` casts the model with
``.to(torch.bfloat16)``), and write pooled and sequence outputs (real
tokens only) to one Parquet file in our schema's columns, so the
benchmark's loader reads it like ours.  It prints one JSON line with its
measurements.  It deliberately imports neither Beam nor TensorFlow (a user
of this script would not; they would add to its memory), which is why the
few lines of batching are its own rather than ``transforms.batch``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

import numpy as np

PRECISIONS = ("float32", "bfloat16")

# Rows are written as a row group once this many bytes are buffered (ours
# uses the same bound, see ``transforms.write``).
ROW_GROUP_BYTES = 32 << 20


# --- weights: our SavedModel -> transformers' BertModel ---------------------


def saved_model_weights(model_dir: str) -> tuple[Any, dict[str, np.ndarray]]:
    """``(BertConfig, weights by Google checkpoint name)`` of a SavedModel
    exported by ``model/export.py``; ``ValueError`` for any other model."""
    import tensorflow as tf
    from model.bert import CONFIG_FILENAME, BertConfig
    config_path = os.path.join(model_dir, "assets.extra", CONFIG_FILENAME)
    restored = tf.saved_model.load(model_dir)
    variables = getattr(getattr(restored, "encoder", None),
                        "weight_variables", None)
    if not os.path.exists(config_path) or variables is None:
        raise ValueError(f"{model_dir}: not a model exported by "
                         "model/export.py (or model/convert.py): the Hugging "
                         "Face peer cannot read its weights")
    with open(config_path, encoding="utf-8") as handle:
        config = BertConfig.from_json(handle.read())
    return config, {name: v.numpy() for name, v in variables.items()}


def hf_config(config: Any):
    """transformers' ``BertConfig`` for our ``model.bert.BertConfig``."""
    import transformers
    return transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps, hidden_act="gelu",
        initializer_range=config.initializer_range)


def hf_state_dict(weights: Mapping[str, np.ndarray],
                  parameter_names: Sequence[str]) -> dict[str, np.ndarray]:
    """The values of a ``BertModel``'s parameters from our weights.

    Each Hugging Face name is mapped by ``model.convert.hf_to_google_name``
    (the map our converter reads Hugging Face checkpoints with), kernels
    transposed.  Every parameter must be found and every one of our weights
    used, else ``ValueError`` names the ones left over.
    """
    from model.convert import hf_to_google_name, needs_transpose
    state: dict[str, np.ndarray] = {}
    unmapped = []
    for name in parameter_names:
        google = hf_to_google_name(name)
        if google is None or google not in weights:
            unmapped.append(name)
            continue
        value = np.asarray(weights[google], np.float32)
        state[name] = np.ascontiguousarray(
            value.T if needs_transpose(google) else value)
    used = {hf_to_google_name(name) for name in state}
    unused = sorted(set(weights) - used)
    if unmapped or unused:
        raise ValueError(f"weights do not map onto BertModel: parameters "
                         f"without a weight {unmapped}, weights without a "
                         f"parameter {unused}")
    return state


def hf_model_from_weights(config: Any, weights: Mapping[str, np.ndarray]):
    """A float32 ``BertModel`` (with pooler) carrying ``weights``."""
    import torch
    import transformers
    model = transformers.BertModel(hf_config(config), add_pooling_layer=True)
    names = [name for name, _ in model.named_parameters()]
    load_every_parameter(model, {
        k: torch.from_numpy(v)
        for k, v in hf_state_dict(weights, names).items()})
    return model.eval()


def load_every_parameter(model: Any, state: Mapping[str, Any]) -> None:
    """``model.load_state_dict(state)``; ``ValueError`` unless every
    parameter (buffers aside) took a value and every value a parameter."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    if set(missing) - buffers or unexpected:
        raise ValueError(f"BertModel did not take the weights: missing "
                         f"{sorted(set(missing) - buffers)}, unexpected "
                         f"{sorted(unexpected)}")


def hf_tokenizer(vocab_path: str, do_lower_case: bool):
    """transformers' BERT tokenizer on our vocabulary file."""
    from transformers import BertTokenizerFast
    from transformers.models.bert.tokenization_bert import load_vocab
    return BertTokenizerFast(vocab=load_vocab(vocab_path),
                             do_lower_case=do_lower_case)


def convert(model_dir: str, output: str) -> str:
    """Saves the SavedModel's weights and tokenizer as a Hugging Face model
    directory (written aside, renamed into place when complete)."""
    from model.vocab import read_tokenizer_settings
    config, weights = saved_model_weights(model_dir)
    model = hf_model_from_weights(config, weights)
    settings = read_tokenizer_settings(model_dir)
    staging = tempfile.mkdtemp(prefix=".hf-", dir=os.path.dirname(
        os.path.abspath(output)))
    try:
        model.save_pretrained(staging)
        hf_tokenizer(settings.vocab_path,
                     settings.do_lower_case).save_pretrained(staging)
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


# --- the user's script -------------------------------------------------------


def length_sorted_batches(lengths: Sequence[int], max_docs: int,
                          max_tokens: int) -> list[list[int]]:
    """Indices of documents sorted by length, cut into batches of at most
    ``max_docs`` documents and ``max_tokens`` padded tokens (documents x
    the batch's longest), the limits our pipeline batches with; a document
    longer than the budget on its own is a batch alone."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        width = lengths[index]  # sorted: the newest is the longest
        if current and (len(current) >= max_docs
                        or (len(current) + 1) * width > max_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def _encode(tokenizer, texts: Sequence[str], max_seq_length: int
            ) -> tuple[list[list[int]], list[bool]]:
    """``[CLS] ... [SEP]`` ids per text, cut to ``max_seq_length``, and
    whether each was cut."""
    pieces = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    keep = max_seq_length - 2
    return ([[cls] + p[:keep] + [sep] for p in pieces],
            [len(p) > keep for p in pieces])


class _ParquetRows:
    """Output rows in our Parquet schema's columns (id, num_tokens,
    truncated, pooled_output, sequence_output), a row group per
    ``ROW_GROUP_BYTES``."""

    def __init__(self, path: str, hidden: int):
        import pyarrow as pa
        import pyarrow.parquet as pq
        from transforms.embedding_files import (ID, NUM_TOKENS,
                                                POOLED_OUTPUT,
                                                SEQUENCE_OUTPUT, TRUNCATED)
        self._pa, self._hidden = pa, hidden
        vector = pa.list_(pa.float32(), hidden)
        self._schema = pa.schema([
            pa.field(ID, pa.string(), nullable=False),
            pa.field(NUM_TOKENS, pa.int32(), nullable=False),
            pa.field(TRUNCATED, pa.bool_(), nullable=False),
            pa.field(POOLED_OUTPUT, vector, nullable=False),
            pa.field(SEQUENCE_OUTPUT, pa.list_(vector), nullable=False)])
        self._writer = pq.ParquetWriter(path, self._schema)
        self._batches: list[Any] = []
        self._bytes = 0

    def add(self, ids: Sequence[str], lengths: np.ndarray,
            truncated: Sequence[bool], pooled: np.ndarray,
            sequence: np.ndarray) -> None:
        """One model batch: ``sequence`` is padded ``[n, width, hidden]``;
        each row keeps its real tokens only."""
        pa, hidden = self._pa, self._hidden
        tokens = np.concatenate([sequence[i, :n] for i, n in
                                 enumerate(lengths)])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        batch = pa.RecordBatch.from_arrays([
            pa.array(list(ids), pa.string()),
            pa.array(lengths.astype(np.int32)),
            pa.array(list(truncated), pa.bool_()),
            pa.FixedSizeListArray.from_arrays(
                pa.array(pooled.reshape(-1)), hidden),
            pa.ListArray.from_arrays(pa.array(offsets),
                                     pa.FixedSizeListArray.from_arrays(
                                         pa.array(tokens.reshape(-1)),
                                         hidden))], schema=self._schema)
        self._batches.append(batch)
        self._bytes += batch.nbytes
        if self._bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._batches:
            self._writer.write_table(
                self._pa.Table.from_batches(self._batches))
        self._batches, self._bytes = [], 0

    def close(self) -> None:
        self._flush()
        self._writer.close()


def peak_rss_mib() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def embed(hf_model: str, corpus: str, output: str, precision: str,
          max_seq_length: int, batch_size: int,
          max_tokens_per_batch: int) -> dict[str, Any]:
    """Runs the user's script once; returns its measurements."""
    started = time.perf_counter()
    import torch
    import transformers
    from model.runtime import usable_cores
    torch.set_num_threads(usable_cores())
    model = transformers.BertModel.from_pretrained(hf_model).eval()
    if precision == "bfloat16":
        model = model.to(torch.bfloat16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_model)
    loaded = time.perf_counter()
    ids, texts = [], []
    with open(corpus, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            ids.append(str(record["id"]))
            texts.append(record["text"])
    encoded, truncated = _encode(tokenizer, texts, max_seq_length)
    keep = [i for i, e in enumerate(encoded) if len(e) > 2]  # empty text
    lengths = [len(encoded[i]) for i in keep]
    from transforms.embedding_files import PARQUET_EXT, shard_name
    rows = _ParquetRows(output + shard_name(0, 1) + PARQUET_EXT,
                        model.config.hidden_size)
    model_seconds, computed = 0.0, 0
    for batch in length_sorted_batches(lengths, batch_size,
                                       max_tokens_per_batch):
        docs = [keep[i] for i in batch]
        batch_lengths = np.array([len(encoded[d]) for d in docs])
        width = int(batch_lengths.max())
        word_ids = np.zeros((len(docs), width), np.int64)
        for row, doc in enumerate(docs):
            word_ids[row, :batch_lengths[row]] = encoded[doc]
        mask = (np.arange(width)[None] < batch_lengths[:, None]).astype(
            np.int64)
        call = time.perf_counter()
        with torch.inference_mode():
            out = model(input_ids=torch.from_numpy(word_ids),
                        attention_mask=torch.from_numpy(mask),
                        token_type_ids=torch.zeros_like(
                            torch.from_numpy(word_ids)))
            pooled = out.pooler_output.float().numpy()
            sequence = out.last_hidden_state.float().numpy()
        model_seconds += time.perf_counter() - call
        computed += word_ids.size
        rows.add([ids[d] for d in docs], batch_lengths,
                 [truncated[d] for d in docs], pooled, sequence)
    rows.close()
    wall = time.perf_counter() - started
    return {"wall_s": wall, "load_s": loaded - started,
            "model_s": model_seconds, "documents": len(keep),
            "rows": len(keep), "tokens_real": int(sum(lengths)),
            "tokens_computed": computed, "peak_rss_mib": peak_rss_mib(),
            "engine": "torch", "precision": precision,
            "torch": torch.__version__,
            "transformers": transformers.__version__}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("convert", help="SavedModel -> HF model dir")
    to_hf.add_argument("--model", required=True)
    to_hf.add_argument("--output", required=True)
    run = commands.add_parser("embed", help="the user's script, timed")
    run.add_argument("--hf_model", required=True)
    run.add_argument("--corpus", required=True)
    run.add_argument("--output", required=True, help="output prefix")
    run.add_argument("--precision", choices=PRECISIONS, default="float32")
    run.add_argument("--max_seq_length", type=int, default=128)
    run.add_argument("--batch_size", type=int, default=32)
    run.add_argument("--max_tokens_per_batch", type=int, default=2048)
    args = parser.parse_args(argv)
    if args.command == "convert":
        print(json.dumps({"hf_model": convert(args.model, args.output)}))
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    print(json.dumps(embed(args.hf_model, args.corpus, args.output,
                           args.precision, args.max_seq_length,
                           args.batch_size, args.max_tokens_per_batch)))


if __name__ == "__main__":
    sys.exit(main())
