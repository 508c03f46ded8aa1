"""Pure-Python BERT WordPiece tokenizer for the Chinese BERT model.

The behaviour follows Google BERT's reference ``FullTokenizer`` (a
``BasicTokenizer`` followed by a ``WordpieceTokenizer``), so that the token ids
fed to the model are the ones it was trained with:

1. Cleaning: U+0000, U+FFFD and control characters (any Unicode category
   starting with ``C``, except ``\\t``, ``\\n`` and ``\\r``) are dropped;
   whitespace (space, ``\\t``, ``\\n``, ``\\r`` and category ``Zs``) becomes a
   plain space. (This is the released reference; a later upstream revision
   narrowed "control" to ``Cc``/``Cf``, which only matters for unassigned,
   private-use and surrogate code points.)
2. Every CJK ideograph (the exact code point ranges of the reference) gets a
   space on both sides, so each one becomes its own word.
3. The text is split on whitespace. With ``do_lower_case`` each word is
   lower-cased, NFD-normalised and stripped of combining marks (``Mn``).
4. Punctuation (ASCII symbols plus Unicode ``P*``) is split off, one token per
   character.
5. WordPiece: greedy longest-match-first against the vocabulary, ``##`` prefix
   for non-initial pieces; a word longer than ``max_chars_per_word`` characters
   or with an unmatchable position becomes a single ``[UNK]``.

Implementation notes (why it is fast enough in pure Python): instead of walking
the text character by character, the BasicTokenizer steps are one C-level
``str.translate`` over the whole document followed by ``str.split``. Each
character's translation (drop, space, `` c `` for CJK and punctuation, its
lower-cased accent-stripped form) is computed once, the first time it is seen.
That equals the reference's per-word processing because whitespace is neither
cased nor case-ignorable and NFD never reorders across a starter, with two
exceptions that are handled by running the steps in the reference's order
over the whole text instead: a capital sigma (``str.lower`` applies the
final-sigma rule) and marks that survive accent stripping but have a non-zero
combining class (NFD may reorder them). WordPiece results are cached per word.
Both caches are bounded and are not pickled.

On top of that, ``encode`` and ``tokenize`` take a
vectorised fast path. Most characters of Chinese text are "isolated": their
translation starts and ends with a space (CJK ideographs, punctuation) or is
a space (whitespace), so they never join a neighbour into a word and their
word pieces do not depend on context. A NumPy table maps every code point
seen so far to its class: the single word piece id of an isolated character,
"nothing" for whitespace, "run" for everything else (letters, digits, kana,
dropped characters, isolated characters with several pieces) and "context
dependent" (see above). A document is read as UTF-32 code points and looked up
in the table in one step; only maximal runs of "run" characters go through the
general path (translate, split, cached WordPiece; cached per run too), and a
document holding a context-dependent character goes through it as a whole.
Cutting the text at isolated characters does not change the words, because
``str.split`` never joins across the spaces that such a character's
translation starts and ends with.
"""

from __future__ import annotations

import unicodedata
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple

import numpy as np

UNK_TOKEN = "[UNK]"
CLS_TOKEN = "[CLS]"
SEP_TOKEN = "[SEP]"
CONTINUATION_PREFIX = "##"

# Code point ranges the reference treats as CJK ideographs (inclusive).
# Kana, hangul and CJK punctuation are deliberately not in here.
CJK_RANGES: Tuple[Tuple[int, int], ...] = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)

# ASCII code point ranges counted as punctuation although some of them are
# symbols in Unicode ($, +, <, =, >, ^, `, |, ~).
_ASCII_PUNCT_RANGES: Tuple[Tuple[int, int], ...] = (
    (33, 47),
    (58, 64),
    (91, 96),
    (123, 126),
)

# Bounds for the lazily filled caches; when one is full it is simply cleared
# (cheap, and real text re-fills the hot entries within a few documents).
_MAX_CACHED_CHARS = 200_000
_MAX_CACHED_WORDS = 100_000
# Runs longer than this are not cached (they rarely repeat).
_MAX_CACHED_RUN_CHARS = 64

