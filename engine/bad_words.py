"""vLLM's bad_words: the token sequences a request may not generate, from its words.

Each word is tokenized as it would appear at the start of a text and, when
that gives a different first token of the same length, after a space (as a
word in the middle of a text). The sampler then bans the last token of each
sequence whenever the output so far ends with the others
(engine.layers.sampler).
"""

from __future__ import annotations

from typing import Any


def bad_words_token_ids(tokenizer: Any, words: list[str]) -> list[list[int]]:
    sequences: list[list[int]] = []
    for word in words:
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        sequences.append(alone)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced[0] != alone[0] and len(spaced) == len(alone):
            sequences.append(spaced)
    return sequences
