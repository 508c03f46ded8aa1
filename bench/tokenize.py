"""Tokenizer benchmark: text to padded model input, three ways, one process.

Run from the repository root::

    .venv/bin/python -m bench.tokenize [--corpus PATH ...] [--repeat N]
                                       [--max_seq_length 128] [--batch_size 32]

Contenders, each turning every document into the padded ``[n, max_seq_length]``
int32 id and mask arrays the model takes (padding is timed too):

* ours: ``BertWordPieceTokenizer.encode`` per document, then padding per
  batch, as the pipeline's tokenize DoFn and batcher do;
* ``tokenizers`` (Rust) configured as BERT, on one thread: the fastest of its
  single-threaded entry points is used, then its ids and masks become arrays;
* a straightforward pure-Python implementation of the reference rules (below):
  a plain loop over characters and words, no caches.

The process is pinned to one core and ``tokenizers`` gets
``TOKENIZERS_PARALLELISM=false`` / ``RAYON_NUM_THREADS=1`` before it is
imported, so the numbers are per core. "Cold" is the first pass of a freshly
built tokenizer (empty caches; building it is timed separately as "setup");
"warm" is the median of ``--repeat`` further passes, run round-robin so that
machine noise hits every contender alike. Tokens are real tokens (mask ones,
[CLS] and [SEP] included). The ids of all contenders are compared; where
``tokenizers`` differs, the document must show one of the differences
documented in ``tests/test_tokenization.py`` (``KNOWN_HF_DIFFERENCES``).

Inputs: the real corpus (``corpus/*.jsonl``, field ``text``) and vocabulary
(``bert_zh/vocab.txt``) under ``../shared/assets`` next to the repository; when
absent, a generated corpus and vocabulary are used and the output says so.
"""

from __future__ import annotations

import os

# Before `tokenizers` is imported anywhere: one thread, no rayon pool.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"

# pylint: disable=wrong-import-position
import argparse
import json
import platform
import random
import statistics
import sys
import time
import unicodedata
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from model.vocab import load_vocab
from transforms.tokenization import BertWordPieceTokenizer

SHARED_ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
DEFAULT_CORPUS = SHARED_ASSETS / "corpus"
DEFAULT_VOCAB = SHARED_ASSETS / "bert_zh" / "vocab.txt"

Arrays = Tuple[np.ndarray, np.ndarray]  # input_word_ids, input_mask
Batches = List[List[str]]


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def load_corpus(paths: Sequence[Path]) -> List[str]:
    """The ``text`` of every JSON line in the given files or directories."""
    files: List[Path] = []
    for path in paths:
        files += sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    docs: List[str] = []
    for name in files:
        with open(name, encoding="utf-8") as handle:
            docs += [json.loads(line)["text"] for line in handle if line.strip()]
    return docs


_GENERATED_CHARS = "".join(chr(0x4E00 + (i * 7919) % 0x5000) for i in range(3000))
_GENERATED_WORDS = ("iPhone", "BERT", "WiFi", "ok", "Beam", "2019", "3.5", "USB", "hello")
_GENERATED_PUNCT = "，。、！？：；（）“”"


