"""IncrementalDetokenizer and StopStringFilter: streamed text is valid, complete and never shows a stop."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tierserve.worker.textstream import REPLACEMENT_CHAR, IncrementalDetokenizer, StopStringFilter

Decode = Callable[[Sequence[int]], str]

# Every Unicode scalar value that UTF-8 can encode (no lone surrogates).
SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
ANY_TEXT = st.text(st.characters(exclude_categories=SURROGATES), max_size=60)
# The same without U+FFFD: a literal replacement character cannot be told apart from a broken one.
CLEAN_TEXT = st.text(
    st.characters(exclude_categories=SURROGATES, exclude_characters=REPLACEMENT_CHAR), max_size=60
)

UNICODE_SAMPLES = (
    "naïve café 日本語 🙂👍🏽",
    "e\u0301 a\u0308\u0323 combining marks",
    "👨\u200d👩\u200d👧\u200d👦 family, 🇯🇵 flag, 🏳️\u200d🌈",
    "한국어 العربية עברית ไทย हिन्दी",
    "math \U0001d518\U0001d52b\U0001d526 ∮ E⋅da = Q, music 𝄞",
    "\x00\x7f\u0080\u07ff\u0800\uffff\U00010000\U0010ffff",
)


# ------------------------------------------------------------ fake byte-level tokenizers


def byte_decode(ids: Sequence[int]) -> str:
    """One token per byte, like a byte-level tokenizer's 256 base tokens."""
    return bytes(ids).decode("utf-8", errors="replace")


def chunk_decoder(chunks: Sequence[bytes]) -> Decode:
    """Token i is chunks[i]: multi-byte tokens that may end or start inside a character (like BPE)."""

    def decode(ids: Sequence[int]) -> str:
        return b"".join(chunks[i] for i in ids).decode("utf-8", errors="replace")

    return decode


def stream(decode: Decode, ids: Sequence[int]) -> tuple[list[str], str]:
    detokenizer = IncrementalDetokenizer(decode)
    pieces = [detokenizer.push(token_id) for token_id in ids]
    return pieces, detokenizer.flush()


@st.composite
def split_points(draw: st.DrawFn, length: int) -> list[int]:
    cuts = draw(st.lists(st.integers(0, length), max_size=8))
    return sorted({0, length, *cuts})


def split_bytes(data: bytes, cuts: list[int]) -> list[bytes]:
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


# ------------------------------------------------------------ IncrementalDetokenizer, byte tokens


@settings(max_examples=300)
@given(CLEAN_TEXT)
@example("naïve café 日本語 🙂👍🏽")
@example("e\u0301\U0010ffff")
def test_byte_tokens_stream_valid_text_that_joins_to_the_original(text: str) -> None:
    pieces, tail = stream(byte_decode, list(text.encode("utf-8")))
    for piece in pieces:
        assert REPLACEMENT_CHAR not in piece
    assert "".join(pieces) + tail == text
    assert tail == ""  # valid UTF-8 leaves nothing held back at the end


@settings(max_examples=200)
@given(CLEAN_TEXT)
def test_byte_tokens_emit_each_character_as_soon_as_it_is_complete(text: str) -> None:
    detokenizer = IncrementalDetokenizer(byte_decode)
    emitted = ""
    for char in text:
        encoded = char.encode("utf-8")
        for byte in encoded[:-1]:
            emitted += detokenizer.push(byte)
            assert emitted == text[: len(emitted)]
        emitted += detokenizer.push(encoded[-1])
        assert emitted.endswith(char)
    assert emitted == text


@settings(max_examples=200)
@given(ANY_TEXT)
@example("\ufffd")
@example("a\ufffd\ufffdb\ufffd")
def test_literal_replacement_characters_still_arrive(text: str) -> None:
    pieces, tail = stream(byte_decode, list(text.encode("utf-8")))
    assert "".join(pieces) + tail == text


@settings(max_examples=300)
@given(st.binary(max_size=40))
@example(b"\xe6\x97")
@example(b"a\xe6b\x97\xa5c")
@example(b"\xf0\x9f\x99")
def test_invalid_bytes_join_to_the_same_text_as_one_decode(data: bytes) -> None:
    pieces, tail = stream(byte_decode, list(data))
    assert "".join(pieces) + tail == byte_decode(list(data))


@settings(max_examples=300)
@given(st.data())
def test_multi_byte_tokens_split_inside_characters(data: st.DataObject) -> None:
    text = data.draw(CLEAN_TEXT, label="text")
    encoded = text.encode("utf-8")
    chunks = split_bytes(encoded, data.draw(split_points(len(encoded)), label="cuts"))
    pieces, tail = stream(chunk_decoder(chunks), range(len(chunks)))
    for piece in pieces:
        assert REPLACEMENT_CHAR not in piece
    assert "".join(pieces) + tail == text


