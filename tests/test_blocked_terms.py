"""Blocked terms against disguises that hypothesis makes up: look-alike letters from Unicode's table,
accents, case, zero-width characters, stand-ins, spaced letters, plurals and surrounding text."""

from __future__ import annotations

import functools
import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.terms import _fold, _to_latin, contains_blocked_term

TERMS = ["cat", "gore", "blood moon", "kill", "spider", "nsfw", "кошка", "σκύλος"]
STAND_INS = {"a": "@4", "o": "0", "e": "3", "s": "$5", "t": "7+", "b": "8", "g": "9"}
ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"
SEPARATORS = ["", "", ".", " ", "-", "_", "*", "~"]


@functools.cache
def look_alikes() -> dict[str, list[str]]:
    """Every character that folds to the same letter as another, from the confusables table."""
    groups: dict[str, list[str]] = {}
    for char in map(chr, _to_latin()):
        groups.setdefault(_fold(char), []).append(char)
    return groups


@st.composite
def disguised(draw: st.DrawFn) -> tuple[str, str]:
    term = draw(st.sampled_from(TERMS))
    one_for = draw(st.sampled_from("il"))  # "1" stands for i or for l, not both in one text
    words = []
    for word in term.split():
        separator = draw(st.sampled_from(SEPARATORS))  # one separator, repeated between letters
        letters = []
        for letter in word:
            choices = [letter, letter.upper(), *look_alikes().get(_fold(letter), [])]
            choices += list(STAND_INS.get(letter, ""))
            if letter == one_for:
                choices.append("1")
            choices += {"i": ["!"], "l": ["|"]}.get(letter, [])
            shown = draw(st.sampled_from(choices))
            if draw(st.booleans()) and shown.isalpha():
                shown += draw(st.sampled_from("\u0301\u0308\u0327"))  # an accent
            if draw(st.booleans()):
                shown += draw(st.sampled_from(ZERO_WIDTH))
            letters.append(shown)
        words.append(separator.join(letters))
    text = draw(st.sampled_from([" ", "  ", " - ", ", "])).join(words)
    if draw(st.booleans()):
        text = unicodedata.normalize("NFKC", text).translate(FULL_WIDTH) if draw(st.booleans()) else text
    text += draw(st.sampled_from(["", "s", "es"])) if term.isascii() else ""
    before = draw(st.sampled_from(["", "a ", "the big ", "(", '"', "#", "x | "]))
    after = draw(st.sampled_from(["", "!", " on a mat", ".", ":1", " | a dog:-0.5", "?!"]))
    return term, before + text + after


FULL_WIDTH = str.maketrans({chr(c): chr(c + 0xFEE0) for c in range(0x21, 0x7F)})


@settings(max_examples=300, deadline=None)
@given(disguised())
def test_disguises_of_a_blocked_term_are_caught(case: tuple[str, str]) -> None:
    term, text = case
    assert contains_blocked_term(text, [term]), (term, text)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["a", "scatter", "category", "concat", "moon", "blue", "sky", "kiln",
                                 "skill", "spiderweb", "goretex", "bloody", "c", "at"]), max_size=8))
def test_innocent_words_that_contain_a_term_are_not_blocked(words: list[str]) -> None:
    assert not contains_blocked_term(" ".join(words), ["cat", "gore", "kill", "spider", "blood moon"])