def generated_corpus(num_docs: int = 20_000, seed: int = 0) -> List[str]:
    """Chinese-like documents with a log-normal length spread (median about
    60 characters, long tail to a few thousand), with punctuation, numbers and
    some Latin words, standing in for the real corpus."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(_GENERATED_CHARS))]
    docs = []
    for _ in range(num_docs):
        length = min(int(rng.lognormvariate(4.1, 1.0)) + 1, 5_000)
        chars = rng.choices(_GENERATED_CHARS, weights, k=length)
        for i in range(0, length, 11):
            roll = rng.random()
            if roll < 0.5:
                chars[i] = rng.choice(_GENERATED_PUNCT)
            elif roll < 0.6:
                chars[i] = rng.choice(_GENERATED_WORDS)
            elif roll < 0.65:
                chars[i] = " "
        docs.append("".join(chars))
    return docs


def generated_vocab() -> List[str]:
    """A vocabulary laid out like the Chinese BERT one, covering most of the
    generated corpus (some characters are left out to exercise [UNK])."""
    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)]
    specials += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ascii_chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    continuations = ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    words = ["iphone", "bert", "wifi", "ok", "beam", "2019", "usb", "hello", "##phone"]
    chars = [c for i, c in enumerate(_GENERATED_CHARS) if i % 50 != 49]
    entries = specials + ascii_chars + continuations + words + chars + list(_GENERATED_PUNCT)
    return list(dict.fromkeys(entries))


def load_inputs(corpus: Optional[Sequence[str]], vocab: Optional[str]) -> Tuple[
        List[str], List[str], str]:
    """Documents, vocabulary and a line describing where they came from."""
    corpus_paths = [Path(p) for p in corpus] if corpus else [DEFAULT_CORPUS]
    vocab_path = Path(vocab) if vocab else DEFAULT_VOCAB
    docs = load_corpus(corpus_paths) if all(p.exists() for p in corpus_paths) else []
    if docs and vocab_path.is_file():
        source = (f"real corpus: {', '.join(str(p) for p in corpus_paths)}; "
                  f"vocab: {vocab_path}")
        return docs, load_vocab(str(vocab_path)), source
    note = (f"NOTE: real assets not found ({corpus_paths[0]}, {vocab_path}); "
            "using a GENERATED corpus and vocabulary instead")
    return generated_corpus(), generated_vocab(), note


# --------------------------------------------------------------------------
# Straightforward pure-Python implementation of the reference rules
# --------------------------------------------------------------------------

_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


class PurePythonBert:
    """BERT's BasicTokenizer + WordPiece written the obvious way: one
    character at a time, one word at a time, no caches, no tricks. It is the
    baseline a plain Python port would give, and a second reference."""

    def __init__(self, vocab: Sequence[str], do_lower_case: bool) -> None:
        self.vocab = {token: i for i, token in enumerate(vocab)}
        self.lower = do_lower_case

    def encode(self, text: str, max_seq_length: int) -> List[int]:
        """``[CLS] ids[:max_seq_length - 2] [SEP]`` as a list of ids."""
        ids = [self.vocab[p] for w in self.basic_tokenize(text) for p in self.wordpiece(w)]
        return [self.vocab["[CLS]"]] + ids[:max_seq_length - 2] + [self.vocab["[SEP]"]]

    def basic_tokenize(self, text: str) -> List[str]:
        """Clean, space out CJK, split, lower-case/strip accents, split punctuation."""
        spaced = []
        for char in text:
            code = ord(char)
            if code in (0, 0xFFFD) or _is_control(char):
                continue
            if char in " \t\n\r" or unicodedata.category(char) == "Zs":
                spaced.append(" ")
            elif any(low <= code <= high for low, high in _CJK_RANGES):
                spaced.append(" " + char + " ")
            else:
                spaced.append(char)
        words = []
        for word in "".join(spaced).split():
            if self.lower:
                word = unicodedata.normalize("NFD", word.lower())
                word = "".join(c for c in word if unicodedata.category(c) != "Mn")
            words += _split_punctuation(word)
        return words

    def wordpiece(self, word: str) -> List[str]:
        """Greedy longest-match-first; a word with no full split is [UNK]."""
        if len(word) > 100:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = ("##" if start > 0 else "") + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces


def _is_control(char: str) -> bool:
    """Category C* except tab, newline, carriage return."""
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_punctuation(char: str) -> bool:
    """ASCII non-alphanumeric symbols or Unicode P*."""
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _split_punctuation(word: str) -> List[str]:
    """Every punctuation character becomes its own word."""
    out, current = [], ""
    for char in word:
        if _is_punctuation(char):
            if current:
                out.append(current)
            out.append(char)
            current = ""
        else:
            current += char
    return out + [current] if current else out


# --------------------------------------------------------------------------
# Contenders: each turns batches of texts into padded id and mask arrays
# --------------------------------------------------------------------------


class Contender(NamedTuple):
    """A way to tokenize: ``setup()`` builds a fresh tokenizer (empty caches),
    ``run(tokenizer, batches)`` returns the padded arrays of every batch."""

    name: str
    setup: Callable[[], object]
    run: Callable[[object, Batches], List[Arrays]]


def pad_rows(rows: Sequence[Sequence[int]], width: int) -> Arrays:
    """Zero-padded int32 ids and mask for one batch (like ``pad_batch``)."""
    ids = np.zeros((len(rows), width), dtype=np.int32)
    lengths = np.empty(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        lengths[i] = len(row)
    return ids, (np.arange(width) < lengths[:, None]).astype(np.int32)


def ours_per_doc(vocab: List[str], lower: bool, max_len: int) -> Contender:
    """``encode`` per document (what the pipeline's DoFn calls), padded per batch."""
    def run(tok: BertWordPieceTokenizer, batches: Batches) -> List[Arrays]:
        return [pad_rows([tok.encode(t, max_len).input_word_ids for t in batch], max_len)
                for batch in batches]
    return Contender("ours: encode + pad", lambda: BertWordPieceTokenizer(vocab, lower), run)


def pure_python(vocab: List[str], lower: bool, max_len: int) -> Contender:
    """The straightforward implementation above, padded per batch."""
    def run(tok: PurePythonBert, batches: Batches) -> List[Arrays]:
        return [pad_rows([tok.encode(t, max_len) for t in batch], max_len)
                for batch in batches]
    return Contender("pure Python", lambda: PurePythonBert(vocab, lower), run)


def make_hf_tokenizer(vocab: List[str], lower: bool, max_len: int):
    """``tokenizers`` configured as BERT, truncating and padding to ``max_len``."""
    # pylint: disable=import-outside-toplevel
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    hf = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)},
                                    unk_token="[UNK]", max_input_chars_per_word=100))
    hf.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lower, lowercase=lower)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = hf.token_to_id("[CLS]"), hf.token_to_id("[SEP]")
    hf.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    hf.enable_truncation(max_length=max_len)
    hf.enable_padding(length=max_len, pad_id=hf.token_to_id("[PAD]"), pad_token="[PAD]")
    return hf