def test_incomplete_character_at_the_end_is_flushed_as_replacement() -> None:
    pieces, tail = stream(byte_decode, list("ab日".encode())[:-1])
    assert "".join(pieces) == "ab"
    assert tail == REPLACEMENT_CHAR


def test_tokens_that_decode_to_nothing_emit_nothing() -> None:
    chunks = [b"a", b"", b"\xc3", b"", b"\xa9", b"b"]
    pieces, tail = stream(chunk_decoder(chunks), range(len(chunks)))
    assert pieces == ["a", "", "", "", "é", "b"]
    assert tail == ""


def test_flush_twice_returns_nothing_more() -> None:
    detokenizer = IncrementalDetokenizer(byte_decode)
    detokenizer.push(0xE6)
    assert detokenizer.flush() == REPLACEMENT_CHAR
    assert detokenizer.flush() == ""


# ------------------------------------------------------------ IncrementalDetokenizer, the real tokenizer


@pytest.fixture(scope="module")
def real_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from tests.tiny_model import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


def real_decoder(tokenizer: Any) -> Decode:
    """Decoding as the engine does it."""

    def decode(ids: Sequence[int]) -> str:
        return str(tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False))

    return decode


def check_real_stream(tokenizer: Any, ids: list[int]) -> None:
    decode = real_decoder(tokenizer)
    pieces, tail = stream(decode, ids)
    full = decode(ids)
    if REPLACEMENT_CHAR not in full:
        for piece in pieces:
            assert REPLACEMENT_CHAR not in piece
        assert tail == ""
    assert "".join(pieces) + tail == full


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_real_tokenizer_unicode_samples(real_tokenizer: Any, text: str) -> None:
    ids = real_tokenizer.encode(text)
    # The default tokenizer is byte-level: these samples really do split characters over tokens.
    assert len(ids) > len(text.split())
    check_real_stream(real_tokenizer, ids)
    assert real_decoder(real_tokenizer)(ids) == text


@pytest.mark.parametrize(
    "text",
    [
        "I 'm sure he 's right , they 're not . We 've seen it !",
        "x = f(a , b) ; y = don 't",
        "a . b ? c ! d",
    ],
)
def test_real_tokenizer_keeps_spaces_before_punctuation(real_tokenizer: Any, text: str) -> None:
    """clean_up_tokenization_spaces would drop characters when decoding window by window."""
    ids = real_tokenizer.encode(text)
    check_real_stream(real_tokenizer, ids)
    assert real_decoder(real_tokenizer)(ids) == text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(CLEAN_TEXT)
def test_real_tokenizer_any_text(real_tokenizer: Any, text: str) -> None:
    check_real_stream(real_tokenizer, real_tokenizer.encode(text))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_real_tokenizer_random_token_ids(real_tokenizer: Any, data: st.DataObject) -> None:
    """What a random model produces: arbitrary ids, broken characters and special tokens included."""
    vocab_size = int(real_tokenizer.vocab_size)  # len(tokenizer) is slow: it rebuilds the vocabulary
    ids = data.draw(st.lists(st.integers(0, vocab_size - 1), max_size=30))
    check_real_stream(real_tokenizer, ids)


# ------------------------------------------------------------ StopStringFilter

STOP_ALPHABET = "abc"
STOPS = st.lists(st.text(STOP_ALPHABET, min_size=1, max_size=4), max_size=3)
STOP_TEXT = st.text(STOP_ALPHABET + " é", max_size=40)


def run_filter(stops: Sequence[str], pieces: Sequence[str]) -> tuple[str, str, StopStringFilter]:
    stop_filter = StopStringFilter(stops)
    out = ""
    for piece in pieces:
        out += stop_filter.feed(piece)
        for stop in stops:
            assert not stop or stop not in out
    return out, stop_filter.flush(), stop_filter


def split_text(text: str, cuts: list[int]) -> list[str]:
    return [text[a:b] for a, b in itertools.pairwise(cuts)]


