from __future__ import annotations

import csv
import gzip
import io

import pytest

from bot.export import SinceError, encode_export, export_files, parse_since
from bot.limits import LIMITS, LimitError
from bot.terms import contains_blocked_term


@pytest.mark.parametrize(("text", "blocked"), [
    ("a cat on a mat", True),
    ("A CAT", True),
    ("a cät", True),          # accents
    ("a c@t", True),          # stand-ins
    ("c4t", True),
    ("cat!", True),           # a stand-in that is punctuation here
    ("a cat|a dog", True),    # a weighted part
    ("c.a.t", True),          # spaced letters
    ("c a t", True),
    ("c\u200bat", True),      # a zero-width space inside
    ("\u0441at", True),       # Cyrillic с
    ("ｃａｔ", True),          # full width
    ("cats", True),           # plural
    ("category theory", False),  # whole words only
    ("scatter", False),
    ("concat", False),
    ("vitamin c at noon", False),  # letters spaced unevenly don't spell it
    ("a blue sky", False),
])
def test_blocked_terms_match_whole_words_through_disguises(text: str, blocked: bool) -> None:
    assert contains_blocked_term(text, ["cat"]) is blocked


def test_terms_in_other_scripts_are_blocked_too() -> None:
    assert contains_blocked_term("я люблю кошку", ["кошку"])
    assert contains_blocked_term("я люблю к\u043eшку".replace("\u043e", "o"), ["кошку"])  # a Latin o inside
    assert not contains_blocked_term("я люблю собак", ["кошку"])
    assert contains_blocked_term("一只猫在这里", ["猫"])  # no spaces between words: anywhere
    assert contains_blocked_term("ΣΚΎΛΟΣ", ["σκυλος"])  # Greek, capitals and accents


def test_a_term_with_nothing_to_match_is_refused_by_name() -> None:
    with pytest.raises(LimitError, match="'!!!' has no letters or digits"):
        LIMITS["blocked_terms"].parse("cat, !!!")


def test_blocked_phrases_and_one_for_i_or_l() -> None:
    assert contains_blocked_term("the b1ood moon", ["blood moon"])
    assert contains_blocked_term("k1ll it", ["kill"])
    assert not contains_blocked_term("blood red moon", ["blood moon"])


@pytest.mark.parametrize(("name", "text", "value"), [
    ("max_steps", "250", 250),
    ("max_pixels", "262,144", 262144),
    ("allow_init_images", "no", False),
    ("allowed_channels", "<#123456789012345678> <#223456789012345678>",
     [123456789012345678, 223456789012345678]),
    ("allowed_channels", "all", []),
    ("blocked_terms", "gore, blood ,gore", ["blood", "gore"]),
    ("moderator_role", "<@&323456789012345678>", 323456789012345678),
    ("moderator_role", "none", None),
])
def test_limit_values_parse(name: str, text: str, value: object) -> None:
    assert LIMITS[name].parse(text) == value


@pytest.mark.parametrize(("name", "text", "message"), [
    ("max_steps", "0", "max_steps must be from 1 to 10000 (got 0)"),
    ("max_steps", "lots", "max_steps takes a whole number from 1 to 10000 (got 'lots')"),
    ("allow_init_images", "maybe", "allow_init_images takes yes or no (got 'maybe')"),
    ("allowed_channels", "#art", "allowed_channels takes channel mentions"),
])
def test_bad_limit_values_say_what_is_allowed(name: str, text: str, message: str) -> None:
    with pytest.raises(LimitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LIMITS[name].parse(text)


def test_since_parses_ages_and_dates() -> None:
    assert parse_since("7d", now=1_000_000) == 1_000_000 - 7 * 86400
    assert parse_since("2026-11-01") == 1793491200
    assert parse_since(None) is None
    with pytest.raises(SinceError, match="like 7d"):
        parse_since("last week")


def test_exports_compress_then_split_to_fit_the_upload_limit() -> None:
    rows = [{"job": i, "prompt": f"prompt number {i} " + "x" * (i % 97)} for i in range(3000)]
    files, how = export_files(rows, "csv", limit=10 * 1024 * 1024)
    assert how == "" and files[0].filename == "generations.csv"
    plain = encode_export(rows, "csv")
    files, how = export_files(rows, "csv", limit=len(plain) - 1)
    assert "gzip" in how and files[0].filename == "generations.csv.gz"
    assert gzip.decompress(files[0].fp.read()) == plain
    files, how = export_files(rows, "jsonl", limit=4096)
    assert "split into" in how and len(files) > 1
    lines = b"".join(gzip.decompress(f.fp.read()) for f in files).splitlines()
    assert len(lines) == 3000  # every row exactly once across the parts


def test_split_csv_parts_are_whole_files_even_when_a_prompt_spans_lines() -> None:
    rows = [{"job": i, "prompt": f"line one of {i}\nline two\r\n=SUM(A1)" if i % 3 == 0 else f"plain {i}"}
            for i in range(2000)]
    files, how = export_files(rows, "csv", limit=4096)
    assert "split into" in how and len(files) > 2
    parsed = [list(csv.DictReader(io.StringIO(gzip.decompress(f.fp.read()).decode()))) for f in files]
    assert all(part and list(part[0]) == ["job", "prompt"] for part in parsed)  # each has its header
    back = [row for part in parsed for row in part]
    assert [int(row["job"]) for row in back] == list(range(2000))
    assert back[3]["prompt"] == "line one of 3\nline two\r\n=SUM(A1)"  # whole, in one part
