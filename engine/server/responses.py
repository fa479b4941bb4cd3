"""Engine outputs -> OpenAI response bodies and SSE streams, for completions and chat.

The engine's outputs are cumulative; a stream sends what is new since the last
chunk of each choice. The engine holds back text that might still become a
stop string, so the deltas never contain one. Choice index = prompt index * n +
output index, as OpenAI numbers choices of multi-prompt requests.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from engine.server.errors import sse_error_event
from engine.server.generation import Generation, token_counts

# What OpenAI-compatible servers report for a logprob of -inf (JSON has no infinity).
MIN_LOGPROB = -9999.0

DONE_EVENT = "data: [DONE]\n\n"


def sse_event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


@dataclass
class _ChoiceState:
    """How much of one choice's cumulative output a stream has already sent."""

    text_len: int = 0
    tokens_sent: int = 0
    text_offset: int = 0
    finished: bool = False


class ResponseFormat:
    """What completions and chat share: ids, usage, choice numbering, the streaming algorithm."""

    object_name = ""
    chunk_object_name = ""
    id_prefix = ""

    def __init__(self, model_name: str, tokenizer: Any, n: int, top_logprobs: int | None, include_usage: bool):
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.n = n
        self.top_logprobs = top_logprobs  # None: no logprobs requested
        self.include_usage = include_usage
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._token_texts: dict[int, str] = {}

    # --- shapes the subclasses define ------------------------------------------------------

    def choice(self, index: int, prompt_index: int, output: CompletionOutput) -> dict:
        raise NotImplementedError

    def delta_choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        raise NotImplementedError

    def logprobs_body(self, entries: list[tuple[int, TokenLogprobs]], text_offset: int) -> dict:
        raise NotImplementedError

    def opening_choices(self, num_choices: int) -> list[dict]:
        """Choices of a first chunk sent before any text (chat announces the role)."""
        return []

    def text_prefix(self, prompt_index: int) -> str:
        """Text that precedes a choice's output (completions' echo)."""
        return ""

    # --- shared ----------------------------------------------------------------------------

    def response(self, finals: list[RequestOutput]) -> dict:
        choices = [
            self.choice(prompt_index * self.n + output.index, prompt_index, output)
            for prompt_index, final in enumerate(finals)
            for output in final.outputs
        ]
        return self._body(self.object_name, choices, usage=self.usage(finals))

    async def stream(self, generation: Generation, num_prompts: int) -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}
        states: dict[int, _ChoiceState] = {}
        opening = self.opening_choices(num_prompts * self.n)
        if opening:
            yield sse_event(self._chunk(opening))
        try:
            async for prompt_index, output in generation.outputs():
                finals[prompt_index] = output
                choices = [
                    choice
                    for completion in output.outputs
                    if (choice := self._next_delta(prompt_index, completion, states)) is not None
                ]
                if choices:
                    yield sse_event(self._chunk(choices))
        except Exception as exc:  # noqa: BLE001 - headers are sent: the error travels as an event
            yield sse_error_event(exc)
            return
        if self.include_usage:
            yield sse_event(self._body(self.chunk_object_name, [], usage=self.usage(list(finals.values()))))
        yield DONE_EVENT

    def _next_delta(self, prompt_index: int, output: CompletionOutput, states: dict[int, _ChoiceState]) -> dict | None:
        index = prompt_index * self.n + output.index
        state = states.get(index)
        prefix = ""
        if state is None:
            prefix = self.text_prefix(prompt_index)
            state = states[index] = _ChoiceState(text_offset=len(prefix))
        if state.finished:
            return None
        text = prefix + output.text[state.text_len :]
        state.text_len = len(output.text)
        entries = self._logprob_entries(output, state.tokens_sent)
        logprobs = None
        if entries is not None:
            logprobs = self.logprobs_body(entries, state.text_offset)
            state.tokens_sent += len(entries)
            state.text_offset += sum(len(self.token_text(token_id)) for token_id, _ in entries)
        state.finished = output.finished
        if not (text or entries or output.finished):
            return None
        return self.delta_choice(index, text, logprobs, output.finish_reason)

    def usage(self, finals: list[RequestOutput]) -> dict:
        prompt_tokens, completion_tokens = token_counts(finals)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def _chunk(self, choices: list[dict]) -> dict:
        return self._body(self.chunk_object_name, choices, usage=None)

    def _body(self, object_name: str, choices: list[dict], usage: dict | None) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model_name,
                "choices": choices, "usage": usage}

    def _logprob_entries(self, output: CompletionOutput, start: int = 0) -> list[tuple[int, TokenLogprobs]] | None:
        if self.top_logprobs is None or output.logprobs is None:
            return None
        return list(zip(output.token_ids[start:], output.logprobs[start:]))

    def token_text(self, token_id: int) -> str:
        """A token's text, decoded once per response: a stream needs it for the body and again for text_offset."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def top_alternatives(self, logprobs: TokenLogprobs) -> list[tuple[int, float]]:
        ranked = sorted(logprobs.items(), key=lambda item: item[1], reverse=True)
        return [(token_id, _finite(lp)) for token_id, lp in ranked[: self.top_logprobs]]


class CompletionFormat(ResponseFormat):
    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, *args: Any, echo_prompts: list[str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.echo_prompts = echo_prompts

    def text_prefix(self, prompt_index: int) -> str:
        return self.echo_prompts[prompt_index] if self.echo_prompts is not None else ""

    def choice(self, index: int, prompt_index: int, output: CompletionOutput) -> dict:
        prefix = self.text_prefix(prompt_index)
        entries = self._logprob_entries(output)
        return {
            "index": index,
            "text": prefix + output.text,
            "logprobs": self.logprobs_body(entries, len(prefix)) if entries is not None else None,
            "finish_reason": output.finish_reason,
        }

    def delta_choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def logprobs_body(self, entries: list[tuple[int, TokenLogprobs]], text_offset: int) -> dict:
        body: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, logprobs in entries:
            token = self.token_text(token_id)
            body["tokens"].append(token)
            body["token_logprobs"].append(_finite(logprobs.get(token_id, -math.inf)))
            body["top_logprobs"].append({self.token_text(t): lp for t, lp in self.top_alternatives(logprobs)})
            body["text_offset"].append(text_offset)
            text_offset += len(token)
        return body


class ChatFormat(ResponseFormat):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def choice(self, index: int, prompt_index: int, output: CompletionOutput) -> dict:
        entries = self._logprob_entries(output)
        return {
            "index": index,
            "message": {"role": "assistant", "content": output.text},
            "logprobs": self.logprobs_body(entries, 0) if entries is not None else None,
            "finish_reason": output.finish_reason,
        }

    def opening_choices(self, num_choices: int) -> list[dict]:
        return [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(num_choices)
        ]

    def delta_choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def logprobs_body(self, entries: list[tuple[int, TokenLogprobs]], text_offset: int) -> dict:
        def token_entry(token_id: int, logprob: float) -> dict:
            token = self.token_text(token_id)
            return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}

        content = [
            {
                **token_entry(token_id, logprobs.get(token_id, -math.inf)),
                "top_logprobs": [token_entry(t, lp) for t, lp in self.top_alternatives(logprobs)],
            }
            for token_id, logprobs in entries
        ]
        return {"content": content, "refusal": None}