# Code point classes in the fast-path table; ids (>= 0) are isolated
# characters with exactly one word piece. The order matters: one ``min()``
# over a document's classes tells which path it needs.
_UNKNOWN = -4  # not classified yet
_CONTEXT = -3  # context dependent: the whole document takes the general path
_RUN = -2  # part of a run that the general path tokenizes
_SPACE = -1  # isolated and yields no word piece (whitespace)
_NUM_CODE_POINTS = 0x110000


# --------------------------------------------------------------------------
# Character classification (reference rules)
# --------------------------------------------------------------------------


def is_cjk_char(char: str) -> bool:
    """Return True if ``char`` is in one of the reference's CJK ranges."""
    code = ord(char)
    return any(low <= code <= high for low, high in CJK_RANGES)


def is_whitespace(char: str) -> bool:
    """Return True for characters the cleaning step turns into a space."""
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def is_control(char: str) -> bool:
    """Return True for characters the cleaning step drops as control.

    Tab, newline and carriage return are category ``Cc`` but count as
    whitespace instead.
    """
    if char in "\t\n\r":
        return False
    return unicodedata.category(char).startswith("C")


def is_punctuation(char: str) -> bool:
    """Return True for characters split off as single-character tokens."""
    code = ord(char)
    if any(low <= code <= high for low, high in _ASCII_PUNCT_RANGES):
        return True
    return unicodedata.category(char).startswith("P")


# Marker returned by a classifier for a character whose treatment depends on
# its neighbours; a document containing one takes the multi-pass path.
_CONTEXT_DEPENDENT = object()


def _cleaning_replacement(char: str) -> Optional[str]:
    """Cleaning and CJK spacing of one character; None when it stays as is.

    The empty string means "drop". Used by the multi-pass path, whose later
    pass handles case, accents and punctuation.
    """
    if _is_dropped(char):
        return ""
    if is_whitespace(char):
        return " "
    if is_cjk_char(char):
        return f" {char} "
    return None


def _is_dropped(char: str) -> bool:
    """True for characters the cleaning step removes (NUL, U+FFFD, control)."""
    return char in ("\x00", "\ufffd") or is_control(char)


def _post_nfd_replacement(char: str) -> Optional[str]:
    """Accent stripping and punctuation spacing after lower-casing and NFD."""
    if unicodedata.category(char) == "Mn":
        return ""
    if is_punctuation(char):
        return f" {char} "
    return None


def _cased_replacement(char: str) -> Optional[str]:
    """The whole BasicTokenizer effect on one character without lower-casing."""
    replacement = _cleaning_replacement(char)
    if replacement is None and is_punctuation(char):
        return f" {char} "
    return replacement


def _lowercasing_replacement(char: str) -> object:
    """The whole BasicTokenizer effect on one character with lower-casing.

    Lower-casing then NFD of a word equals doing it per character, except for
    (a) the final-sigma rule of ``str.lower`` and (b) canonical reordering of
    combining marks. Reordering only matters for marks that survive accent
    stripping (non-``Mn`` marks with a non-zero combining class), so such
    characters, and capital sigma, are reported as context dependent.
    """
    if _is_dropped(char):
        return ""
    if is_whitespace(char):
        return " "
    if char == "\u03a3":  # GREEK CAPITAL LETTER SIGMA: final-sigma rule
        return _CONTEXT_DEPENDENT
    decomposed = unicodedata.normalize("NFD", char.lower())
    parts = []
    for piece in decomposed:
        if unicodedata.category(piece) == "Mn":
            continue
        if unicodedata.combining(piece):
            return _CONTEXT_DEPENDENT
        parts.append(f" {piece} " if is_punctuation(piece) else piece)
    result = "".join(parts)
    if is_cjk_char(char):
        result = f" {result} "
    return None if result == char else result


