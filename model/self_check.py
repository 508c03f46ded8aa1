"""How far a reduced precision moves the embeddings from float32, and the
self-check a worker runs at load.

``compare_engines`` runs the same token batches through a reference model
(float32) and a candidate (another engine or precision) and returns an
``AccuracyStats``: per document, the cosine of the pooled outputs and of
the mean-pooled sequence outputs (the mean over real tokens), their minimum
and mean, and the largest absolute difference of any output value.  The
engines call it on ``probe_batches`` at worker load, so that ``--precision
auto`` keeps a reduced precision only where it meets its target
(``ACCURACY_TARGETS``) on the model actually loaded: how far bfloat16 moves
a model's outputs depends on its weights, not only on the hardware.  The
tools (``python -m model.accuracy``, ``model.quantize``, the benchmarks)
measure with it too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import numpy as np

# Lowest cosine to float32 (pooled and mean-pooled sequence, every
# document) a reduced precision must keep to be used without being asked
# for by name.
ACCURACY_TARGETS = {"bfloat16": 0.999, "int8": 0.99}

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]
Model = Callable[[np.ndarray, np.ndarray, np.ndarray],
                 tuple[np.ndarray, np.ndarray]]

# Fixed Chinese sentences for the load-time self-check: news, reviews,
# classical and technical registers, digits and Latin letters, short to
# long, so that the probe's token ids look like a real corpus's.
PROBE_TEXTS = (
    "今天上午，市政府召开新闻发布会，介绍了今年城市交通建设的最新进展。",
    "房间很干净，服务员态度也好，就是早餐的品种少了一点。",
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？",
    "这款手机的电池续航大约两天，拍照效果在同价位里算是不错的。",
    "研究人员发现，在温度升高2摄氏度的条件下，该作物的产量下降了约15%。",
    "快递太慢了，等了一个星期才到，包装还破了。",
    "我们使用Python和TensorFlow训练模型，并在GPU上完成了推理测试。",
    "春天来了，河边的柳树发出了新芽，孩子们在草地上放风筝。",
    "据报道，该公司第三季度营业收入同比增长百分之十二，净利润达到三亿元，"
    "主要得益于海外市场的扩张和新产品的上市。分析人士认为，随着原材料价格"
    "回落，明年的利润率有望进一步提高，但汇率波动仍是不小的风险。",
    "先生说：“你们要好好读书，将来才能为国家做事。”大家都点了点头。",
    "酒店位置很方便，离地铁站只有五分钟，周边有很多餐馆和超市，下次出差还"
    "会选择这里。不过隔音一般，晚上能听到走廊里的声音。",
    "请问这本书什么时候发货？我已经付款三天了。",
)


@dataclasses.dataclass(frozen=True)
class AccuracyStats:
    """A candidate's outputs against the reference's, over ``documents``.

    Cosines are per document: ``pooled_*`` of ``pooled_output``,
    ``mean_pooled_*`` of ``sequence_output`` averaged over real tokens.
    ``max_abs_pooled`` and ``max_abs_sequence`` are the largest absolute
    differences of any output value (padding excluded).
    """
    documents: int
    pooled_cosine_min: float
    pooled_cosine_mean: float
    mean_pooled_cosine_min: float
    mean_pooled_cosine_mean: float
    max_abs_pooled: float
    max_abs_sequence: float

    @property
    def min_cosine(self) -> float:
        """The lower of the two minimum cosines (what targets bound)."""
        return min(self.pooled_cosine_min, self.mean_pooled_cosine_min)

    def meets(self, target: float) -> bool:
        """Whether every document's pooled and mean-pooled cosines reach
        ``target``."""
        return self.documents > 0 and self.min_cosine >= target

    def summary(self) -> str:
        """One line for logs."""
        return (f"{self.documents} documents: pooled cosine min "
                f"{self.pooled_cosine_min:.6f} mean "
                f"{self.pooled_cosine_mean:.6f}; mean-pooled sequence cosine "
                f"min {self.mean_pooled_cosine_min:.6f} mean "
                f"{self.mean_pooled_cosine_mean:.6f}; max abs error pooled "
                f"{self.max_abs_pooled:.2e}, sequence "
                f"{self.max_abs_sequence:.2e}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``[N, H]`` arrays, in float64; a
    row that is zero in both counts as equal (1.0)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    dots = (a * b).sum(axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (norms == 0) & (np.abs(a).sum(axis=1) == 0) & \
        (np.abs(b).sum(axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = np.where(norms > 0, dots / np.where(norms > 0, norms, 1), 0.0)
    return np.where(both_zero, 1.0, result)


def mean_pool(sequence: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[B, S, H]`` sequence outputs averaged over the real tokens of each
    row (``mask`` ``[B, S]``, 1 on real tokens)."""
    weights = mask.astype(np.float64)[:, :, None]
    return (sequence.astype(np.float64) * weights).sum(axis=1) / \
        np.maximum(weights.sum(axis=1), 1.0)