HF_MODES: Dict[str, Callable] = {
    "encode_batch": lambda hf, batch: hf.encode_batch(batch),
    "encode_batch_fast": lambda hf, batch: hf.encode_batch_fast(batch),
    "encode per doc": lambda hf, batch: [hf.encode(t) for t in batch],
}


def hf_contender(vocab: List[str], lower: bool, max_len: int, mode: str) -> Contender:
    """``tokenizers`` through one of its entry points, converted to arrays."""
    encode = HF_MODES[mode]

    def run(hf, batches: Batches) -> List[Arrays]:
        out = []
        for batch in batches:
            encodings = encode(hf, batch)
            ids = np.array([e.ids for e in encodings], dtype=np.int32)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int32)
            out.append((ids.reshape(-1, max_len), mask.reshape(-1, max_len)))
        return out

    def setup():
        return make_hf_tokenizer(vocab, lower, max_len)
    return Contender(f"tokenizers ({mode})", setup, run)


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


class Timing(NamedTuple):
    """Seconds for one contender: setup, the cold pass, the warm passes."""

    setup: float
    cold: float
    warm: List[float]
    arrays: Arrays  # all rows, from the cold pass


def timed(func: Callable[[], object]) -> Tuple[float, object]:
    """Run ``func`` once; return (seconds, result)."""
    started = time.perf_counter()
    result = func()
    return time.perf_counter() - started, result


def run_cold(contender: Contender, batches: Batches) -> Tuple[object, Timing]:
    """Build a fresh tokenizer and make the first pass over the corpus."""
    setup, tokenizer = timed(contender.setup)
    cold, out = timed(lambda: contender.run(tokenizer, batches))
    arrays = (np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out]))
    return tokenizer, Timing(setup, cold, [], arrays)


