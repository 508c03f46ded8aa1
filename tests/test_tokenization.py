"""Tests for transforms.tokenization (BERT reference FullTokenizer semantics).

Three layers:
* hand-written unit tests, one or more per rule of the reference tokenizer;
* a self-check against a deliberately naive per-word implementation of the
  same rules (written below) over a sweep of Unicode code points, because the
  production code processes whole documents at once for speed;
* parity with an independent implementation, HF ``tokenizers`` configured as
  BERT, on a generated corpus (both casing modes) and, opt-in, on the real
  vocabulary and corpora in ``../shared/assets``. Where ``tokenizers`` departs
  from the reference rules, the difference is listed in
  ``KNOWN_HF_DIFFERENCES`` and the test checks that those are the only ones.
"""

from __future__ import annotations

import functools
import glob
import json
import pickle
import sys
import time
import types
import unicodedata
from pathlib import Path
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np
import pytest

from tests.tokenizer_corpus import (HF_DIVERGENCE_DOCS, SPECIAL_TOKENS,
                                    build_test_vocab,
                                    build_tokenizer_test_corpus)
from transforms import tokenization
from model.vocab import load_vocab
from transforms.tokenization import BertWordPieceTokenizer, Encoded

SHARED_ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
REAL_VOCAB = SHARED_ASSETS / "bert_zh" / "vocab.txt"
REAL_CORPUS_GLOB = str(SHARED_ASSETS / "corpus" / "*.jsonl")

UNIT_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "un", "unaff", "##aff", "##able", "##a", "a", "b", "##b",
    "token", "##ization", "##iz", "##s", "cafe", "caf", "##é", "naive",
    "今", "天", "好", "。", "，", "$", "^", "`", "100", "2", "x", "##x",
    "e", "##e", "ひらがな", "hello", "world",
]


def make_tokenizer(vocab: Sequence[str] = UNIT_VOCAB, **kwargs) -> BertWordPieceTokenizer:
    """Tokenizer over the small hand-written vocabulary."""
    return BertWordPieceTokenizer(vocab, **kwargs)


# --------------------------------------------------------------------------
# Naive per-word implementation of the reference rules (for self-checks)
# --------------------------------------------------------------------------


# Memoized only to keep the tests fast; the rules are the module's own
# character predicates, which the unit tests above pin down one by one.
_is_control = functools.lru_cache(maxsize=None)(tokenization.is_control)
_is_whitespace = functools.lru_cache(maxsize=None)(tokenization.is_whitespace)
_is_cjk_char = functools.lru_cache(maxsize=None)(tokenization.is_cjk_char)
_is_punctuation = functools.lru_cache(maxsize=None)(tokenization.is_punctuation)


def naive_basic_tokenize(text: str, lower: bool) -> List[str]:
    """The reference BasicTokenizer, one step and one word at a time."""
    cleaned = []
    for char in text:
        if char in "\x00\ufffd" or _is_control(char):
            continue
        if _is_whitespace(char):
            cleaned.append(" ")
        elif _is_cjk_char(char):
            cleaned.append(f" {char} ")
        else:
            cleaned.append(char)
    tokens: List[str] = []
    for word in "".join(cleaned).split():
        if lower:
            word = unicodedata.normalize("NFD", word.lower())
            word = "".join(c for c in word if unicodedata.category(c) != "Mn")
        current = ""
        for char in word:
            if _is_punctuation(char):
                tokens += [current, char] if current else [char]
                current = ""
            else:
                current += char
        if current:
            tokens.append(current)
    return " ".join(tokens).split()


def naive_wordpiece(word: str, vocab: set, max_chars: int = 100) -> List[str]:
    """Greedy longest-match-first over all substrings, no shortcuts."""
    if len(word) > max_chars:
        return ["[UNK]"]
    pieces, start = [], 0
    while start < len(word):
        for end in range(len(word), start, -1):
            candidate = ("##" if start else "") + word[start:end]
            if candidate in vocab:
                pieces.append(candidate)
                start = end
                break
        else:
            return ["[UNK]"]
    return pieces


# --------------------------------------------------------------------------
# Vocabulary loading and construction
# --------------------------------------------------------------------------


