"""A small, randomly initialised Chinese BERT for demos, tests and benchmarks.

The real ``bert_zh_L-12_H-768_A-12`` model is large and needs a download.
The demo model has the same interface and a vocabulary with the same layout
of special tokens, so the whole pipeline (tokenisation, batching, padding,
embedding) can run offline.  Its embeddings are meaningless but
deterministic.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

from model.bert import BertConfig
from model.export import export_bert_saved_model
from model.runtime import default_cache_dir

logger = logging.getLogger(__name__)

# Bump when the demo vocab, config or export format changes, so stale
# cached models are not reused.
DEMO_MODEL_VERSION = 2  # 2: the model returns encoder_outputs too

_SPECIAL_TOKENS = ("[UNK]", "[CLS]", "[SEP]", "[MASK]")
_CJK_PUNCTUATION = "。，、；：？！“”‘’《》〈〉「」『』（）【】…—·～"
_CJK_FIRST, _CJK_LAST = 0x4E00, 0x9FFF
_ASCII_LOWER = "abcdefghijklmnopqrstuvwxyz"
_DIGITS = "0123456789"

# Common lowercase English words and numbers, so latin text in Chinese
# documents tokenises to whole pieces instead of single letters.
_ENGLISH_WORDS = """
the of and to in is you that it he was for on are as with his they at be
this have from or one had by word but not what all were we when your can
said there use an each which she do how their if will up other about out
many then them these so some her would make like him into time has look two
more write go see number no way could people my than first water been call
who its now find long down day did get come made may part new old over
such after back also just only know take year good give most very where
well because any these work life world school still should home here great
big small high low last next same own between under never while again
right left place thing think man woman child men women children help
show tell ask need feel try turn start stop end open close keep let put run
move live play read learn study change point city country state family
group company system program question problem government business market
price money service information data text model language chinese english
china beijing shanghai hong kong taiwan university college student teacher
news media video music movie game phone mobile app online internet web site
page email http https www com org net cn html json xml api url id ok yes
hello hi thanks please sorry love happy free best top real true false null
none test example user users file files code python java javascript google
apple microsoft amazon facebook twitter wechat baidu alibaba tencent huawei
xiaomi iphone android windows linux cloud ai ml bert nlp gpu cpu tv pc usb
wifi app apps pro max mini plus air lite one two three four five six seven
eight nine ten hundred thousand million billion
mr mrs ms dr st vs etc inc ltd co am pm
january february march april may june july august september october
november december monday tuesday wednesday thursday friday saturday sunday
north south east west red blue green black white
00 10 11 12 15 20 24 30 50 100 1000 2000 2008 2010 2015 2018 2019 2020
2021 2022 2023 2024 2025
##ing ##ed ##er ##ers ##est ##ly ##s ##es ##ies ##tion ##tions ##sion
##ment ##ments ##ness ##ful ##less ##able ##ible ##al ##ic ##ical ##ous
##ive ##ize ##ise ##ity ##ism ##ist ##ists ##an ##ian ##en ##on ##in ##ar
##or ##le ##re ##th ##st ##nd ##ng ##ck ##ll ##ss ##te ##ce ##se ##ve ##ty
##ry ##ia ##io ##us ##um ##el ##et ##ow ##ay ##ey ##oo ##ee ##ch ##sh ##ph
##00 ##000
"""


def _ascii_symbols() -> list[str]:
    """Printable ASCII except space and uppercase (the model lower-cases)."""
    return [chr(c) for c in range(0x21, 0x7F) if not chr(c).isupper()]


def _unique_in_order(tokens: list[str]) -> list[str]:
    """Drop repeated tokens, keeping the first occurrence."""
    return list(dict.fromkeys(tokens))


@lru_cache(maxsize=1)
def _demo_vocab_tuple() -> tuple[str, ...]:
    """Build the demo vocab once (it has ~21k entries)."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)]
    tokens += _SPECIAL_TOKENS
    tokens += _ascii_symbols()
    tokens += list(_CJK_PUNCTUATION)
    tokens += [chr(c) for c in range(_CJK_FIRST, _CJK_LAST + 1)]
    tokens += ["##" + c for c in _ASCII_LOWER + _DIGITS]
    tokens += _ENGLISH_WORDS.split()
    return tuple(_unique_in_order(tokens))


def demo_vocab() -> list[str]:
    """The demo vocabulary (deterministic).

    Layout follows the real Chinese BERT vocab: ``[PAD]``=0,
    ``[unused1..99]``=1..99, ``[UNK]``=100, ``[CLS]``=101, ``[SEP]``=102,
    ``[MASK]``=103; then lowercase ASCII symbols, CJK punctuation, every CJK
    Unified Ideograph, ``##`` continuation letters/digits and common English
    words and sub-words.
    """
    return list(_demo_vocab_tuple())


DEMO_CONFIG = BertConfig(
    vocab_size=len(_demo_vocab_tuple()),
    hidden_size=128,
    num_layers=2,
    num_heads=2,
    intermediate_size=512,
    max_position_embeddings=512,
)


def _demo_model_dir(cache_dir: str) -> str:
    """Versioned location of the demo SavedModel inside ``cache_dir``."""
    cfg = DEMO_CONFIG
    name = (f"demo_bert_L{cfg.num_layers}_H{cfg.hidden_size}"
            f"_v{DEMO_MODEL_VERSION}")
    return os.path.join(cache_dir, name)


def _is_saved_model(path: str) -> bool:
    """Whether ``path`` holds a complete export (written atomically)."""
    return os.path.isfile(os.path.join(path, "saved_model.pb"))


def _reuse(path: str) -> str:
    """Return an existing demo model, refusing a directory that is not one."""
    if not _is_saved_model(path):
        raise RuntimeError(
            f"{path} exists but is not a SavedModel; delete it to rebuild "
            "the demo model")
    logger.info("Reusing cached demo BERT model at %s", path)
    return path


def ensure_demo_model(cache_dir: str | None = None) -> str:
    """Return the path of the demo SavedModel, building it on first use.

    Safe under concurrency: the export is renamed into place atomically, and
    a process that loses the race simply reuses the winner's model.
    """
    path = _demo_model_dir(cache_dir or default_cache_dir())
    if os.path.exists(path):
        return _reuse(path)
    logger.info("Building demo BERT model at %s", path)
    try:
        export_bert_saved_model(path, DEMO_CONFIG, demo_vocab(),
                                do_lower_case=True, seed=0)
    except FileExistsError:
        return _reuse(path)
    logger.info("Built demo BERT model at %s", path)
    return path
