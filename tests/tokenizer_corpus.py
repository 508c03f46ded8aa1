"""Deterministic test corpus and vocabulary for tokenizer parity tests.

``build_tokenizer_test_corpus`` mixes hand-picked edge cases with generated
documents that combine the kinds of text the pipeline can meet: simplified and
traditional Chinese, full-width forms, Chinese mixed with English and numbers,
URLs and e-mail addresses, accented Latin, kana, hangul, emoji and symbols,
control / zero-width characters, unusual whitespace, over-long words, empty and
very long documents.

``build_test_vocab`` builds a small vocabulary laid out like the real Chinese
BERT one (same special-token ids) whose gaps are chosen so that greedy
WordPiece matching, ``##`` continuations and ``[UNK]`` fallbacks all happen.

Everything is a pure function of its arguments (``random.Random(seed)`` and
code-point arithmetic, never ``hash()``), so failures are reproducible.
"""

from __future__ import annotations

import random
import unicodedata
from typing import Callable, Dict, Iterable, List

# --------------------------------------------------------------------------
# Character and word pools
# --------------------------------------------------------------------------

SIMPLIFIED = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发"
    "年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如"
    "水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然"
    "前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但"
    "质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五"
    "果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组"
    "见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处府思酒店房间服"
    "务早餐价格环境交通方便干净舒适推荐满意失望质量快递书作者故事手机屏幕电池系统"
)

TRADITIONAL = (
    "們說國東車門開關時長書語學經體發會處點來對過還這個為後聽見買賣電話線愛與實應"
    "當現豐龍鳥魚馬風雲雙質歷區醫藥價聯網絡軟體資訊臺灣廣場飛機麵條鐵路"
)

# Rare ideographs from the extension blocks and compatibility blocks that the
# reference still treats as CJK (each becomes its own word). All of them are
# assigned since Unicode 11, so Python 3.8+ does not see them as unassigned.
RARE_CJK = (
    "\u3400\u3401\u4db5"  # Extension A
    "\u9fa5\u9fcc\u9fea\u9fef"  # late additions to the main block
    "\U00020000\U00020001\U0002a6d6"  # Extension B
    "\U0002a700\U0002b734"  # Extension C
    "\U0002b740\U0002b81d"  # Extension D
    "\U0002b920\U0002cea1"  # Extension E (part that `tokenizers` also splits)
    "\uf900\uf901\ufa0e\ufa30"  # CJK compatibility ideographs (NFD -> unified)
    "\U0002f800\U0002f801"  # compatibility supplement
)

CJK_PUNCTUATION = "，。、；：？！「」『』《》【】（）〈〉—…·～“”‘’〔〕"

FULLWIDTH = (
    "ＡＢＣＤＥＦＧｘｙｚ０１２３４５６７８９"
    "！＂＃＄％＆＇（）＊＋，－．／：；＜＝＞？＠［＼］＾＿｀｛｜｝～￥￡￠"
)

ENGLISH_WORDS = (
    "the", "and", "of", "BERT", "Token", "tokenization", "tokenizer", "unaffable",
    "Apache", "Beam", "pipeline", "embedding", "Google", "Python", "hello", "World",
    "iPhone", "WiFi", "OK", "data", "Dataflow", "TensorFlow", "model", "NLP",
    "pretrained", "quick", "brown", "fox", "jumps", "lazy", "dog", "xylophone",
    "zebra", "queue", "quiz", "New", "York", "USB", "CPU", "GPU", "app", "Ok", "wow",
)

ACCENTED_WORDS = (
    "café", "Ångström", "naïve", "résumé", "jalapeño", "Straße", "façade", "Zürich",
    "São", "Dvořák", "Łódź", "Œuvre", "Crème", "brûlée", "Ærø", "Español", "Ελλάδα",
    "Москва", "coöperate", "e\u0301te\u0301",  # decomposed input (e + U+0301)
)

KANA_WORDS = (
    "ひらがな", "カタカナ", "こんにちは", "ありがとう", "トークン", "ラーメン", "すし",
    "ｶﾀｶﾅ", "ﾃﾞｰﾀ", "ヴァイオリン", "がぎぐげご",
)

HANGUL_WORDS = ("안녕하세요", "한국어", "서울", "감사합니다", "토큰", "가")