def test_load_vocab_strips_only_line_terminators(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes("[PAD]\r\n a b \n##x\n\u2028\n中\n".encode("utf-8"))
    assert load_vocab(str(path)) == ["[PAD]", " a b ", "##x", "\u2028", "中"]


def test_load_vocab_keeps_empty_lines_but_not_a_final_newline(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("a\n\nb", encoding="utf-8")
    assert load_vocab(str(path)) == ["a", "", "b"]


def test_load_vocab_uses_gfile_for_urls(monkeypatch):
    opened = []

    class FakeGFile:
        def __init__(self, path, mode):
            opened.append((path, mode))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return "[UNK]\n[CLS]\n".encode("utf-8")

    fake_tf = types.SimpleNamespace(io=types.SimpleNamespace(
        gfile=types.SimpleNamespace(GFile=FakeGFile)))
    monkeypatch.setitem(sys.modules, "tensorflow", fake_tf)
    assert load_vocab("gs://bucket/vocab.txt") == ["[UNK]", "[CLS]"]
    assert opened == [("gs://bucket/vocab.txt", "rb")]


def test_missing_special_tokens_are_named():
    with pytest.raises(ValueError, match=r"\[CLS\], \[SEP\]"):
        BertWordPieceTokenizer(["[UNK]", "a"])
    with pytest.raises(ValueError, match=r"\[UNK\]"):
        BertWordPieceTokenizer(["[CLS]", "[SEP]"])


def test_vocab_size_and_duplicate_tokens_map_to_last_line():
    tok = make_tokenizer(UNIT_VOCAB + ["a"])
    assert tok.vocab_size == len(UNIT_VOCAB) + 1
    assert tok.convert_tokens_to_ids(["a", "[CLS]"]) == [len(UNIT_VOCAB), 2]


def test_convert_tokens_to_ids_rejects_unknown_tokens():
    with pytest.raises(KeyError, match="nope"):
        make_tokenizer().convert_tokens_to_ids(["a", "nope"])


# --------------------------------------------------------------------------
# BasicTokenizer rules
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dropped", [
    "\x00", "\x01", "\x07", "\x1b", "\x7f", "\x85", "\ufffd", "\u00ad",
    "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\ue000", "\U000e0001",
    "\ud800",  # lone surrogate (Cs)
    "\u0378",  # unassigned (Cn)
])
def test_cleaning_drops_control_and_format_characters(dropped):
    tok = make_tokenizer()
    assert tok.basic_tokenize(f"ab{dropped}cd") == ["abcd"]


@pytest.mark.parametrize("space", [
    " ", "\t", "\n", "\r", "\u3000", "\u00a0", "\u2003", "\u2009", "\u202f",
    "\u1680", "\u2028", "\u2029",
])
def test_whitespace_variants_separate_words(space):
    assert make_tokenizer().basic_tokenize(f"ab{space}cd") == ["ab", "cd"]


def test_whitespace_and_control_only_documents_have_no_tokens():
    tok = make_tokenizer()
    for text in ["", " ", "\u3000\t\n", "\u200b\ufeff\x00"]:
        assert tok.basic_tokenize(text) == []
        assert tok.tokenize(text) == []


def test_each_cjk_ideograph_is_its_own_word():
    tok = make_tokenizer()
    assert tok.basic_tokenize("ab今天cd") == ["ab", "今", "天", "cd"]
    rare = "\u3400\u9fa5\U00020000\U0002a700\U0002b740\U0002b820\U0002ceaf\uf900\U0002f800"
    chars = [c for c in rare if unicodedata.category(c) != "Cn"]
    assert tok.basic_tokenize("x" + "".join(chars) + "y") == (
        ["x"] + [unicodedata.normalize("NFD", c) for c in chars] + ["y"])


# The reference's CJK ranges, written out independently of the module.
REFERENCE_CJK_RANGES = [
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
]


