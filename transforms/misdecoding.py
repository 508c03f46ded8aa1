"""Mis-decoding check: one decoded line in, a reason or ``None`` out.

Bytes read with the wrong ``--input_encoding`` do not always fail to
decode: UTF-8 read as GB18030, Big5 read as GBK or UTF-16 read in the wrong
byte order often decode cleanly into real but nonsensical characters
(mojibake).  A line is called mis-decoded when its characters are mostly
unusual for Chinese text and either the same bytes decode, in one of the
encodings people mix up with ours, into text that is almost all common
characters, or the line is overwhelmingly rare, unassigned or private-use
characters.  Lines that are clean in the encoding asked for never go
through the comparison, so a correctly decoded corpus costs two regular
expression scans per line.
"""

from __future__ import annotations

import functools
import re
from typing import Optional

# What the encodings are mixed up with, by the codec a line was decoded
# with.  UTF-8 is never checked: bytes of another encoding essentially
# never form valid UTF-8 text.
ALTERNATIVES = {
    "gb18030": ("utf-8", "big5"),
    "gbk": ("utf-8", "big5"),
    "big5": ("utf-8", "gb18030"),
    "utf-16-le": ("utf-16-be", "utf-8", "gb18030"),
    "utf-16-be": ("utf-16-le", "utf-8", "gb18030"),
}
CODEC_NAMES = {"utf-8": "UTF-8", "gb18030": "GB18030", "gbk": "GBK",
               "big5": "Big5", "utf-16-le": "UTF-16LE",
               "utf-16-be": "UTF-16BE"}
# Start of every mis-decoding reason (the reader counts them per file).
MISDECODED = "text looks mis-decoded"

# Candidates: at least this many unusual characters, at least this share.
_MIN_UNUSUAL = 2
_MIN_SHARE = 0.1
# An alternative decoding convinces when at most this share of its
# characters is unusual, and ours has at least _MIN_SHARE more.
_ALT_MAX_SHARE = 0.1
# Without a convincing alternative: this many rare, unassigned or
# private-use characters making up at least this share.
_ALONE_MIN_COUNT = 8
_ALONE_MIN_SHARE = 0.6

# Blocks ordinary Chinese text uses besides common ideographs: general
# punctuation, CJK symbols and punctuation, full-width forms.
_CORE_BLOCKS = ((0x2000, 0x206F), (0x3000, 0x303F), (0xFF00, 0xFFEF))
# Blocks that are unusual but plausible in real text: letters of the
# world's alphabets (accented Latin and pinyin tones, Greek, Cyrillic,
# Arabic, Thai...), symbols, arrows, enclosed numbers, kana, bopomofo,
# Hangul, CJK compatibility units, small and vertical forms, emoji.  The
# stand-alone rule counts only what lies outside them and the common
# ideographs: rare ideographs, private use, surrogates, presentation forms.
_PLAUSIBLE_BLOCKS = ((0x00A0, 0x1FFF), (0x2000, 0x2BFF), (0x3000, 0x33FF),
                     (0xAC00, 0xD7FF), (0xFE00, 0xFE6F), (0xFF00, 0xFFEF),
                     (0xFFFD, 0xFFFD), (0x1F000, 0x1FAFF))


def _common_ideographs() -> str:
    """The 3,755 level-1 characters of GB2312 and the 5,401 common
    characters of Big5: together the simplified and traditional characters
    that make up nearly all of real Chinese text (built from Python's own
    codecs, so no data file is needed)."""
    chars = set()
    for lead in range(0xB0, 0xD8):
        for trail in range(0xA1, 0xFF):
            try:
                chars.add(bytes((lead, trail)).decode("gb2312"))
            except UnicodeDecodeError:
                pass
    for lead in range(0xA4, 0xC7):
        for trail in (*range(0x40, 0x7F), *range(0xA1, 0xFF)):
            try:
                chars.add(bytes((lead, trail)).decode("big5"))
            except UnicodeDecodeError:
                pass
    return "".join(sorted(chars))


def _ranges(blocks: tuple[tuple[int, int], ...]) -> str:
    return "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                   for a, b in blocks)


@functools.lru_cache(maxsize=1)
def _patterns() -> tuple[re.Pattern, re.Pattern, re.Pattern]:
    """(counted, unusual, rare): counted characters are all but ASCII and
    white space; unusual ones are counted characters outside the common
    ideographs and core blocks; rare ones are outside the common
    ideographs and the plausible blocks."""
    common = re.escape(_common_ideographs())
    counted = re.compile(r"[^\x00-\x7f\s]")
    unusual = re.compile(rf"[^\x00-\x7f\s{_ranges(_CORE_BLOCKS)}{common}]")
    rare = re.compile(rf"[^\x00-\x7f\s{_ranges(_PLAUSIBLE_BLOCKS)}{common}]")
    return counted, unusual, rare


def _unusual(text: str) -> tuple[int, int]:
    """(unusual characters, counted characters) of ``text``."""
    counted, unusual, _ = _patterns()
    return len(unusual.findall(text)), len(counted.findall(text))


def misdecoded(raw: bytes, text: str, codec: str) -> Optional[str]:
    """Why ``text`` (``raw`` decoded with ``codec``) looks mis-decoded, or
    ``None`` when it looks like real text (or ``codec`` is not checked)."""
    if codec not in ALTERNATIVES:
        return None
    unusual, counted = _unusual(text)
    if unusual < _MIN_UNUSUAL or unusual < _MIN_SHARE * counted:
        return None
    share = unusual / counted
    ours = CODEC_NAMES[codec]
    for alternative in ALTERNATIVES[codec]:
        try:
            other = raw.decode(alternative)
        except UnicodeDecodeError:
            continue
        other_unusual, other_counted = _unusual(other)
        if other_counted < 2:
            continue
        other_share = other_unusual / other_counted
        if other_share <= _ALT_MAX_SHARE and \
                share >= other_share + _MIN_SHARE:
            return (f"{MISDECODED} ({unusual} of {counted} characters "
                    f"unusual as {ours}, {other_unusual} of {other_counted} "
                    f"as {CODEC_NAMES[alternative]}), check --input_encoding")
    rare = len(_patterns()[2].findall(text))
    if rare >= _ALONE_MIN_COUNT and rare >= _ALONE_MIN_SHARE * counted:
        return (f"{MISDECODED} ({rare} of {counted} characters rare, "
                f"unassigned or private-use as {ours}), check "
                "--input_encoding")
    return None