EMOJI_AND_SYMBOLS = (
    "😀", "😂", "👍", "👍🏽", "👨\u200d👩\u200d👧", "❤\ufe0f", "🇨🇳", "🥰", "🤖",
    "©", "®", "™", "∑", "∞", "≈", "±", "€", "£", "¥", "→", "★", "♪", "°C", "‰",
    "①", "Ⅻ", "½", "²", "µ", "§", "¶",
)

URLS = (
    "https://www.example.com/path?q=中文&lang=zh-CN#top",
    "http://test.org/a_b-c/d.html",
    "www.baidu.com",
    "ftp://files.example.net/pub/data.tar.gz",
    "https://zh.wikipedia.org/wiki/BERT_(语言模型)",
)

EMAILS = ("user.name+tag@example.com", "zhang_san@163.com", "Info@Example.CN")

# Every character above is assigned since Unicode 13 at the latest, so that
# Python 3.10+ (whose unicodedata decides what is "unassigned") agrees.

# Control, format (zero-width) and other characters the cleaning step drops.
DROPPED_CHARS = (
    "\x00", "\x01", "\x07", "\x1b", "\x7f", "\x85", "\u00ad", "\u200b", "\u200c",
    "\u200d", "\u200e", "\u2060", "\ufeff", "\ufffd", "\ue000", "\U000e0001",
)

# Characters that become (or act as) a word separator.
ODD_WHITESPACE = (
    "\u3000", "\u00a0", "\u2003", "\u2009", "\u202f", "\u205f", "\u1680", "\t", "\n",
    "\r", "\r\n", "\x0b", "\x0c", "\u2028", "\u2029",
)

# Documents on which HF `tokenizers` (configured as BERT) knowingly differs
# from the reference FullTokenizer. The parity test lists the reasons; the
# generator below never produces these characters, so these are the only
# documents where a difference is expected.
HF_DIVERGENCE_DOCS: Dict[str, str] = {
    # U+2B820..U+2B91F: in the reference's CJK ranges, not in tokenizers'.
    "ext_e_start": "古籍中的\U0002b820字与x\U0002b8ffy写法",
    # Python's str.lower() applies the Final_Sigma rule.
    "final_sigma": "希腊语 ΟΔΥΣΣΕΥΣ 和 ΣΟΦΙΑ",
    # Unassigned code points (category Cn) are "C*" and dropped by the reference.
    "unassigned": "未分配码位a\u0378b和c\ufdd0d",
    # Punctuation added to Unicode after the tables `tokenizers` uses.
    "new_punctuation": "新标点a\u2e52b\u2e43c",
}

# Hand-picked documents (besides the divergence ones above).
HAND_PICKED: List[str] = [
    "",
    " ",
    "\u3000\u3000",
    "\t\n\r \u00a0\u2003",
    "\u200b\u200d\ufeff",
    "\x00\x01\x7f",
    "今天天气很好。",
    "我們說國語。",
    "BERT模型在NLP任务中表现很好！",
    "价格是¥199.99元，打8.5折，约合$27.5。",
    "ＢＥＲＴ模型２０２４年发布！",
    "联系邮箱：user.name+tag@example.com，网址：https://www.example.com/a?b=c&d=e",
    "café Ångström naïve",
    "CAFÉ ÅNGSTRÖM NAÏVE",
    "e\u0301le\u0300ve",
    "ひらがなとカタカナ",
    "안녕하세요 세계",
    "我爱你❤\ufe0f😀👍🏽👨\u200d👩\u200d👧🇨🇳",
    "$100^2 `code` a+b=c <tag> x|y ~z",
    "unaffable unaffableness tokenization",
    "a" * 100,
    "a" * 101,
    "b" * 150 + " 正常 " + "c" * 99,
    "e\u0301" * 60,
    "x" * 99 + "é",
    "中\u200b文\u200d字\ufeff符",
    "第一行\n第二行\r\n第三行\t制表",
    "[CLS] [SEP] [UNK] [MASK] [PAD]",
    "Hello,World!How are you?I'm fine.",
    "１２３，４５６。７８９！",
    "……——“引号”‘单引号’《书名》【标签】",
    "\U00020000\U0002a700\U0002b740\U0002b920\uf900\U0002f800",
    "ﬁﬂ ﬃ ½ ² Ⅻ ① ™",
    "İstanbul ǅungla ǈ ß ẞ",
    "Ⓐⓑ ＠＃＄％",
    "a\u2028b\u2029c",
    "数字123abc456def",
    "CamelCaseWord mixedCASE UPPER lower",
    "unmatchable qzx words here",
]