def pick_hf_mode(vocab: List[str], lower: bool, max_len: int, batches: Batches) -> Tuple[
        str, Dict[str, float]]:
    """Time each single-threaded ``tokenizers`` entry point once (warm, with
    the conversion to arrays) and return the fastest, to be fair to it; also
    time the fastest once without the conversion (key ``"<mode> only"``)."""
    hf = make_hf_tokenizer(vocab, lower, max_len)
    hf_contender(vocab, lower, max_len, "encode_batch").run(hf, batches[:20])  # warm-up
    seconds = {}
    for mode in HF_MODES:
        run = hf_contender(vocab, lower, max_len, mode).run
        seconds[mode] = timed(lambda run=run: run(hf, batches))[0]
    best = min(seconds, key=seconds.get)
    encode = HF_MODES[best]
    seconds[f"{best} only"] = timed(lambda: [encode(hf, batch) for batch in batches])[0]
    return best, seconds


def run_all(contenders: Sequence[Contender], batches: Batches, repeat: int,
            warm_repeat: Dict[str, int]) -> Dict[str, Timing]:
    """Cold pass of each contender, then warm passes round-robin."""
    timings: Dict[str, Timing] = {}
    tokenizers: Dict[str, object] = {}
    for contender in contenders:
        tokenizers[contender.name], timings[contender.name] = run_cold(contender, batches)
    for round_ in range(repeat):
        for contender in contenders:
            if round_ < warm_repeat.get(contender.name, repeat):
                seconds, _ = timed(lambda c=contender: c.run(tokenizers[c.name], batches))
                timings[contender.name].warm.append(seconds)
    return timings


# --------------------------------------------------------------------------
# Checks and report
# --------------------------------------------------------------------------


def known_difference(doc: str, lower: bool, hf) -> Optional[str]:
    """Which documented ``tokenizers`` difference ``doc`` shows, if any
    (the names of ``KNOWN_HF_DIFFERENCES`` in tests/test_tokenization.py)."""
    if any(0x2B820 <= ord(c) <= 0x2B91F for c in doc):
        return "ext_e_start"
    if lower and "\u03a3" in doc:
        return "final_sigma"
    if any(unicodedata.category(c) == "Cn" for c in doc):
        return "unassigned"
    for char in set(doc):
        if unicodedata.category(char).startswith("P") and len(
                hf.pre_tokenizer.pre_tokenize_str(f"a{char}b")) == 1:
            return "new_punctuation"
    return None


def differing_rows(a: Arrays, b: Arrays) -> np.ndarray:
    """Indices of rows where ids or masks differ."""
    return np.flatnonzero((a[0] != b[0]).any(axis=1) | (a[1] != b[1]).any(axis=1))


def check_ids(timings: Dict[str, Timing], docs: List[str], hf_name: str, lower: bool,
              hf) -> Dict[str, int]:
    """Assert identical arrays everywhere except documented HF differences;
    return how many documents show each documented difference."""
    ours = timings["ours: encode + pad"].arrays
    for name, timing in timings.items():
        if name != hf_name:
            bad = differing_rows(ours, timing.arrays)
            assert not len(bad), f"{name} differs from ours on {len(bad)} docs: " \
                                 f"{[docs[i][:80] for i in bad[:3]]}"
    reasons: Dict[str, int] = {}
    for row in differing_rows(ours, timings[hf_name].arrays).tolist():
        reason = known_difference(docs[row], lower, hf)
        assert reason, f"undocumented difference from tokenizers: {docs[row][:200]!r}"
        reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


def _warm(timing: Timing) -> float:
    """Median warm seconds (the cold pass when there was no warm one)."""
    return statistics.median(timing.warm) if timing.warm else timing.cold


def machine_description() -> str:
    """CPU model, core counts, and the software versions that matter."""
    import tokenizers  # pylint: disable=import-outside-toplevel
    from model.runtime import cpu_model_name
    return (f"{cpu_model_name()}; {os.cpu_count()} logical cores, pinned to core(s) "
            f"{sorted(os.sched_getaffinity(0))}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, numpy {np.__version__}, "
            f"tokenizers {tokenizers.__version__}")


