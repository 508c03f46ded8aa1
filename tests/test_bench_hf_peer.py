"""The Hugging Face peer of ``bench.throughput`` computes what ours does.

Its speed is only comparable with ours if it runs the same model on the
same batches: the weights converted from our SavedModel must give our
outputs (within float32 rounding), its batches must obey our limits, and
its output must read back like ours.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from bench import hf_peer  # noqa: E402
from model.bert import BertConfig  # noqa: E402
from model.export import export_bert_saved_model  # noqa: E402
from model.load import load_bert_saved_model  # noqa: E402
from transforms.batch import cut_batches  # noqa: E402
from transforms.records import TokenizedDocument  # noqa: E402
from tests.conftest import random_padded_batch  # noqa: E402
from transforms.tokenization import BertWordPieceTokenizer  # noqa: E402

TINY = BertConfig(vocab_size=120, hidden_size=32, num_layers=2, num_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
VOCAB = ["[PAD]"] + [f"tok{i}" for i in range(1, 100)] + [
    "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(0x4E00 + i) for i in range(
        TINY.vocab_size - 104)]


def _batch(seed: int = 0):
    return random_padded_batch(TINY.vocab_size, [3, 17, 30], seed)


def _hf_outputs(model, batch):
    ids, mask, segments = (torch.from_numpy(a.astype(np.int64))
                           for a in batch)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask,
                    token_type_ids=segments)
    return out.pooler_output.numpy(), out.last_hidden_state.numpy()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf") / "tiny")
    export_bert_saved_model(path, TINY, VOCAB, seed=5)
    return path


def test_converted_weights_give_our_outputs(tiny_model):
    config, weights = hf_peer.saved_model_weights(tiny_model)
    assert config == TINY
    model = hf_peer.hf_model_from_weights(config, weights)
    batch = _batch()
    pooled, sequence = load_bert_saved_model(tiny_model)(*batch)
    hf_pooled, hf_sequence = _hf_outputs(model, batch)
    real = batch[1].astype(bool)
    assert np.abs(hf_pooled - pooled).max() < 1e-4
    assert np.abs(hf_sequence[real] - sequence[real]).max() < 1e-4
    # The outputs are far from trivial: another seed's model differs.
    other = dict(weights)
    key = "bert/encoder/layer_1/intermediate/dense/kernel"
    other[key] = np.random.default_rng(1).normal(
        0, 0.02, weights[key].shape).astype(np.float32)
    other_pooled, _ = _hf_outputs(hf_peer.hf_model_from_weights(config, other),
                                  batch)
    assert np.abs(other_pooled - pooled).max() > 1e-3


def test_every_weight_must_map(tiny_model):
    config, weights = hf_peer.saved_model_weights(tiny_model)
    names = [n for n, _ in hf_peer.hf_model_from_weights(
        config, weights).named_parameters()]
    missing = dict(weights)
    del missing["bert/pooler/dense/bias"]
    with pytest.raises(ValueError, match="pooler.dense.bias"):
        hf_peer.hf_state_dict(missing, names)
    extra = dict(weights, **{"bert/encoder/layer_9/output/dense/bias":
                             np.zeros(32, np.float32)})
    with pytest.raises(ValueError, match="layer_9"):
        hf_peer.hf_state_dict(extra, names)


@pytest.mark.parametrize("seed", range(5))
def test_batches_obey_our_limits(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 300, 400).tolist()
    ours = cut_batches([TokenizedDocument(str(i), np.zeros(n, np.int32),
                                          False)
                        for i, n in enumerate(lengths)], 32, 2048)
    theirs = hf_peer.length_sorted_batches(lengths, 32, 2048)
    assert [[lengths[i] for i in b] for b in theirs] == \
        [[d.num_tokens for d in b] for b in ours]


def test_embed_writes_what_our_loader_reads(tiny_model, tmp_path):
    from pipeline.read_embeddings import load_embeddings
    hf_dir = hf_peer.convert(tiny_model, str(tmp_path / "hf"))
    texts = ["一丁七", "", "万丈三上下丌不与丏" * 9, "丐丑"]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t},
                                         ensure_ascii=False) + "\n"
                              for i, t in enumerate(texts)), encoding="utf-8")
    prefix = str(tmp_path / "out" / "emb")
    (tmp_path / "out").mkdir()
    stats = hf_peer.embed(hf_dir, str(corpus), prefix, "float32", 16, 32,
                          2048)
    assert stats["documents"] == 3  # the empty text is skipped
    emb = load_embeddings(prefix + "-*-of-*.parquet")
    by_id = {i: k for k, i in enumerate(emb.ids)}
    assert sorted(by_id) == ["d0", "d2", "d3"]
    long_row = by_id["d2"]
    assert emb.num_tokens[long_row] == 16 and emb.truncated[long_row]
    assert emb.sequence_output[by_id["d0"]].shape == (5, TINY.hidden_size)
    # Our tokenizer and model give the same ids and vectors.
    encoded = BertWordPieceTokenizer(VOCAB).encode(texts[0], 16)
    ids = np.array([encoded.input_word_ids], np.int32)
    assert ids.shape == (1, 5) and 100 not in ids  # no [UNK]
    pooled, sequence = load_bert_saved_model(tiny_model)(
        ids, np.ones_like(ids), np.zeros_like(ids))
    np.testing.assert_allclose(emb.pooled_output[by_id["d0"]], pooled[0],
                               atol=1e-4)
    np.testing.assert_allclose(emb.sequence_output[by_id["d0"]], sequence[0],
                               atol=1e-4)