# --------------------------------------------------------------------------
# Generated documents
# --------------------------------------------------------------------------


def _chinese_run(rng: random.Random, pool: str, low: int, high: int) -> str:
    """Random Chinese characters with occasional CJK punctuation."""
    chars = []
    for _ in range(rng.randint(low, high)):
        roll = rng.random()
        if roll < 0.08:
            chars.append(rng.choice(CJK_PUNCTUATION))
        elif roll < 0.1:
            chars.append(rng.choice(RARE_CJK))
        else:
            chars.append(rng.choice(pool))
    return "".join(chars)


def _english_word(rng: random.Random) -> str:
    """An English word, sometimes upper-cased or with random letters."""
    roll = rng.random()
    if roll < 0.7:
        word = rng.choice(ENGLISH_WORDS)
    else:
        letters = "abcdefghijklmnopqrstuvwxyz"
        word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 12)))
    if rng.random() < 0.15:
        word = word.upper()
    return word


def _number(rng: random.Random) -> str:
    """Integers, decimals, percentages, dates, phone numbers."""
    kind = rng.randrange(6)
    if kind == 0:
        return str(rng.randint(0, 10 ** rng.randint(1, 9)))
    if kind == 1:
        return f"{rng.uniform(0, 1000):.{rng.randint(1, 3)}f}"
    if kind == 2:
        return f"{rng.randint(0, 100)}%"
    if kind == 3:
        return f"{rng.randint(1990, 2030)}年{rng.randint(1, 12)}月{rng.randint(1, 28)}日"
    if kind == 4:
        return f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return f"1{rng.randint(3, 9)}{rng.randint(0, 999999999):09d}"


def _long_word(rng: random.Random) -> str:
    """A letter/digit run around the 100-character WordPiece limit."""
    alphabet = rng.choice(("abcdefghij", "0123456789", "aeiouéè", "ab"))
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(95, 130)))


def _fullwidth_run(rng: random.Random) -> str:
    """A few full-width letters, digits or punctuation characters."""
    return "".join(rng.choice(FULLWIDTH) for _ in range(rng.randint(1, 6)))