def test_cjk_ranges_are_exactly_the_reference_ones():
    for low, high in REFERENCE_CJK_RANGES:
        for code in (low, (low + high) // 2, high):
            assert tokenization.is_cjk_char(chr(code)), hex(code)
    inside = {c for low, high in REFERENCE_CJK_RANGES for c in (low - 1, high + 1)
              if any(lo <= c <= hi for lo, hi in REFERENCE_CJK_RANGES)}
    for low, high in REFERENCE_CJK_RANGES:
        for code in (low - 1, high + 1):
            assert tokenization.is_cjk_char(chr(code)) == (code in inside), hex(code)
    for outside in "\u3007\u3041\u30a1\uac00\u2f00\u3001\uff01":  # kana, hangul, ...
        assert not tokenization.is_cjk_char(outside)
    assert make_tokenizer().basic_tokenize("x\U0002b820y") == ["x", "\U0002b820", "y"]


def test_kana_hangul_are_not_split_but_cjk_punctuation_is():
    tok = make_tokenizer()
    assert make_tokenizer(do_lower_case=False).basic_tokenize("ひらがなカタカナ") == [
        "ひらがなカタカナ"]
    # With lower-casing, NFD + dropping Mn also removes the dakuten (が -> か).
    assert tok.basic_tokenize("ひらがなカタカナ") == ["ひらかなカタカナ"]
    hangul = "안녕하세요"
    assert tok.basic_tokenize(hangul) == [unicodedata.normalize("NFD", hangul)]
    assert make_tokenizer(do_lower_case=False).basic_tokenize(hangul) == [hangul]
    assert tok.basic_tokenize("今天，好。") == ["今", "天", "，", "好", "。"]
    # U+3007 and kangxi radicals are outside the reference's CJK ranges.
    assert tok.basic_tokenize("a\u3007b\u2f00c") == ["a\u3007b\u2f00c"]


def test_lower_case_and_accent_stripping():
    tok = make_tokenizer(do_lower_case=True)
    assert tok.basic_tokenize("Café NAÏVE Ångström") == ["cafe", "naive", "angstrom"]
    assert tok.basic_tokenize("e\u0301le\u0300ve") == ["eleve"]  # decomposed input
    assert tok.basic_tokenize("İstanbul") == ["istanbul"]


def test_final_sigma_follows_python_lower_per_word():
    tok = make_tokenizer(do_lower_case=True)
    assert tok.basic_tokenize("ΟΔΥΣΣΕΥΣ ΣΟΦΙΑ ΑΣ.") == ["οδυσσευς", "σοφια", "ας", "."]


def test_do_lower_case_false_keeps_case_and_accents():
    tok = make_tokenizer(do_lower_case=False)
    assert tok.basic_tokenize("Café NAÏVE e\u0301") == ["Café", "NAÏVE", "e\u0301"]
    assert tok.tokenize("Cafe cafe") == ["[UNK]", "cafe"]
    assert tok.do_lower_case is False


def test_punctuation_rules():
    tok = make_tokenizer()
    # ASCII symbols count as punctuation even where Unicode says S*.
    assert tok.basic_tokenize("$100^2`x`") == ["$", "100", "^", "2", "`", "x", "`"]
    assert tok.basic_tokenize("a+b=c<d>e|f~g") == list("a+b=c<d>e|f~g")
    # Non-ASCII symbols are not punctuation; Unicode P* is.
    assert tok.basic_tokenize("a€b¥c＋d") == ["a€b¥c＋d"]
    assert tok.basic_tokenize("a«b»c—d") == list("a«b»c—d")
    # Punctuation created by NFD is split too (U+037E -> ';').
    assert make_tokenizer(do_lower_case=True).basic_tokenize("a\u037eb") == ["a", ";", "b"]
    assert make_tokenizer(do_lower_case=False).basic_tokenize("a\u037eb") == ["a", "\u037e", "b"]


def test_special_token_text_is_not_protected():
    assert make_tokenizer().tokenize("[CLS]") == ["[UNK]", "[UNK]", "[UNK]"]


# --------------------------------------------------------------------------
# WordPiece rules
# --------------------------------------------------------------------------


def test_greedy_longest_match_first():
    tok = make_tokenizer()
    # "unaff" beats "un" even though "un ##aff ##able" would also work.
    assert tok.tokenize("unaffable") == ["unaff", "##able"]
    assert tok.tokenize("tokenization tokens") == ["token", "##ization", "token", "##s"]


def test_continuation_pieces_and_whole_word_unk():
    tok = make_tokenizer()
    assert tok.tokenize("ab abx") == ["a", "##b", "a", "##b", "##x"]
    # "token" matches but "q" has no "##q": the whole word becomes [UNK].
    assert tok.tokenize("tokenq hello") == ["[UNK]", "hello"]
    assert tok.tokenize("qa") == ["[UNK]"]


def test_word_length_limit_counts_characters_after_basic_tokenization():
    tok = make_tokenizer()
    assert tok.tokenize("a" * 100) == ["a"] + ["##a"] * 99
    assert tok.tokenize("a" * 101) == ["[UNK]"]
    # Punctuation splits first, so only the 101-letter part is too long.
    assert tok.tokenize("a" * 101 + "$a") == ["[UNK]", "$", "a"]
    # Accent stripping shortens "e\u0301" x 60 (120 chars) to 60 characters.
    assert make_tokenizer(do_lower_case=True).tokenize("e\u0301" * 60) == ["e"] + ["##e"] * 59
    assert make_tokenizer(do_lower_case=False).tokenize("e\u0301" * 60) == ["[UNK]"]
    assert make_tokenizer(max_chars_per_word=3).tokenize("aaa aaaa") == [
        "a", "##a", "##a", "[UNK]"]


def test_unknown_characters_become_unk():
    tok = make_tokenizer()
    assert tok.tokenize("今日") == ["今", "[UNK]"]
    assert tok.tokenize("😀") == ["[UNK]"]


# --------------------------------------------------------------------------
# encode()
# --------------------------------------------------------------------------


def test_encode_adds_cls_sep_without_padding():
    tok = make_tokenizer()
    enc = tok.encode("今天好", max_seq_length=16)
    assert isinstance(enc, Encoded)
    assert enc.input_word_ids.dtype == np.int32
    assert enc.input_word_ids.tolist() == tok.convert_tokens_to_ids(
        ["[CLS]", "今", "天", "好", "[SEP]"])
    assert (enc.num_tokens, enc.truncated, enc.num_wordpieces) == (5, False, 3)


def test_encode_truncation_keeps_sep():
    tok = make_tokenizer()
    enc = tok.encode("今天好今天好", max_seq_length=5)
    assert tok.tokenize("今天好今天好") == ["今", "天", "好", "今", "天", "好"]
    assert enc.input_word_ids.tolist() == tok.convert_tokens_to_ids(
        ["[CLS]", "今", "天", "好", "[SEP]"])
    assert (enc.num_tokens, enc.truncated, enc.num_wordpieces) == (5, True, 6)
    exact = tok.encode("今天好", max_seq_length=5)
    assert (exact.num_tokens, exact.truncated) == (5, False)
    minimal = tok.encode("今天", max_seq_length=2)
    assert minimal.input_word_ids.tolist() == [2, 3] and minimal.truncated


def test_encode_empty_text_is_cls_sep():
    tok = make_tokenizer()
    for text in ["", "  \u3000", "\u200b"]:
        enc = tok.encode(text, max_seq_length=8)
        assert enc.input_word_ids.tolist() == [2, 3]
        assert (enc.num_tokens, enc.truncated, enc.num_wordpieces) == (2, False, 0)


def test_encode_rejects_too_small_max_seq_length():
    with pytest.raises(ValueError, match="max_seq_length"):
        make_tokenizer().encode("a", max_seq_length=1)


# --------------------------------------------------------------------------
# Pickling and caches
# --------------------------------------------------------------------------


def test_pickle_round_trip_drops_caches():
    for lower in (True, False):
        tok = make_tokenizer(do_lower_case=lower)
        text = "Café 今天 unaffable ΟΔΥΣΣΕΥΣ $100"
        before = tok.tokenize(text)
        payload = pickle.dumps(tok)
        assert b"unaffable" not in payload  # the per-word cache is not pickled
        clone = pickle.loads(payload)
        assert clone.tokenize(text) == before
        assert clone.do_lower_case is lower
        assert clone.vocab_size == tok.vocab_size
        assert np.array_equal(clone.encode(text, 8).input_word_ids,
                              tok.encode(text, 8).input_word_ids)


def test_bounded_caches_are_cleared_not_grown(monkeypatch):
    monkeypatch.setattr(tokenization, "_MAX_CACHED_WORDS", 3)
    monkeypatch.setattr(tokenization, "_MAX_CACHED_CHARS", 5)
    tok = make_tokenizer()
    words = "a b ab token tokens hello world unaffable"
    expected = make_tokenizer().tokenize(words)
    for _ in range(3):
        assert tok.tokenize(words) == expected
        assert tok.tokenize("今天好，Hello") == ["今", "天", "好", "，", "hello"]
    assert len(tok._word_cache) <= 3
    assert len(tok._single_pass._seen) <= 5 + len(set("今天好，Hello"))


# --------------------------------------------------------------------------
# Self-check against the naive per-word implementation
# --------------------------------------------------------------------------


def _sweep_code_points() -> List[int]:
    """Every BMP code point outside the big uniform blocks, samples elsewhere.

    Uniform blocks (CJK unified ideographs, hangul syllables, surrogates,
    private use) and the supplementary planes are sampled with a stride; the
    CJK range boundaries and the combining musical symbols are included fully.
    """
    uniform = [(0x4E00, 0xA000, 61), (0xAC00, 0xD7A4, 37), (0xD800, 0xF900, 41),
               (0x10000, 0x20000, 5), (0x20000, 0x110000, 251)]
    points = set(range(0x10000))
    for start, stop, stride in uniform:
        points -= set(range(start, stop))
        points |= set(range(start, stop, stride))
    for low, high in tokenization.CJK_RANGES:
        points |= {low - 1, low, high, high + 1}
    points |= set(range(0x2B800, 0x2B940)) | set(range(0x1D165, 0x1D173))
    return sorted(points)


@pytest.mark.parametrize("lower", [True, False])
def test_matches_naive_reference_on_unicode_sweep(lower):
    """The whole-document fast path equals per-word processing.

    Each code point is placed between cased letters, next to a capital sigma
    and next to combining marks (the cases where context could matter).
    """
    tok = make_tokenizer(do_lower_case=lower)
    points = _sweep_code_points()
    contexts = ("A{}b", "ΑΣ{}", "e\u0301{}\u0316", "\U0001d165{}\u0301")
    for start in range(0, len(points), 512):
        chunk = "".join(chr(cp) for cp in points[start:start + 512])
        for ctx in contexts:
            doc = " ".join(ctx.format(c) for c in chunk)
            assert tok.basic_tokenize(doc) == naive_basic_tokenize(doc, lower), (
                f"code points from U+{points[start]:04X}, context {ctx!r}")


# --------------------------------------------------------------------------
# Generated corpus and vocabulary
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> List[str]:
    return build_tokenizer_test_corpus(seed=0)


@pytest.fixture(scope="module")
def corpus_vocab(corpus) -> List[str]:
    return build_test_vocab(corpus)


def test_corpus_and_vocab_are_deterministic_and_cover_the_cases(corpus, corpus_vocab):
    assert corpus == build_tokenizer_test_corpus(seed=0)
    assert len(corpus) >= 2000
    assert corpus_vocab[:104] == SPECIAL_TOKENS
    assert corpus_vocab.index("[UNK]") == 100 and corpus_vocab.index("[MASK]") == 103
    assert all(t == t.lower() for t in corpus_vocab[104:])
    assert "" in corpus and max(map(len, corpus)) > 10_000
    joined = "".join(corpus)
    for needle in ["\u3000", "\u200b", "\u200d", "\ufeff", "\u00a0", "\u2003", "café",
                   "Ångström", "naïve", "https://", "@", "ひらがな", "안녕", "😀", "們"]:
        assert needle in joined, needle


@pytest.mark.parametrize("lower", [True, False])
def test_matches_naive_reference_on_corpus(corpus, corpus_vocab, lower):
    """Document by document equal to the naive implementation, and the corpus
    really reaches every WordPiece outcome."""
    tok = BertWordPieceTokenizer(corpus_vocab, do_lower_case=lower)
    vocab = set(corpus_vocab)
    pieces_of: Dict[str, List[str]] = {}
    counts = {"continuation": 0, "multi_char": 0, "unk_unsplittable": 0, "unk_too_long": 0}
    for doc in corpus:
        expected = []
        for word in naive_basic_tokenize(doc, lower):
            if word not in pieces_of:
                pieces = pieces_of[word] = naive_wordpiece(word, vocab)
                counts["continuation"] += any(p.startswith("##") for p in pieces)
                counts["multi_char"] += any(len(p.lstrip("#")) > 1 for p in pieces)
                if pieces == ["[UNK]"]:
                    counts["unk_too_long" if len(word) > 100 else "unk_unsplittable"] += 1
            expected += pieces_of[word]
        assert tok.tokenize(doc) == expected, repr(doc[:200])
    assert all(n >= 5 for n in counts.values()), counts


# --------------------------------------------------------------------------
# Parity with HF tokenizers
# --------------------------------------------------------------------------


class KnownDifference(NamedTuple):
    """A corpus document on which HF `tokenizers` departs from the reference."""

    lower_modes: Tuple[bool, ...]  # do_lower_case values where it differs
    ours: str  # a basic token we produce (the reference's answer)
    theirs: str  # the word `tokenizers` produces instead
    reason: str


KNOWN_HF_DIFFERENCES: Dict[str, KnownDifference] = {
    "ext_e_start": KnownDifference(
        (True, False), "\U0002b8ff", "x\U0002b8ffy",
        "tokenizers' CJK ranges start the CJK Ext-E block at U+2B920, the reference "
        "at U+2B820, so U+2B820..U+2B91F are not split off as their own words."),
    "final_sigma": KnownDifference(
        (True,), "οδυσσευς", "οδυσσευσ",
        "The reference lower-cases with Python's str.lower(), which maps a "
        "word-final capital sigma to 'ς'; tokenizers lower-cases per character."),
    "unassigned": KnownDifference(
        (True, False), "ab", "a\u0378b",
        "The reference drops every category C* character, including unassigned "
        "code points (Cn); tokenizers keeps Cn characters."),
    "new_punctuation": KnownDifference(
        (True, False), "\u2e52", "a\u2e52b\u2e43c",
        "tokenizers' Unicode category tables predate U+2E43 (Unicode 10) and "
        "U+2E52 (Unicode 13); the reference uses Python's unicodedata, where "
        "they are punctuation (Po)."),
}


def make_hf_tokenizer(vocab: Sequence[str], lower: bool):
    """HF `tokenizers` configured exactly like BERT's FullTokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, normalizers, pre_tokenizers

    hf = tokenizers.Tokenizer(models.WordPiece(
        {token: i for i, token in enumerate(vocab)}, unk_token="[UNK]",
        max_input_chars_per_word=100))
    hf.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lower, lowercase=lower)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return hf


def hf_words(hf, text: str) -> List[str]:
    """The words `tokenizers` hands to WordPiece (normalizer + pre-tokenizer)."""
    return [w for w, _ in hf.pre_tokenizer.pre_tokenize_str(hf.normalizer.normalize_str(text))]


def differing_documents(tok: BertWordPieceTokenizer, hf, docs: Sequence[str]) -> List[int]:
    """Indices of documents whose token ids differ between the two."""
    theirs = hf.encode_batch(list(docs), add_special_tokens=False)
    return [i for i, (doc, enc) in enumerate(zip(docs, theirs))
            if tok.convert_tokens_to_ids(tok.tokenize(doc)) != enc.ids]


@pytest.mark.parametrize("lower", [True, False])
def test_parity_with_hf_tokenizers_on_generated_corpus(corpus, corpus_vocab, lower):
    hf = make_hf_tokenizer(corpus_vocab, lower)
    tok = BertWordPieceTokenizer(corpus_vocab, do_lower_case=lower)

    differing = {corpus[i] for i in differing_documents(tok, hf, corpus)}
    expected = {HF_DIVERGENCE_DOCS[name] for name, diff in KNOWN_HF_DIFFERENCES.items()
                if lower in diff.lower_modes}
    assert differing == expected, {
        "unexpected": sorted(differing - expected), "missing": sorted(expected - differing)}

    for name, diff in KNOWN_HF_DIFFERENCES.items():
        doc = HF_DIVERGENCE_DOCS[name]
        ours = tok.basic_tokenize(doc)
        assert ours == naive_basic_tokenize(doc, lower), name  # we follow the reference
        if lower in diff.lower_modes:
            assert diff.ours in ours and diff.theirs in hf_words(hf, doc), name


def _load_real_assets() -> Tuple[List[str], List[str]]:
    """The real Chinese BERT vocab and every document of the real corpora."""
    files = sorted(glob.glob(REAL_CORPUS_GLOB))
    if not REAL_VOCAB.is_file() or not files:
        pytest.skip(f"real assets not found under {SHARED_ASSETS} "
                    "(opt-in: needs bert_zh/vocab.txt and corpus/*.jsonl)")
    docs = []
    for name in files:
        with open(name, encoding="utf-8") as handle:
            docs += [json.loads(line)["text"] for line in handle if line.strip()]
    return load_vocab(str(REAL_VOCAB)), docs


@pytest.mark.parametrize("lower", [True, False])
def test_parity_with_hf_tokenizers_on_real_assets(lower):
    pytest.importorskip("tokenizers")
    vocab, docs = _load_real_assets()
    assert len(vocab) == 21_128
    hf = make_hf_tokenizer(vocab, lower)
    tok = BertWordPieceTokenizer(vocab, do_lower_case=lower)

    started = time.perf_counter()
    num_tokens = sum(tok.encode(doc, max_seq_length=1 << 30).num_wordpieces for doc in docs)
    elapsed = time.perf_counter() - started
    print(f"\nreal corpus, do_lower_case={lower}: {len(docs)} docs, {num_tokens} "
          f"word pieces in {elapsed:.2f} s ({num_tokens / elapsed:,.0f} pieces/s, cold caches)")

    differing = differing_documents(tok, hf, docs)
    assert differing == [], [docs[i][:200] for i in differing[:5]]


# --------------------------------------------------------------------------
# Vectorised fast path
# --------------------------------------------------------------------------
#
# encode() and tokenize() look code points up in a NumPy table
# and send only runs of non-isolated characters (and whole documents with a
# context-dependent character) through the general path. These tests pin the
# fast path to the naive reference above and to the general path.

EDGE_VOCAB = UNIT_VOCAB + [
    "中", "文", "豈", "\U00020000", "\U0002a6d6", "\U0002f800", ",", "!", ".", "-", "ab",
    "##c", "c", "d", "##d", "cd", "ς", "σ", "α", "ας", "##ς", "\u2e52",
]

# (name, text): the fast path cuts text at isolated characters; these put
# every kind of character next to every other kind.
FAST_PATH_EDGE_CASES = [
    ("empty", ""),
    ("only_space", " \u3000\t\n"),
    ("only_dropped", "\u200b\ufeff\x00"),
    ("pure_cjk", "今天好中文"),
    ("isolated_only", "\U00020000\uf900，。!今\u3000\U0002f800 中"),
    ("cjk_next_to_latin", "ab今cd天ab好Hello今"),
    ("latin_at_both_ends", "hello今天world"),
    ("accents", "Café今naïve天e\u0301le\u0300ve"),
    ("punctuation", "今,天!a.b-c,好。，$100^2"),
    ("punct_inside_word", "a.b.c hello-world"),
    ("dropped_between_cjk", "今\u200b天\ufeff好\x00中"),
    ("dropped_between_latin", "ab\u200bcd a\u00adb"),
    ("dropped_next_to_cjk_and_latin", "ab\u200b今\u200bcd"),
    ("ext_b", "\U00020000今\U0002a6d6a\U00020000b"),
    ("ext_e_start", "x\U0002b820y\U0002b8ff"),
    ("compat_ideographs", "\uf900\uf901a\uf900b\U0002f800"),
    ("lone_surrogate", "今\ud800天a\udfffb"),
    ("line_separator", "今\u2028天a\u2028b\u2029c\x1cd"),
    ("final_sigma", "今ΑΣ天ΑΣ.ΑΣ"),
    ("surviving_combining_mark", "今e\u0301\u0316天\U0001d165\U0001d16d"),
    ("unassigned", "今a\u0378b\ufdd0"),
    ("new_punctuation", "a\u2e52b今\u2e52"),
    ("kana_hangul", "ひらがな今カタカナ안녕"),
    ("fullwidth", "ＡＢＣ１２３今，。"),
    ("emoji", "😀今👍🏽天"),
    ("too_long_word", "今" + "a" * 101 + "天" + "a" * 100),
    ("unknown_cjk", "今日今"),
]


def naive_ids(tok: BertWordPieceTokenizer, text: str, vocab: Sequence[str]) -> List[int]:
    """Word piece ids by the naive reference implementation above."""
    pieces = [p for w in naive_basic_tokenize(text, tok.do_lower_case)
              for p in naive_wordpiece(w, set(vocab))]
    return tok.convert_tokens_to_ids(pieces)


@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("name,text", FAST_PATH_EDGE_CASES,
                         ids=[name for name, _ in FAST_PATH_EDGE_CASES])
def test_fast_path_edge_cases_match_naive_reference(name, text, lower):
    tok = BertWordPieceTokenizer(EDGE_VOCAB, do_lower_case=lower)
    expected = naive_ids(tok, text, EDGE_VOCAB)
    assert tok._piece_ids(text).tolist() == expected, name
    assert tok._text_to_ids(text) == expected, name
    for max_len in {2, 3, len(expected) + 1, len(expected) + 2, len(expected) + 3} - {1}:
        enc = tok.encode(text, max_len)
        assert enc.input_word_ids.tolist() == [2] + expected[:max_len - 2] + [3]
        assert (enc.num_wordpieces, enc.truncated) == (len(expected), len(expected) > max_len - 2)


@pytest.mark.parametrize("lower", [True, False])
def test_fast_path_matches_general_path_on_unicode_sweep(lower):
    """Every swept code point, in a vocabulary that knows it (so a wrong id
    cannot hide behind [UNK]), next to CJK, Latin, space and dropped
    characters, through _piece_ids."""
    points = _sweep_code_points()
    chars = [chr(cp) for cp in points]
    forms = {form for c in chars for form in (c, *c.lower(), *unicodedata.normalize(
        "NFD", c.lower()))}
    vocab = UNIT_VOCAB + sorted(forms - set(UNIT_VOCAB))
    tok = BertWordPieceTokenizer(vocab, do_lower_case=lower)
    contexts = ("今{}天", "a{}b", "{} ", "\u200b{}a")
    docs = ["".join(ctx.format(c) for c in chars[start:start + 256])
            for ctx in contexts for start in range(0, len(chars), 256)]
    for doc in docs:
        assert tok._piece_ids(doc).tolist() == tok._text_to_ids(doc), repr(doc[:40])


def test_fast_path_equals_general_path_on_generated_corpus(corpus, corpus_vocab):
    for lower in (True, False):
        tok = BertWordPieceTokenizer(corpus_vocab, do_lower_case=lower)
        fresh = BertWordPieceTokenizer(corpus_vocab, do_lower_case=lower)
        for doc in corpus:
            assert tok._piece_ids(doc).tolist() == fresh._text_to_ids(doc), repr(doc[:200])


def test_code_point_table_classes_and_pickling():
    tok = make_tokenizer(do_lower_case=True)
    tok.encode("今 aΣ\u200b\uf900", 8)
    table = tok._code_point_table
    assert table[ord("今")] == 21
    assert table[ord(" ")] == tokenization._SPACE
    assert table[ord("a")] == table[ord("\u200b")] == tokenization._RUN
    assert table[ord("Σ")] == tokenization._CONTEXT
    assert table[ord("\uf900")] == 1  # NFD -> U+8C48, not in this vocabulary: [UNK]
    assert table[ord("天")] == tokenization._UNKNOWN  # classified on first sight only
    assert len(pickle.dumps(tok)) < 10_000  # the 4 MB table is not pickled
    cased = make_tokenizer(do_lower_case=False)
    cased.encode("Σ", 8)
    assert cased._code_point_table[ord("Σ")] == tokenization._RUN


def test_run_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(tokenization, "_MAX_CACHED_WORDS", 3)
    tok = make_tokenizer()
    text = "a今b今ab今token今hello今" + "x" * 80
    for _ in range(3):
        assert tok.tokenize(text) == make_tokenizer().tokenize(text)
    assert len(tok._run_cache) <= 3
    assert "x" * 80 not in tok._run_cache  # long runs are not cached


def test_fast_path_equals_general_path_on_real_assets():
    vocab, docs = _load_real_assets()
    tok = BertWordPieceTokenizer(vocab, do_lower_case=True)
    fresh = BertWordPieceTokenizer(vocab, do_lower_case=True)
    for doc in docs[:4096]:
        assert tok._piece_ids(doc).tolist() == fresh._text_to_ids(doc), repr(doc[:200])
