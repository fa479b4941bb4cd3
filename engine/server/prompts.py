"""Prompt checks that need the tokenizer, done before a request reaches the engine.

vLLM's messages for these cases are what clients and vLLM's tests match on
("out of vocabulary", "cannot be empty"), so they are kept word for word; and
vLLM's `truncate_prompt_tokens` (keep the last k prompt tokens) is applied here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.errors import InvalidRequestError

Prompt = str | list[int]


class PromptChecker:
    def __init__(self, tokenize: Callable[[str], list[int]], tokenizer: Any, max_model_len: int):
        self.tokenize = tokenize  # the engine's own: it decides whether a BOS is added
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_token_id = max(tokenizer.get_vocab().values())

    def checked(self, prompts: list[Prompt], truncate_prompt_tokens: int | None) -> list[Prompt]:
        """The prompts to generate from: token ids checked, and truncated when the request asks."""
        keep = self._tokens_to_keep(truncate_prompt_tokens)
        return [self._checked(prompt, keep) for prompt in prompts]

    def text(self, prompt: Prompt) -> str:
        """A prompt's text (token-id prompts decoded), for echo."""
        if isinstance(prompt, str):
            return prompt
        self._check_ids(prompt)
        return self.tokenizer.decode(prompt)

    def _checked(self, prompt: Prompt, keep: int | None) -> Prompt:
        if isinstance(prompt, str) and prompt and keep is None:
            return prompt  # the engine tokenizes it and keeps the text for its output
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else prompt
        if keep is not None:
            token_ids = token_ids[-keep:]
        self._check_ids(token_ids)
        return prompt if isinstance(prompt, str) and keep is None else token_ids

    def _check_ids(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise InvalidRequestError("The decoder prompt cannot be empty", param="prompt")
        for token_id in (min(token_ids), max(token_ids)):
            if not 0 <= token_id <= self.max_token_id:
                raise InvalidRequestError(f"Token id {token_id} is out of vocabulary", param="prompt")

    def _tokens_to_keep(self, truncate_prompt_tokens: int | None) -> int | None:
        if truncate_prompt_tokens is None:
            return None
        keep = self.max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
        if not 1 <= keep <= self.max_model_len:
            raise InvalidRequestError(
                f"truncate_prompt_tokens must be -1 (the context length) or in [1, {self.max_model_len}] "
                f"(max_model_len), got {truncate_prompt_tokens}", param="truncate_prompt_tokens")
        return keep