def _segment_makers() -> List[Callable[[random.Random], str]]:
    """Functions producing one segment each, picked at random per segment."""
    return [
        lambda r: _chinese_run(r, SIMPLIFIED, 2, 40),
        lambda r: _chinese_run(r, SIMPLIFIED, 2, 40),
        lambda r: _chinese_run(r, SIMPLIFIED, 2, 40),
        lambda r: _chinese_run(r, TRADITIONAL, 2, 20),
        _english_word,
        _english_word,
        _number,
        _fullwidth_run,
        lambda r: r.choice(URLS),
        lambda r: r.choice(EMAILS),
        lambda r: r.choice(ACCENTED_WORDS),
        lambda r: r.choice(KANA_WORDS),
        lambda r: r.choice(HANGUL_WORDS),
        lambda r: r.choice(EMOJI_AND_SYMBOLS),
        lambda r: r.choice(CJK_PUNCTUATION),
        lambda r: r.choice("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
    ]


def _separator(rng: random.Random) -> str:
    """Usually nothing or a space; sometimes odd whitespace or dropped chars."""
    roll = rng.random()
    if roll < 0.45:
        return ""
    if roll < 0.8:
        return " "
    if roll < 0.92:
        return rng.choice(ODD_WHITESPACE)
    return rng.choice(DROPPED_CHARS)


def _generated_document(
    rng: random.Random, makers: List[Callable[[random.Random], str]], num_segments: int
) -> str:
    """Concatenate random segments with random separators."""
    parts = []
    for _ in range(num_segments):
        parts.append(rng.choice(makers)(rng))
        parts.append(_separator(rng))
    if rng.random() < 0.03:
        parts.insert(rng.randrange(len(parts) + 1), _long_word(rng))
    return "".join(parts)


def build_tokenizer_test_corpus(seed: int = 0) -> List[str]:
    """Return >= 2,000 deterministic documents covering tokenizer edge cases.

    Hand-picked documents come first (including ``HF_DIVERGENCE_DOCS``), then
    generated ones: mostly short mixed documents, some single-script ones and a
    few very long ones (tens of thousands of characters).
    """
    rng = random.Random(seed)
    makers = _segment_makers()
    docs: List[str] = list(HAND_PICKED) + list(HF_DIVERGENCE_DOCS.values())
    for _ in range(2_200):
        docs.append(_generated_document(rng, makers, rng.randint(1, 12)))
    for _ in range(150):  # Chinese-only, like most real input
        docs.append(_chinese_run(rng, SIMPLIFIED + TRADITIONAL, 1, 300))
    for _ in range(6):  # very long documents
        docs.append(_generated_document(rng, makers, rng.randint(800, 2_500)))
    return docs


# --------------------------------------------------------------------------
# Test vocabulary
# --------------------------------------------------------------------------

SPECIAL_TOKENS = (
    ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
)

# Multi-character entries so that greedy longest-match has choices to make.
WORD_ENTRIES = (
    "the", "and", "of", "bert", "token", "##izer", "##ization", "##iz", "##ize", "##s",
    "##ed", "##ing", "##er", "un", "##aff", "##able", "##ness", "apache", "beam",
    "pipe", "##line", "embed", "##ding", "google", "py", "##thon", "hello", "world",
    "##ld", "data", "##flow", "tensor", "model", "nlp", "pre", "##train", "##ed",
    "quick", "brown", "fox", "jump", "lazy", "dog", "new", "york", "http", "https",
    "www", "com", "example", "##ample", "mail", "cafe", "##fe", "caf", "na", "##ive",
    "20", "##20", "##00", "100", "##99", "2024", "wifi", "ok", "app", "iphone",
    "ang", "##str", "##om", "##strom", "cn", "org", "html", "baidu",
    "ο", "##δυσσευ", "##σ", "##ς",  # final vs. non-final sigma give different ids
)

# Letters whose "##" continuation is left out, so words with them inside fall
# back to [UNK] (the whole word, not just that piece).
_NO_CONTINUATION = set("qxz")


def _keep(char: str, modulus: int) -> bool:
    """Deterministically drop about 1/modulus of characters from the vocab."""
    return (ord(char) * 2_654_435_761) % 1_000_003 % modulus != 0


def _vocab_char_forms(char: str) -> Iterable[str]:
    """The forms a corpus character can take after either casing mode."""
    yield char
    lowered = char.lower()
    yield from lowered
    for piece in unicodedata.normalize("NFD", lowered):
        if unicodedata.category(piece) != "Mn":
            yield piece


def build_test_vocab(corpus: Iterable[str]) -> List[str]:
    """Build a deterministic WordPiece vocabulary for ``corpus``.

    Layout: the Chinese BERT specials at ids 0..103, then ASCII punctuation,
    digits, lower-case letters and their ``##`` continuations (except q, x, z),
    multi-character English entries, and about 90% of the other characters
    seen in the corpus (about half of the non-CJK ones also as ``##`` pieces).
    Nothing is upper-case apart from the specials.
    """
    entries: List[str] = list(SPECIAL_TOKENS)
    ascii_punct = [chr(c) for c in range(33, 127) if not chr(c).isalnum()]
    entries += ascii_punct
    alnum = "0123456789abcdefghijklmnopqrstuvwxyz"
    entries += list(alnum)
    entries += ["##" + c for c in alnum if c not in _NO_CONTINUATION]
    entries += list(WORD_ENTRIES)

    seen = sorted({form for doc in corpus for ch in set(doc) for form in _vocab_char_forms(ch)})
    for char in seen:
        category = unicodedata.category(char)
        if category[0] in "CZ" or char.lower() != char or char.isspace():
            continue
        if _keep(char, 10):
            entries.append(char)
        if not _is_ideograph(char) and _keep(char, 2):
            entries.append("##" + char)

    unique = list(dict.fromkeys(entries))
    assert all(t == t.lower() for t in unique[len(SPECIAL_TOKENS):])
    return unique


def _is_ideograph(char: str) -> bool:
    """True for characters named as CJK ideographs (always their own word)."""
    return unicodedata.name(char, "").startswith("CJK ")
