"""Shared fixtures: a tiny BERT SavedModel and small corpora, built on the fly.

Nothing is downloaded: the model has random weights in a tiny shape and a
vocabulary made from the characters the test documents use.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Caches (the demo model, XLA executables) go to a directory of this test
# session, never the user's: tests must not depend on earlier runs.
# (Subprocesses of the tests, and a second import of this module, inherit
# the session's directory.)
_TEST_CACHE_PREFIX = os.path.join(tempfile.gettempdir(),
                                  "bert_zh_embed_test_cache_")
if not os.environ.get("BERT_ZH_EMBED_CACHE", "").startswith(
        _TEST_CACHE_PREFIX):
    os.environ["BERT_ZH_EMBED_CACHE"] = tempfile.mkdtemp(
        prefix=os.path.basename(_TEST_CACHE_PREFIX))
    atexit.register(shutil.rmtree, os.environ["BERT_ZH_EMBED_CACHE"],
                    ignore_errors=True)

SHARED_ASSETS = ROOT.parent / "shared" / "assets"

# Documents for end-to-end runs: Chinese, mixed Latin/digits, an empty and a
# whitespace-only line, and one long enough to be truncated at 32 tokens.
E2E_TEXTS = [
    "今天天气很好，我们去公园散步。",
    "这家酒店的服务非常好，房间干净。",
    "Python是一种编程语言，version 3.11。",
    "",
    "   \t ",
    "北京时间昨晚，中国队以3比1获胜！",
    "手机电池续航一般，拍照效果不错。" * 6,
    "客服回复很及时，问题解决了。",
    "請問訂單什麼時候發貨？",
    "café naïve ÅNGSTRÖM 测试",
]

SPECIALS = (["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)]
            + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"])


def build_small_vocab(texts: list[str]) -> list[str]:
    """Specials (real Chinese BERT layout), every character the texts use
    (lower-cased, accents stripped), and ## continuations of ASCII letters
    and digits, plus a few whole words so that WordPiece merges happen."""
    import unicodedata
    chars: set[str] = set()
    for text in texts:
        folded = unicodedata.normalize("NFD", text.lower())
        chars.update(c for c in folded
                     if not c.isspace() and unicodedata.category(c) != "Mn")
    alnum = "abcdefghijklmnopqrstuvwxyz0123456789"
    words = ["python", "version", "cafe", "naive", "test", "##ion"]
    return (SPECIALS + sorted(chars | set(alnum)) + [f"##{c}" for c in alnum]
            + words)


@pytest.fixture(scope="session")
def small_vocab() -> list[str]:
    return build_small_vocab(E2E_TEXTS)


def export_small_bert(path: Path, vocab: list[str], hidden_size: int,
                      num_layers: int, max_positions: int,
                      do_lower_case: bool, seed: int) -> str:
    """A small BERT SavedModel with the TF Hub interface at ``path``
    (heads of width 8, feed-forward twice the hidden size)."""
    from model.bert import BertConfig
    from model.export import export_bert_saved_model
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden_size,
                        num_layers=num_layers, num_heads=hidden_size // 8,
                        intermediate_size=2 * hidden_size,
                        max_position_embeddings=max_positions)
    return export_bert_saved_model(str(path), config, vocab,
                                   do_lower_case=do_lower_case, seed=seed)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, small_vocab) -> str:
    """A 2-layer, hidden-32 BERT SavedModel with the TF Hub interface."""
    return export_small_bert(
        tmp_path_factory.mktemp("models") / "tiny_bert", small_vocab,
        hidden_size=32, num_layers=2, max_positions=128, do_lower_case=True,
        seed=7)


@pytest.fixture
def e2e_corpus(tmp_path) -> Path:
    """E2E_TEXTS as JSONL with ids doc-0 ... doc-N."""
    path = tmp_path / "corpus.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for i, text in enumerate(E2E_TEXTS):
            handle.write(json.dumps({"id": f"doc-{i}", "text": text},
                                    ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def random_bert_weights():
    """Factory ``(config, seed) -> {google_name: float32 array}``.

    The scales are larger than BERT's initialisation so that every weight
    visibly changes the outputs (a dropped or transposed weight cannot go
    unnoticed when comparing against the NumPy reference).
    """
    import numpy as np

    from model.bert import bert_weight_shapes

    def make(config, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        weights = {}
        for name, shape in bert_weight_shapes(config).items():
            if name.endswith("/gamma"):
                value = 1.0 + 0.2 * rng.standard_normal(shape)
            elif name.endswith(("/beta", "/bias")):
                value = 0.1 * rng.standard_normal(shape)
            elif "embeddings" in name:
                value = 0.5 * rng.standard_normal(shape)
            else:  # kernel [in, out]: unit-variance outputs
                value = rng.standard_normal(shape) / np.sqrt(shape[0])
            weights[name] = value.astype(np.float32)
        return weights

    return make


def random_padded_batch(vocab_size: int, lengths: list[int], seed: int = 0
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_word_ids, input_mask, segment_ids) int32 for rows of the given
    real lengths, padded to the longest: random ids in [1, vocab_size) on
    real tokens, 0 and mask 0 on padding."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), max(lengths)), np.int32)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(1, vocab_size, length)
        mask[row, :length] = 1
    return ids, mask, np.zeros_like(ids)