class _LazyTranslation:
    """A ``str.translate`` table filled on demand for the characters seen.

    ``str.translate`` runs in C, but it needs the mapping up front; computing
    it for all 1.1M code points would cost start-up time, so the entries are
    computed the first time a character shows up in a document. The classifier
    returns the replacement, None (keep), or ``_CONTEXT_DEPENDENT``.
    """

    def __init__(self, classify: Callable[[str], object]) -> None:
        self._classify = classify
        self._seen: Set[str] = set()
        self._context_dependent: Set[str] = set()
        self._table: Dict[int, str] = {}

    def apply(self, text: str) -> Optional[str]:
        """Translate ``text``; None if it holds a context-dependent character."""
        chars = set(text)
        new_chars = chars.difference(self._seen)
        if new_chars:
            self._learn(new_chars, chars)
        if self._context_dependent and not self._context_dependent.isdisjoint(chars):
            return None
        return text.translate(self._table) if self._table else text

    def _learn(self, new_chars: Set[str], all_chars: Set[str]) -> None:
        """Classify characters not seen before, clearing the cache when full."""
        if len(self._seen) + len(new_chars) > _MAX_CACHED_CHARS:
            self._seen.clear()
            self._context_dependent.clear()
            self._table.clear()
            new_chars = all_chars
        for char in new_chars:
            replacement = self._classify(char)
            if replacement is _CONTEXT_DEPENDENT:
                self._context_dependent.add(char)
            elif replacement is not None:
                self._table[ord(char)] = replacement
        self._seen.update(new_chars)


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


class Encoded(NamedTuple):
    """Model input for one document (no padding)."""

    input_word_ids: np.ndarray  # int32 [num_tokens]: [CLS] ... [SEP]
    num_tokens: int  # len(input_word_ids), including [CLS] and [SEP]
    truncated: bool  # True if word pieces were dropped to fit max_seq_length
    num_wordpieces: int  # word pieces before truncation, excluding CLS/SEP


