"""Committed tokens -> streamed text (serve/text.py): stop tokens, stop strings, held-back tails,
and streamed deltas that always add up to the whole answer."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from serve.text import TextAssembler

EOS, EOT = 0, 1
# A toy decoder: id i >= 2 is one character (3 -> "a", 4 -> "b", ...); id 2 is an incomplete
# UTF-8 byte (U+FFFD alone) that id 3 completes.
ALPHABET = "\ufffdabcdefghij"


def decode(ids) -> str:
    text = "".join(ALPHABET[i - 2] for i in ids)
    return text.replace("\ufffda", "é")  # byte 2 followed by byte 3 completes a character


def test_the_answer_ends_at_the_first_stop_token_which_is_counted_but_not_shown():
    assembler = TextAssembler(decode, {EOS, EOT})
    assert assembler.add([4, 5]) == "bc"
    assert assembler.add([6, EOT, 7, EOS]) == "d"
    assert assembler.finished and assembler.finish_reason == "stop"
    assert assembler.text == "bcd" and assembler.completion_tokens == 4
    assert assembler.add([8]) == "" and assembler.text == "bcd"


def test_without_stop_ids_the_answer_runs_to_max_tokens():
    assembler = TextAssembler(decode, ())
    assembler.add([4, EOS])
    assert not assembler.finished
    assert assembler.close() == "" and assembler.finish_reason == "length"
    assert assembler.completion_tokens == 2


def test_a_stop_string_split_across_blocks_is_held_back_then_cut():
    assembler = TextAssembler(decode, {EOS}, stop_strings=["def"])
    assert assembler.add([5, 6]) == "c"  # "d" might start "def"
    assert assembler.add([7, 8, 9]) == ""  # "cdefg" -> stop at "def"
    assert assembler.text == "c" and assembler.finish_reason == "stop"


def test_a_held_back_prefix_that_does_not_become_a_stop_string_is_released():
    assembler = TextAssembler(decode, {EOS}, stop_strings=["def"])
    assert assembler.add([5, 6]) == "c"
    assert assembler.add([8]) == "df"


def test_an_incomplete_character_is_held_until_it_completes():
    assembler = TextAssembler(decode, {EOS})
    assert assembler.add([4, 2]) == "b"
    assert assembler.add([3]) == "é"


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(0, 11), max_size=24), cuts=st.lists(st.integers(0, 24), max_size=5),
       stops=st.lists(st.text(alphabet="abcde", min_size=1, max_size=3), max_size=2),
       stop_ids=st.sampled_from([(), (EOS,), (EOS, EOT)]))
def test_streamed_deltas_add_up_to_the_answer_of_all_tokens_at_once(tokens, cuts, stops, stop_ids):
    whole = TextAssembler(decode, stop_ids, stops)
    whole.add(tokens)
    whole.close()
    streamed = TextAssembler(decode, stop_ids, stops)
    bounds = sorted({0, len(tokens), *[c for c in cuts if c <= len(tokens)]})
    text = "".join(streamed.add(tokens[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)) + streamed.close()
    assert text == whole.text == streamed.text
    assert streamed.finish_reason == whole.finish_reason
    assert not any(stop in text for stop in stops)
