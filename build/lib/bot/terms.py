"""Blocked terms that hold against disguises.

A term and a text are folded the same way: NFKC (full-width letters, ligatures), casefold, format
characters dropped (zero-width spaces and joiners), accents and other combining marks dropped,
Unicode's confusables mapped to Latin (Cyrillic с, Greek α: the table `confusable_homoglyphs` ships
from Unicode's confusables.txt, not a hand list), and the stand-ins people type for letters (c@t,
d0g, k1ll). The folded term then matches as a whole word; also with its letters spaced by one
repeated separator (c.a.t, c a t, c-a-t), and as a simple plural (cats, boxes). A term of several
words matches across any separators between them. Terms in any script work: a script without spaces
between words (Chinese, Japanese, Thai) matches anywhere in the text.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from confusable_homoglyphs.confusables import confusables_data

# What people type for a letter ("c@t", "d0g", "k1ll", "$pam"): a term's letter also matches these.
# Matched in the pattern, not replaced in the text, so that "cat!" and "cat|dog" still end the word.
_STAND_INS = {"a": "@4", "b": "8", "e": "3", "g": "9", "i": "1!|", "l": "1|!", "o": "0", "s": "$5",
              "t": "7+"}
_SPACELESS_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "THAI", "LAO", "KHMER", "MYANMAR")


@functools.cache
def _to_latin() -> dict[int, str]:
    """Each character that Unicode lists as confusable with one Latin letter or digit: that one."""
    table = {}
    for char, entries in confusables_data.items():
        if len(char) != 1 or char.isascii():
            continue
        for entry in entries:
            if entry["n"].startswith(("LATIN ", "DIGIT ")) and len(entry["c"]) == 1 and entry["c"].isascii():
                table[ord(char)] = entry["c"]
                break
    return table


def _fold(text: str) -> str:
    """Case, width, accents, invisible characters and look-alike letters folded away."""
    text = unicodedata.normalize("NFKC", text)
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(c for c in text if not unicodedata.combining(c) and unicodedata.category(c) != "Cf")
    return unicodedata.normalize("NFC", text.translate(_to_latin()).casefold())


def _spaceless(char: str) -> bool:
    return any(script in unicodedata.name(char, "") for script in _SPACELESS_SCRIPTS)


def _letter(char: str) -> str:
    return f"[{re.escape(char + _STAND_INS[char])}]" if char in _STAND_INS else re.escape(char)


def _spelled(word: str, index: int) -> str:
    """A word's letters as they are, or spaced by one separator repeated between every two ("c.a.t"),
    so that "vitamin c at noon" does not spell "cat"."""
    if len(word) == 1:
        return _letter(word)
    first, second, *rest = word
    return (_letter(first) + rf"(?P<gap{index}>[\W_]*?)" + _letter(second)
            + "".join(rf"(?P=gap{index}){_letter(c)}" for c in rest))


@functools.lru_cache(maxsize=1024)
def _pattern(term: str) -> re.Pattern[str] | None:
    words = [w for w in re.split(r"[\W_]+", _fold(term)) if w]
    if not words:
        return None
    body = r"[\W_]+".join(_spelled(word, i) for i, word in enumerate(words))
    if _spaceless(words[0][0]) or _spaceless(words[-1][-1]):
        return re.compile(body)
    return re.compile(rf"(?<!\w){body}(?:e?s)?(?!\w)")


def unmatchable(terms: list[str]) -> list[str]:
    """Terms with nothing left to match once folded (only punctuation, symbols, emoji)."""
    return [term for term in terms if _pattern(term) is None]


def contains_blocked_term(text: str, terms: list[str]) -> bool:
    """Whether any of `terms` is in `text`, through the disguises above."""
    folded = _fold(text)
    return any(pattern.search(folded) for pattern in map(_pattern, terms) if pattern is not None)