class BertWordPieceTokenizer:
    """Reference-compatible BERT tokenizer (BasicTokenizer + WordPiece).

    Picklable: only the vocabulary and the settings are pickled, the caches are
    rebuilt lazily after unpickling (Beam pickles DoFns holding this object).
    """

    def __init__(
        self,
        vocab: Sequence[str],
        do_lower_case: bool = True,
        max_chars_per_word: int = 100,
    ) -> None:
        self._vocab: List[str] = list(vocab)
        self._do_lower_case = bool(do_lower_case)
        self._max_chars_per_word = int(max_chars_per_word)
        self._token_to_id = _index_vocab(self._vocab)
        self._unk_id = self._token_to_id[UNK_TOKEN]
        self._cls_id = self._token_to_id[CLS_TOKEN]
        self._sep_id = self._token_to_id[SEP_TOKEN]
        self._max_token_chars = max((len(t) for t in self._token_to_id), default=0)
        self._cls_array = np.array([self._cls_id], dtype=np.int32)
        self._sep_array = np.array([self._sep_id], dtype=np.int32)
        self._reset_caches()

    # -- pickling ----------------------------------------------------------

    def __getstate__(self) -> dict:
        """Pickle only what defines the tokenizer, not the caches."""
        return {
            "vocab": self._vocab,
            "do_lower_case": self._do_lower_case,
            "max_chars_per_word": self._max_chars_per_word,
        }

    def __setstate__(self, state: dict) -> None:
        """Rebuild lookup tables and empty caches from the pickled settings."""
        self.__init__(  # pylint: disable=unnecessary-dunder-call
            state["vocab"], state["do_lower_case"], state["max_chars_per_word"]
        )

    def _reset_caches(self) -> None:
        """Create empty per-character, per-word and per-run caches."""
        if self._do_lower_case:
            self._classify = _lowercasing_replacement
        else:
            self._classify = _cased_replacement
        self._single_pass = _LazyTranslation(self._classify)
        self._cleaning_pass = _LazyTranslation(_cleaning_replacement)
        self._post_nfd_pass = _LazyTranslation(_post_nfd_replacement)
        self._word_cache: Dict[str, Tuple[int, ...]] = {}
        self._run_cache: Dict[str, np.ndarray] = {}
        # Allocated on first use: 4.4 MB that tokenizers used only for
        # basic_tokenize() never need.
        self._code_point_table: Optional[np.ndarray] = None

    # -- public API --------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of vocabulary entries (= rows of the embedding table)."""
        return len(self._vocab)

    @property
    def do_lower_case(self) -> bool:
        """Whether text is lower-cased and accent-stripped before WordPiece."""
        return self._do_lower_case

    def tokenize(self, text: str) -> List[str]:
        """Split ``text`` into word piece strings (no [CLS]/[SEP])."""
        vocab = self._vocab
        return [vocab[i] for i in self._piece_ids(text).tolist()]

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> List[int]:
        """Map token strings to ids; raises KeyError for unknown tokens."""
        lookup = self._token_to_id
        try:
            return [lookup[token] for token in tokens]
        except KeyError as err:
            raise KeyError(f"token not in vocabulary: {err.args[0]!r}") from None

    def encode(self, text: str, max_seq_length: int) -> Encoded:
        """Tokenize into ``[CLS] pieces[:max_seq_length-2] [SEP]`` (no padding)."""
        _check_max_seq_length(max_seq_length)
        piece_ids = self._piece_ids(text)
        num_pieces = len(piece_ids)
        kept = min(num_pieces, max_seq_length - 2)
        ids = np.concatenate((self._cls_array, piece_ids[:kept], self._sep_array))
        return Encoded(
            input_word_ids=ids,
            num_tokens=kept + 2,
            truncated=num_pieces > kept,
            num_wordpieces=num_pieces,
        )

    def basic_tokenize(self, text: str) -> List[str]:
        """Run the BasicTokenizer steps (clean, split CJK, case, punctuation)
        and return the words that WordPiece gets, e.g. for debugging.

        Usually one translation pass does everything (see
        ``_lowercasing_replacement``); documents with context-dependent
        characters run the reference's order of steps over the whole text.
        """
        translated = self._single_pass.apply(text)
        if translated is None:
            translated = self._multi_pass(text)
        return translated.split()

    # -- internals: vectorised fast path ------------------------------------

    def _piece_ids(self, text: str) -> np.ndarray:
        """Word piece ids of one document (int32), via the code point table."""
        classes, low = self._classes(text)
        if low == _RUN:
            return self._splice_runs(text, classes)
        if low == _CONTEXT:
            return np.array(self._text_to_ids(text), dtype=np.int32)
        return classes[classes >= 0]  # only isolated characters: most Chinese text

    def _classes(self, text: str) -> Tuple[np.ndarray, int]:
        """The table entry of each code point of ``text`` (a fresh array), and
        the smallest entry (which tells the path), 0 for empty text.

        Code points not seen before are classified first. UTF-32 with
        ``surrogatepass`` gives one unit per Python character, lone
        surrogates included, so indices match ``str`` indices.
        """
        table = self._code_point_table
        if table is None:
            table = self._code_point_table = np.full(_NUM_CODE_POINTS, _UNKNOWN, np.int32)
        code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
        classes = table.take(code_points)
        low = int(classes.min()) if len(classes) else 0
        if low == _UNKNOWN:
            for code_point in np.unique(code_points[classes == _UNKNOWN]).tolist():
                table[code_point] = self._code_point_class(chr(code_point))
            classes = table.take(code_points)
            low = int(classes.min())
        return classes, low

    def _code_point_class(self, char: str) -> int:
        """Table entry for one character: its piece id if isolated, or a class.

        Isolated means the character's translation starts and ends with a
        space, so its words (and pieces) never depend on its neighbours.
        """
        replacement = self._classify(char)
        if replacement is _CONTEXT_DEPENDENT:
            return _CONTEXT
        if not isinstance(replacement, str) or not replacement:
            return _RUN  # kept as is, or dropped: joins its neighbours
        if replacement == " ":
            return _SPACE
        if not (replacement[0] == " " and replacement[-1] == " "):
            return _RUN
        pieces = [i for word in replacement.split() for i in self._cached_wordpiece(word)]
        return pieces[0] if len(pieces) == 1 else _RUN

    def _splice_runs(
        self, text: str, classes: np.ndarray
    ) -> np.ndarray:
        """Piece ids of ``text`` with each run tokenized by the general path.

        Runs are maximal stretches of ``_RUN`` characters. The classes between runs
        and the runs' piece ids are concatenated in order, then everything
        that is not a piece id (``_SPACE``) is dropped in one step.
        """
        is_run = classes == _RUN
        bounds = (np.flatnonzero(is_run[1:] != is_run[:-1]) + 1).tolist()
        if is_run[0]:
            bounds.insert(0, 0)
        if is_run[-1]:
            bounds.append(len(classes))
        starts = bounds[0::2]
        parts: List[np.ndarray] = []
        previous = 0
        for start, end in zip(starts, bounds[1::2]):
            parts += (classes[previous:start], self._run_ids(text[start:end]))
            previous = end
        parts.append(classes[previous:])
        joined = np.concatenate(parts)
        return joined[joined >= 0]

    def _run_ids(self, run: str) -> np.ndarray:
        """General-path piece ids of one run (int32), cached for short runs."""
        pieces = self._run_cache.get(run)
        if pieces is None:
            pieces = np.array(self._text_to_ids(run), dtype=np.int32)
            if len(run) <= _MAX_CACHED_RUN_CHARS:
                if len(self._run_cache) >= _MAX_CACHED_WORDS:
                    self._run_cache.clear()
                self._run_cache[run] = pieces
        return pieces

    # -- internals: general path -------------------------------------------

    def _multi_pass(self, text: str) -> str:
        """Clean + CJK spacing, lower-case, NFD, then accents + punctuation."""
        cleaned = self._cleaning_pass.apply(text)
        assert cleaned is not None  # these classifiers are never context dependent
        decomposed = unicodedata.normalize("NFD", cleaned.lower())
        result = self._post_nfd_pass.apply(decomposed)
        assert result is not None
        return result

    def _text_to_ids(self, text: str) -> List[int]:
        """Basic tokenization followed by cached WordPiece, as flat ids.

        This is the general path; the fast path must always equal it.
        """
        ids: List[int] = []
        for word in self.basic_tokenize(text):
            ids += self._cached_wordpiece(word)
        return ids

    def _cached_wordpiece(self, word: str) -> Tuple[int, ...]:
        """``_wordpiece`` through the bounded per-word cache."""
        cache = self._word_cache
        pieces = cache.get(word)
        if pieces is None:
            pieces = self._wordpiece(word)
            if len(cache) >= _MAX_CACHED_WORDS:
                cache.clear()
            cache[word] = pieces
        return pieces

    def _wordpiece(self, word: str) -> Tuple[int, ...]:
        """Greedy longest-match-first split of one word into vocabulary ids.

        A word that is too long, or that has a position no vocabulary entry
        matches, becomes a single [UNK] (never a partial split).
        """
        if len(word) > self._max_chars_per_word:
            return (self._unk_id,)
        whole = self._token_to_id.get(word)
        if whole is not None:  # fast path: most CJK characters and short words
            return (whole,)
        pieces: List[int] = []
        start = 0
        while start < len(word):
            piece = self._longest_match(word, start)
            if piece is None:
                return (self._unk_id,)
            piece_id, start = piece
            pieces.append(piece_id)
        return tuple(pieces)

    def _longest_match(self, word: str, start: int) -> Optional[Tuple[int, int]]:
        """Longest vocabulary entry matching ``word`` at ``start``.

        Returns ``(id, end)`` or None. Candidates longer than the longest
        vocabulary entry are skipped, which cannot change the result.
        """
        prefix = CONTINUATION_PREFIX if start > 0 else ""
        limit = self._max_token_chars - len(prefix)
        end = min(len(word), start + limit)
        lookup = self._token_to_id
        while end > start:
            piece_id = lookup.get(prefix + word[start:end])
            if piece_id is not None:
                return piece_id, end
            end -= 1
        return None


def _index_vocab(vocab: Sequence[str]) -> Dict[str, int]:
    """Map token -> id, checking that the required special tokens exist.

    Like the reference, a token listed twice maps to its last line.
    """
    token_to_id = {token: index for index, token in enumerate(vocab)}
    missing = [t for t in (UNK_TOKEN, CLS_TOKEN, SEP_TOKEN) if t not in token_to_id]
    if missing:
        raise ValueError(
            f"vocabulary is missing required special token(s): {', '.join(missing)}"
        )
    return token_to_id


def _check_max_seq_length(max_seq_length: int) -> None:
    """Reject lengths that cannot hold [CLS] and [SEP]."""
    if max_seq_length < 2:
        raise ValueError(
            f"max_seq_length must be >= 2 to hold [CLS] and [SEP], got {max_seq_length}"
        )
