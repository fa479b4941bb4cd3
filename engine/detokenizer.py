"""Incremental detokenization and stop-string detection, in the front end.

Decoding one token at a time is wrong for byte-level tokenizers: a multi-byte
UTF-8 character can be split over several tokens, and SentencePiece-style
tokenizers drop a leading space when a token is decoded on its own. So, as
vLLM does, each step decodes a short window of recent tokens twice (with and
without the new ones) and appends the difference, holding it back while it
ends in U+FFFD (an incomplete character).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.sampling import SamplingParams

INCOMPLETE_CHAR = "\ufffd"

# Prompt tokens kept before the output as decoding context (a leading space, a split character).
PROMPT_CONTEXT_TOKENS = 5


@dataclass
class TextState:
    """One completion's text so far, and the window of tokens not yet turned into text."""

    params: SamplingParams
    tokens: list[int]  # the prompt's last few tokens, then every output token
    prefix_offset: int = 0  # the window starts here ...
    read_offset: int = 0  # ... and tokens before this are already text
    output_text: str = ""
    finished: bool = False

    @classmethod
    def after_prompt(cls, params: SamplingParams, prompt_token_ids: list[int]) -> TextState:
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        return cls(params, context, prefix_offset=0, read_offset=len(context))

    @property
    def visible_text(self) -> str:
        """The text so far, minus a tail that could still become a stop string.

        Holding back len(longest stop) - 1 characters while running means streamed
        text never has to be taken back when a stop string completes.
        """
        if self.finished or not self.params.stop:
            return self.output_text
        hold_back = max(len(s) for s in self.params.stop) - 1
        return self.output_text[: max(len(self.output_text) - hold_back, 0)]


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # Every running sequence decodes twice per step, so the per-call overhead of
        # transformers' decode wrapper adds up (~25 us per call, measured). Its Rust
        # backend gives the same text when the wrapper has no clean-up to do.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cleans_up = getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._decode = backend.decode if backend is not None and not cleans_up else tokenizer.decode

    def decode_new_tokens(self, state: TextState) -> str:
        """Append the text of the state's newest tokens to its output_text; return what was added."""
        prefix_text, full_text = self._decode_window(state)
        if len(full_text) <= len(prefix_text) or full_text.endswith(INCOMPLETE_CHAR):
            return ""
        new_text = full_text[len(prefix_text) :]
        state.prefix_offset = state.read_offset
        state.read_offset = len(state.tokens)
        state.output_text += new_text
        return new_text

    def flush(self, state: TextState) -> None:
        """At the end of a sequence, append the text still held back, incomplete character and all."""
        prefix_text, full_text = self._decode_window(state)
        state.output_text += full_text[len(prefix_text) :]
        state.prefix_offset = state.read_offset = len(state.tokens)

    def _decode_window(self, state: TextState) -> tuple[str, str]:
        """The window's text without and with the tokens not yet turned into output text."""
        skip = state.params.skip_special_tokens
        window = state.tokens[state.prefix_offset :]
        read = state.read_offset - state.prefix_offset
        return (
            self._decode(window[:read], skip_special_tokens=skip),
            self._decode(window, skip_special_tokens=skip),
        )


def find_stop_string(state: TextState, num_new_chars: int) -> str | None:
    """Truncate state.output_text at the first stop string the new text completed, if any.

    Only matches that end inside the new text are looked for, so a stop string
    is found the step it completes. The stop string itself is cut off unless
    include_stop_str_in_output.
    """
    params = state.params
    if not num_new_chars or not params.stop:
        return None
    text = state.output_text
    best: tuple[int, str] | None = None
    for stop in params.stop:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    if best is None:
        return None
    index, stop = best
    end = index + len(stop) if params.include_stop_str_in_output else index
    state.output_text = text[:end]
    return stop
