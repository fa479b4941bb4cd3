"""Incremental detokenization and stop-string detection.

Decoding one token at a time is wrong for byte-level tokenizers: a multi-byte
UTF-8 character can be split over several tokens, and SentencePiece-style
tokenizers drop a leading space when a token is decoded on its own. So, as
vLLM does, each step decodes a short window of recent tokens twice (with and
without the new ones) and appends the difference, holding it back while it
ends in U+FFFD (an incomplete character).
"""

from __future__ import annotations

from engine.sequence import Sequence

INCOMPLETE_CHAR = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # Every running sequence decodes twice per step, so the per-call overhead of
        # transformers' decode wrapper adds up (~25 us per call, measured). Its Rust
        # backend gives the same text when the wrapper has no clean-up to do.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cleans_up = getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._decode = backend.decode if backend is not None and not cleans_up else tokenizer.decode

    def decode_new_tokens(self, seq: Sequence) -> str:
        """Append the text of seq's newest tokens to seq.output_text; return what was added."""
        prefix_text, full_text = self._decode_window(seq)
        if len(full_text) <= len(prefix_text) or full_text.endswith(INCOMPLETE_CHAR):
            return ""
        new_text = full_text[len(prefix_text) :]
        seq.prefix_offset = seq.read_offset
        seq.read_offset = seq.num_tokens
        seq.output_text += new_text
        return new_text

    def flush(self, seq: Sequence) -> None:
        """At the end of a sequence, append the text still held back, incomplete character and all."""
        prefix_text, full_text = self._decode_window(seq)
        seq.output_text += full_text[len(prefix_text) :]
        seq.prefix_offset = seq.read_offset = seq.num_tokens

    def _decode_window(self, seq: Sequence) -> tuple[str, str]:
        """The window's text without and with the tokens not yet turned into output text."""
        skip = seq.params.skip_special_tokens
        window = seq.token_ids[seq.prefix_offset :]
        read = seq.read_offset - seq.prefix_offset
        return (
            self._decode(window[:read], skip_special_tokens=skip),
            self._decode(window, skip_special_tokens=skip),
        )


def find_stop_string(seq: Sequence, num_new_chars: int) -> str | None:
    """Truncate seq.output_text at the first stop string the new text completed, if any.

    Only matches that end inside the new text are looked for, so a stop string
    is found the step it completes. The stop string itself is cut off unless
    include_stop_str_in_output.
    """
    if not num_new_chars or not seq.params.stop:
        return None
    text = seq.output_text
    best: tuple[int, str] | None = None
    for stop in seq.params.stop:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    if best is None:
        return None
    index, stop = best
    end = index + len(stop) if seq.params.include_stop_str_in_output else index
    seq.output_text = text[:end]
    return stop