def first_stop_index(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def without_containers(stops: Sequence[str]) -> list[str]:
    """Drop stops that contain another stop.

    With "abcd" and "c", a stream stops as soon as "c" completes, while "abcd" starting
    earlier would only complete later; which one wins depends on how the text is split.
    Without such pairs the result is the same for every split.
    """
    unique = set(stops)
    return sorted(s for s in unique if not any(o != s and o in s for o in unique))


@settings(max_examples=500)
@given(st.data())
def test_stop_filter_matches_the_first_stop_for_any_split(data: st.DataObject) -> None:
    text = data.draw(STOP_TEXT, label="text")
    stops = without_containers(data.draw(STOPS, label="stops"))
    pieces = split_text(text, data.draw(split_points(len(text)), label="cuts"))
    out, tail, stop_filter = run_filter(stops, pieces)
    first = first_stop_index(text, stops)
    if first is None:
        assert not stop_filter.stopped
        assert out + tail == text
    else:
        assert stop_filter.stopped
        assert out == text[:first]
        assert tail == ""


@settings(max_examples=500)
@given(STOP_TEXT, STOPS)
def test_stop_filter_character_by_character_stops_at_the_first_completed_stop(
    text: str, stops: list[str]
) -> None:
    """Any stops, substrings of each other included: the stop that completes first wins."""
    out, tail, stop_filter = run_filter(stops, list(text))
    ends = [i + len(s) for s in stops if (i := text.find(s)) >= 0]
    if not ends:
        assert not stop_filter.stopped
        assert out + tail == text
        return
    seen = text[: min(ends)]
    expected = first_stop_index(seen, stops)
    assert expected is not None
    assert stop_filter.stopped
    assert out == seen[:expected]
    assert tail == ""


@settings(max_examples=300)
@given(st.data())
def test_stop_filter_any_stops_any_split_cuts_right_before_a_stop(data: st.DataObject) -> None:
    text = data.draw(STOP_TEXT, label="text")
    stops = data.draw(STOPS, label="stops")
    pieces = split_text(text, data.draw(split_points(len(text)), label="cuts"))
    out, tail, stop_filter = run_filter(stops, pieces)
    first = first_stop_index(text, stops)
    if first is None:
        assert out + tail == text
        return
    first_end = min(i + len(s) for s in stops if (i := text.find(s)) >= 0)
    assert stop_filter.stopped
    assert text.startswith(out)
    assert first <= len(out) < first_end
    assert any(text.startswith(s, len(out)) for s in stops)


@settings(max_examples=200)
@given(ANY_TEXT, st.data())
def test_stop_filter_without_stops_passes_everything_through(text: str, data: st.DataObject) -> None:
    pieces = split_text(text, data.draw(split_points(len(text))))
    out, tail, stop_filter = run_filter([], pieces)
    assert out == text
    assert tail == ""
    assert not stop_filter.stopped


@pytest.mark.parametrize(
    ("stops", "pieces", "expected_out", "expected_stopped"),
    [
        # A stop split across pieces is held back, then dropped.
        (["STOP"], ["hello S", "T", "OP world"], "hello ", True),
        (["</s>"], ["a<", "/", "s", ">b"], "a", True),
        # A held prefix that turns out not to be a stop is released.
        (["STOP"], ["hello ST", "ART"], "hello START", False),
        (["STOP"], ["ab S"], "ab S", False),  # released by flush at the end
        # Overlapping stops: the one that starts first wins when both are seen together.
        (["ab", "b"], ["xab"], "x", True),
        (["ab", "b"], ["xa", "b"], "x", True),
        (["b", "ab"], ["xa", "bc"], "x", True),
        # Stop at the very start.
        (["ab"], ["abc"], "", True),
        (["ab"], ["a", "bc"], "", True),
        # Empty stop strings are ignored.
        ([""], ["abc"], "abc", False),
        # Multi-character pieces and non-ASCII stops.
        (["日本"], ["今日は", "日", "本語"], "今日は", True),
        (["\n\n"], ["line\n", "\nnext"], "line", True),
    ],
)
def test_stop_filter_edge_cases(
    stops: list[str], pieces: list[str], expected_out: str, expected_stopped: bool
) -> None:
    out, tail, stop_filter = run_filter(stops, pieces)
    assert out + tail == expected_out
    assert stop_filter.stopped is expected_stopped


def test_stop_filter_holds_back_a_possible_stop_and_ignores_input_after_stopping() -> None:
    stop_filter = StopStringFilter(["END"])
    assert stop_filter.feed("the E") == "the "
    assert stop_filter.feed("N") == ""
    assert stop_filter.feed("D and more") == ""
    assert stop_filter.stopped
    assert stop_filter.feed("later") == ""
    assert stop_filter.flush() == ""


def test_stop_filter_holds_back_the_longest_possible_stop_start() -> None:
    stop_filter = StopStringFilter(["xyz", "yzw"])
    assert stop_filter.feed("axyz"[:3]) == "a"  # "xy" may start "xyz"
    assert stop_filter.feed("q") == "xyq"