def print_report(timings: Dict[str, Timing], num_docs: int, hf_name: str) -> None:
    """Documents/s and tokens/s per contender, cold and warm, and the ratios."""
    tokens = int(timings["ours: encode + pad"].arrays[1].sum())
    print(f"\n{'':32s} {'setup s':>8s} {'cold s':>8s} {'warm s':>8s} "
          f"{'docs/s warm':>12s} {'tokens/s warm':>14s} {'tokens/s cold':>14s}")
    for name, t in timings.items():
        warm = _warm(t)
        print(f"{name:32s} {t.setup:8.3f} {t.cold:8.3f} {warm:8.3f} {num_docs / warm:12,.0f} "
              f"{tokens / warm:14,.0f} {tokens / t.cold:14,.0f}")
    passes = ", ".join(f"{name} {len(t.warm)}" for name, t in timings.items())
    print(f"(warm = median of the warm passes: {passes}; "
          f"tokens = {tokens:,} real tokens incl. [CLS]/[SEP] in {num_docs:,} docs; "
          "pure Python keeps no caches, so its cold and warm differ by noise only)")

    def ratio(a: str, b: str, kind: str) -> float:
        ta, tb = timings[a], timings[b]
        if kind == "cold":
            return tb.cold / ta.cold
        return _warm(tb) / _warm(ta)

    print(f"\n{'speed-up (tokens/s ratio)':53s} {'warm':>7s} {'cold':>7s}")
    ours = "ours: encode + pad"
    for other in (hf_name, "pure Python"):
        print(f"{ours:20s} / {other:30s} {ratio(ours, other, 'warm'):6.2f}x "
              f"{ratio(ours, other, 'cold'):6.2f}x")
    met = ratio(ours, hf_name, "warm") >= 5
    print(f"target >= 5x tokenizers per core, {ours}: {'MET' if met else 'NOT MET'}")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--corpus", nargs="+", help="JSONL files or directories "
                        f"(default: {DEFAULT_CORPUS})")
    parser.add_argument("--vocab", help=f"vocab.txt (default: {DEFAULT_VOCAB})")
    parser.add_argument("--repeat", type=int, default=3, help="warm passes per contender")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32,
                        help="documents per padded batch")
    parser.add_argument("--cased", action="store_true", help="do_lower_case=False")
    parser.add_argument("--pure_python_repeat", type=int, default=1,
                        help="warm passes of the (slow) pure-Python contender")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Load inputs, pin to one core, time every contender, check, report."""
    args = parse_args(argv)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    docs, vocab, source = load_inputs(args.corpus, args.vocab)
    lower, max_len = not args.cased, args.max_seq_length
    batches = [docs[i:i + args.batch_size] for i in range(0, len(docs), args.batch_size)]
    print(f"machine: {machine_description()}")
    print(f"inputs: {source}")
    print(f"{len(docs):,} docs, {sum(map(len, docs)):,} characters, vocab {len(vocab):,}; "
          f"do_lower_case={lower}, max_seq_length={max_len}, batch_size={args.batch_size}")

    hf_mode, hf_seconds = pick_hf_mode(vocab, lower, max_len, batches)
    print("tokenizers single-threaded entry points, one warm pass each incl. conversion "
          "to arrays: " + ", ".join(f"{mode} {s:.3f} s" for mode, s in hf_seconds.items()
                                    if not mode.endswith(" only"))
          + f"; using {hf_mode} ({hf_seconds[hf_mode + ' only']:.3f} s of it without "
          "the conversion)")
    hf = hf_contender(vocab, lower, max_len, hf_mode)
    contenders = [ours_per_doc(vocab, lower, max_len),
                  hf, pure_python(vocab, lower, max_len)]
    timings = run_all(contenders, batches, args.repeat,
                      {"pure Python": args.pure_python_repeat})

    reasons = check_ids(timings, docs, hf.name, lower, hf.setup())
    print_report(timings, len(docs), hf.name)
    listed = ", ".join(f"{name}: {count}" for name, count in sorted(reasons.items()))
    print(f"\nids and masks identical for all contenders on all {len(docs):,} docs, except "
          f"{sum(reasons.values())} docs where tokenizers shows a documented difference"
          + (f" ({listed})" if listed else ""))


if __name__ == "__main__":
    sys.exit(main())