def compare_engines(reference: Model, candidate: Model,
                    batches: Iterable[Batch]) -> AccuracyStats:
    """Runs every batch through both models and compares their outputs
    document by document (see ``AccuracyStats``)."""
    pooled_cos, mean_cos = [], []
    max_pooled = max_sequence = 0.0
    for ids, mask, segments in batches:
        ref_pooled, ref_sequence = reference(ids, mask, segments)
        got_pooled, got_sequence = candidate(ids, mask, segments)
        pooled_cos.append(cosines(ref_pooled, got_pooled))
        mean_cos.append(cosines(mean_pool(ref_sequence, mask),
                                mean_pool(got_sequence, mask)))
        max_pooled = max(max_pooled, float(np.abs(
            ref_pooled.astype(np.float64) - got_pooled).max()))
        real = mask.astype(bool)
        max_sequence = max(max_sequence, float(np.abs(
            ref_sequence[real].astype(np.float64)
            - got_sequence[real]).max()))
    if not pooled_cos:
        return AccuracyStats(0, float("nan"), float("nan"), float("nan"),
                             float("nan"), float("nan"), float("nan"))
    pooled = np.concatenate(pooled_cos)
    means = np.concatenate(mean_cos)
    return AccuracyStats(
        documents=int(pooled.size),
        pooled_cosine_min=float(pooled.min()),
        pooled_cosine_mean=float(pooled.mean()),
        mean_pooled_cosine_min=float(means.min()),
        mean_pooled_cosine_mean=float(means.mean()),
        max_abs_pooled=max_pooled, max_abs_sequence=max_sequence)


# --- token batches ---------------------------------------------------------


def token_batches(texts: Sequence[str], vocab: Sequence[str],
                  do_lower_case: bool, max_seq_length: int = 128,
                  batch_size: int = 32, max_tokens: int = 2048
                  ) -> list[Batch]:
    """``texts`` tokenized as the pipeline tokenizes them, sorted by length
    and cut into padded batches as the pipeline cuts them (texts with no
    word pieces are left out, as the pipeline skips them)."""
    from transforms.batch import cut_batches
    from transforms.infer import pad_batch
    from transforms.records import TokenizedDocument
    from transforms.tokenization import BertWordPieceTokenizer
    tokenizer = BertWordPieceTokenizer(list(vocab),
                                       do_lower_case=do_lower_case)
    docs = []
    for index, text in enumerate(texts):
        encoded = tokenizer.encode(text, max_seq_length)
        if encoded.num_tokens > 2:
            docs.append(TokenizedDocument(
                f"d{index}", np.asarray(encoded.input_word_ids, np.int32),
                encoded.truncated))
    return [pad_batch(batch)
            for batch in cut_batches(docs, batch_size, max_tokens)]


def _fallback_probe(count: int = len(PROBE_TEXTS)) -> list[Batch]:
    """Probe ids for a model without a vocabulary asset: ``[CLS]`` and
    ``[SEP]`` around ids from 104 on (past BERT's special tokens), in
    lengths 8 to 96."""
    rng = np.random.default_rng(0)
    rows = [np.concatenate(([101], rng.integers(104, 1000, n), [102]))
            for n in np.linspace(6, 94, count).astype(int)]
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    mask = (ids != 0).astype(np.int32)
    return [(ids, mask, np.zeros_like(ids))]


def probe_batches(model_dir: str, max_seq_length: int = 128) -> list[Batch]:
    """``PROBE_TEXTS`` tokenized with the model's own vocabulary (or
    ``_fallback_probe`` when the model carries none): the fixed input of
    the load-time self-check."""
    from model.vocab import load_vocab, read_tokenizer_settings
    settings = read_tokenizer_settings(model_dir)
    if settings is None:
        return _fallback_probe()
    return token_batches(PROBE_TEXTS, load_vocab(settings.vocab_path),
                         settings.do_lower_case, max_seq_length)
