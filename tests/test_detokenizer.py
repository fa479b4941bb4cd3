"""Incremental detokenization (multi-byte UTF-8 split over tokens) and stop strings."""

import pytest
from transformers import AutoTokenizer

from engine.detokenizer import INCOMPLETE_CHAR, Detokenizer, TextState, find_stop_string
from engine.sampling import SamplingParams

TEXT = " Grüße aus München! こんにちは世界 🙂🚀 你好 — naïve ≤∞ done."


@pytest.fixture(scope="module")
def tokenizer(tiny_model_folder):
    return AutoTokenizer.from_pretrained(tiny_model_folder("llama"))


def stream(detokenizer: Detokenizer, prompt: list[int], output: list[int], params: SamplingParams):
    """Feed output tokens one by one as the front end does; return the text state and every delta."""
    state = TextState.after_prompt(params, prompt)
    deltas = []
    for token in output:
        state.tokens.append(token)
        deltas.append(detokenizer.decode_new_tokens(state))
    return state, deltas


def test_streamed_text_equals_decoding_everything_and_never_shows_half_a_character(tokenizer):
    prompt = tokenizer("Say:")["input_ids"]
    output = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    # The byte-level tokenizer really splits characters: some tokens alone decode to U+FFFD.
    assert any(INCOMPLETE_CHAR in tokenizer.decode([t]) for t in output)
    seq, deltas = stream(Detokenizer(tokenizer), prompt, output, SamplingParams())
    assert all(INCOMPLETE_CHAR not in delta for delta in deltas)
    assert "".join(deltas) == seq.output_text == tokenizer.decode(output) == TEXT


def test_leading_space_of_the_first_output_token_is_kept(tokenizer):
    prompt = tokenizer("Hello")["input_ids"]
    output = tokenizer(" world and more", add_special_tokens=False)["input_ids"]
    seq, _ = stream(Detokenizer(tokenizer), prompt, output, SamplingParams())
    assert seq.output_text == " world and more"


def test_flush_appends_an_incomplete_character_at_the_end(tokenizer):
    emoji = tokenizer("🙂", add_special_tokens=False)["input_ids"]
    assert len(emoji) > 1
    detokenizer = Detokenizer(tokenizer)
    seq, _ = stream(detokenizer, [1], [*tokenizer("ok", add_special_tokens=False)["input_ids"], *emoji[:-1]], SamplingParams())
    assert seq.output_text == "ok"
    detokenizer.flush(seq)
    assert seq.output_text.startswith("ok") and seq.output_text.endswith(INCOMPLETE_CHAR)


def test_special_tokens_are_skipped_unless_asked(tokenizer):
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    word = tokenizer(" hi", add_special_tokens=False)["input_ids"]
    seq, _ = stream(Detokenizer(tokenizer), [1], [*word, eot], SamplingParams())
    assert seq.output_text == " hi"
    seq, _ = stream(Detokenizer(tokenizer), [1], [*word, eot], SamplingParams(skip_special_tokens=False))
    assert seq.output_text == " hi<|eot_id|>"


def output_with_text(text: str, params: SamplingParams) -> TextState:
    return TextState(params, [1], output_text=text)


@pytest.mark.parametrize(
    "text, new, stop, include, expected_text, expected_stop",
    [
        ("Hello world. Bye", 5, ["."], False, "Hello world", "."),
        ("Hello world. Bye", 5, ["."], True, "Hello world.", "."),
        ("abc STOP", 3, ["STOP", "abc"], False, "abc ", "STOP"),  # "abc" ended in earlier text
        ("one, two; three", 12, [";", ","], False, "one", ","),  # the earliest match wins
        ("no match here", 5, ["zz"], False, "no match here", None),
    ],
)
def test_stop_strings(text, new, stop, include, expected_text, expected_stop):
    seq = output_with_text(text, SamplingParams(stop=stop, include_stop_str_in_output=include))
    assert find_stop_string(seq, new) == expected_stop
    assert seq.output_text == expected_text


def test_text_that_could_start_a_stop_string_is_held_back_while_running():
    seq = output_with_text("Hello wor", SamplingParams(stop=["world!"]))
    assert seq.visible_text == "Hell"  # "o wor" could still become "world!"
    seq.finished = True
    assert seq.visible_text == "Hello wor"
