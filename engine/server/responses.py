"""Engine outputs -> OpenAI response bodies and SSE streams, for completions and chat.

The engine's outputs arrive as deltas (what each step added); a stream sends
each as a chunk, one choice per chunk (as OpenAI and vLLM do: clients read
choices[0]), and a whole response reads what Generation folded together. The engine holds back text that might still become a stop string,
so the deltas never contain one. Choice index = prompt index * n + output
index, as OpenAI numbers choices of multi-prompt requests.
"""

from __future__ import annotations

import dataclasses
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
from engine.server.tool_parsers import ToolCallParser, ToolCallStream

# What OpenAI-compatible servers report for a logprob of -inf (JSON has no infinity).
MIN_LOGPROB = -9999.0

DONE_EVENT = "data: [DONE]\n\n"


def sse_event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


@dataclass(frozen=True)
class ResponseOptions:
    """What a request asked about the shape of its response (as opposed to its sampling)."""

    n: int = 1
    top_logprobs: int | None = None  # None: no logprobs requested
    include_usage: bool = False
    continuous_usage: bool = False  # vLLM: usage on every chunk
    return_token_ids: bool = False  # vLLM: prompt and output token ids in the response
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprob tokens as "token_id:<id>"
    prompt_logprobs: bool = False  # vLLM's prompt_logprobs: the prompt's logprobs in their own field


@dataclass
class _ChoiceState:
    """What a stream has sent of one choice (outputs arrive as deltas)."""

    tokens_sent: int = 0
    text_offset: int = 0
    finished: bool = False


class ResponseFormat:
    """What completions and chat share: ids, usage, choice numbering, the streaming algorithm."""

    object_name = ""
    chunk_object_name = ""
    id_prefix = ""

    def __init__(self, model_name: str, tokenizer: Any, options: ResponseOptions):
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.options = options
        self.n = options.n
        self.top_logprobs = options.top_logprobs
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._token_texts: dict[int, str] = {}

    # --- shapes the subclasses define ------------------------------------------------------

    def choice(self, index: int, prompt_index: int, final: RequestOutput, output: CompletionOutput) -> dict:
        raise NotImplementedError

    def delta_choice(self, index: int, text: str, logprobs: dict | None, output: CompletionOutput) -> dict | None:
        """A chunk's choice for new text; None: nothing to send yet."""
        raise NotImplementedError

    def logprobs_body(self, entries: list[tuple[int, TokenLogprobs]], text_offset: int) -> dict:
        raise NotImplementedError

    def opening_chunk(self, index: int, final: RequestOutput) -> dict | None:
        """A chunk sent when a choice first appears, before its text (chat announces the role)."""
        return None

    def text_prefix(self, prompt_index: int) -> str:
        """Text that precedes a choice's output (echo)."""
        return ""

    def prefix_logprob_entries(self, final: RequestOutput) -> list[tuple[int, TokenLogprobs | None]]:
        """Logprob entries that precede a choice's own (echo: the prompt's)."""
        return []

    def shown(self, output: CompletionOutput) -> CompletionOutput:
        """What of an output the response shows (all of it, unless the request asked for the prompt alone)."""
        return output

    # --- shared ----------------------------------------------------------------------------

    def response(self, finals: list[RequestOutput]) -> dict:
        choices = [
            self.choice(prompt_index * self.n + output.index, prompt_index, final, self.shown(output))
            for prompt_index, final in enumerate(finals)
            for output in final.outputs
        ]
        return self._body(self.object_name, choices, usage=self.usage(finals))

    async def stream(self, generation: Generation) -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}
        states: dict[int, _ChoiceState] = {}
        try:
            async for prompt_index, output in generation.outputs():
                finals[prompt_index] = total = generation.total(prompt_index)
                for completion in output.outputs:
                    index = prompt_index * self.n + completion.index
                    if index not in states:
                        opening = self.opening_chunk(index, output)
                        if opening is not None:
                            yield sse_event(opening)
                    choice = self._next_delta(total, prompt_index, completion, states)
                    if choice is not None:
                        usage = self.usage([total], states[index].tokens_sent) if self.options.continuous_usage else None
                        yield sse_event(self._chunk([choice], usage))
        except Exception as exc:  # noqa: BLE001 - headers are sent: the error travels as an event
            yield sse_error_event(exc)
            return
        if self.options.include_usage:
            yield sse_event(self._chunk([], usage=self.usage(list(finals.values()))))
        yield DONE_EVENT

    def _next_delta(self, total: RequestOutput, prompt_index: int, output: CompletionOutput,
                    states: dict[int, _ChoiceState]) -> dict | None:
        index = prompt_index * self.n + output.index
        state = states.get(index)
        prefix, prefix_entries = "", []
        if state is None:
            prefix, prefix_entries = self.text_prefix(prompt_index), self.prefix_logprob_entries(total)
            state = states[index] = _ChoiceState()
        if state.finished:
            return None
        output = self.shown(output)
        text = prefix + output.text
        new_token_ids = output.token_ids
        entries = self._logprob_entries(output)
        logprobs = None
        if entries is not None:
            entries = prefix_entries + entries
            logprobs = self.logprobs_body(entries, state.text_offset)
            state.text_offset += sum(len(self.token_text(token_id)) for token_id, _ in entries)
        state.tokens_sent += len(new_token_ids)
        state.finished = output.finished
        if not (text or entries or output.finished or (self.options.return_token_ids and new_token_ids)):
            return None
        choice = self.delta_choice(index, text, logprobs, output)
        if choice is None:
            return None
        if self.options.return_token_ids:
            choice["token_ids"] = new_token_ids
        return choice

    def usage(self, finals: list[RequestOutput], choice_tokens: int | None = None) -> dict:
        """The request's token counts; with `choice_tokens`, one choice's tokens so far (continuous usage)."""
        prompt_tokens, completion_tokens = token_counts(finals)
        if choice_tokens is not None:
            completion_tokens = choice_tokens
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        return self._body(self.chunk_object_name, choices, usage=usage)

    def _body(self, object_name: str, choices: list[dict], usage: dict | None) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model_name,
                "choices": choices, "usage": usage}

    def _logprob_entries(self, output: CompletionOutput) -> list[tuple[int, TokenLogprobs]] | None:
        if self.top_logprobs is None or output.logprobs is None:
            return None
        return list(zip(output.token_ids, output.logprobs))

    def token_text(self, token_id: int) -> str:
        """A token's text, decoded once per response: a stream needs it for the body and again for text_offset."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def token_label(self, token_id: int) -> str:
        """How a logprobs entry names a token: its text, or "token_id:<id>" when the request asked for ids."""
        return f"token_id:{token_id}" if self.options.tokens_as_ids else self.token_text(token_id)

    def top_alternatives(self, logprobs: TokenLogprobs) -> list[tuple[int, float]]:
        """The top alternatives, most likely first (top_logprobs -1: every one the engine sent)."""
        ranked = sorted(logprobs.items(), key=lambda item: item[1], reverse=True)
        return [(token_id, _finite(lp)) for token_id, lp in ranked[: None if self.top_logprobs == -1 else self.top_logprobs]]

    def prompt_logprobs_body(self, final: RequestOutput) -> list[dict | None]:
        """vLLM's prompt_logprobs: per prompt token (None for the first) {token id: logprob, rank, text}."""
        body: list[dict | None] = []
        for entry, prompt_rank in zip(final.prompt_logprobs, final.prompt_token_ranks):
            if entry is None:
                body.append(None)
                continue
            prompt_token = next(iter(entry))  # the prompt token comes first, then the top ones
            ranked = sorted(entry.items(), key=lambda item: item[1], reverse=True)
            body.append({
                str(token_id): {"logprob": _finite(lp), "rank": prompt_rank if token_id == prompt_token else rank,
                                "decoded_token": self.token_text(token_id)}
                for rank, (token_id, lp) in enumerate(ranked, start=1)
            })
        return body


class CompletionFormat(ResponseFormat):
    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, *args: Any, echo_prompts: list[str] | None = None, echo_only: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.echo_prompts = echo_prompts
        self.echo_only = echo_only  # max_tokens 0 with echo: the prompt alone

    def text_prefix(self, prompt_index: int) -> str:
        return self.echo_prompts[prompt_index] if self.echo_prompts is not None else ""

    def prefix_logprob_entries(self, final: RequestOutput) -> list[tuple[int, TokenLogprobs | None]]:
        """With echo, the prompt's tokens lead the logprobs (the first without any, as OpenAI and vLLM)."""
        if self.echo_prompts is None or self.top_logprobs is None:
            return []
        return list(zip(final.prompt_token_ids, final.prompt_logprobs or [None] * len(final.prompt_token_ids)))

    def shown(self, output: CompletionOutput) -> CompletionOutput:
        if not self.echo_only:
            return output
        return dataclasses.replace(output, text="", token_ids=[], logprobs=[] if output.logprobs is not None else None)

    def choice(self, index: int, prompt_index: int, final: RequestOutput, output: CompletionOutput) -> dict:
        prefix = self.text_prefix(prompt_index)
        entries = self._logprob_entries(output)
        choice = {
            "index": index,
            "text": prefix + output.text,
            "logprobs": self.logprobs_body(self.prefix_logprob_entries(final) + entries, 0) if entries is not None else None,
            "finish_reason": output.finish_reason,
            "stop_reason": output.stop_reason,
            "prompt_logprobs": self.prompt_logprobs_body(final) if self.options.prompt_logprobs else None,
        }
        if self.options.return_token_ids:
            choice.update(prompt_token_ids=final.prompt_token_ids, token_ids=output.token_ids)
        return choice

    def opening_chunk(self, index: int, final: RequestOutput) -> dict | None:
        if not self.options.return_token_ids:
            return None
        choice = {"index": index, "text": "", "logprobs": None, "finish_reason": None,
                  "prompt_token_ids": final.prompt_token_ids, "token_ids": []}
        return self._chunk([choice])

    def delta_choice(self, index: int, text: str, logprobs: dict | None, output: CompletionOutput) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": output.finish_reason,
                "stop_reason": output.stop_reason}

    def logprobs_body(self, entries: list[tuple[int, TokenLogprobs | None]], text_offset: int) -> dict:
        """OpenAI's legacy shape; top_logprobs holds the sampled token plus the top alternatives (vLLM's).
        An echoed prompt's first token has no logprobs: None in token_logprobs and top_logprobs."""
        body: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, logprobs in entries:
            body["tokens"].append(self.token_label(token_id))
            if logprobs is None:
                body["token_logprobs"].append(None)
                body["top_logprobs"].append(None)
            else:
                chosen = _finite(logprobs.get(token_id, -math.inf))
                body["token_logprobs"].append(chosen)
                top = {self.token_label(token_id): chosen}
                top.update((self.token_label(t), lp) for t, lp in self.top_alternatives(logprobs))
                body["top_logprobs"].append(top)
            body["text_offset"].append(text_offset)
            text_offset += len(self.token_text(token_id))
        return body


class ChatFormat(ResponseFormat):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, *args: Any, role: str = "assistant", echo: str = "", tool_parser: ToolCallParser | None = None,
                 parallel_tool_calls: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.role = role
        self.echo = echo  # the continued message's text, when the request asked for echo
        self.tool_parser = tool_parser  # None: the reply is all content (tool_choice "none", or no tools)
        self.max_tool_calls = None if parallel_tool_calls else 1
        self._tool_streams: dict[int, ToolCallStream] = {}

    def text_prefix(self, prompt_index: int) -> str:
        return self.echo

    def response(self, finals: list[RequestOutput]) -> dict:
        body = super().response(finals)
        if self.options.return_token_ids:
            body["prompt_token_ids"] = finals[0].prompt_token_ids
        # Always present, null unless asked (vLLM's shape: clients read the attribute).
        body["prompt_logprobs"] = self.prompt_logprobs_body(finals[0]) if self.options.prompt_logprobs else None
        return body

    def choice(self, index: int, prompt_index: int, final: RequestOutput, output: CompletionOutput) -> dict:
        entries = self._logprob_entries(output)
        content, calls = self.echo + output.text, []
        if self.tool_parser is not None:
            content, calls = self.tool_parser.parse(content)
            calls = calls[: self.max_tool_calls]
        message: dict[str, Any] = {"role": self.role, "content": content}
        if calls:
            message.update(content=content if content.strip() else None, tool_calls=[c.as_openai() for c in calls])
        choice = {
            "index": index,
            "message": message,
            "logprobs": self.logprobs_body(entries, 0) if entries is not None else None,
            "finish_reason": (self.tool_parser.finish_reason or output.finish_reason) if calls else output.finish_reason,
            "stop_reason": output.stop_reason,
        }
        if self.options.return_token_ids:
            choice["token_ids"] = output.token_ids
        return choice

    def opening_chunk(self, index: int, final: RequestOutput) -> dict | None:
        choice = {"index": index, "delta": {"role": self.role, "content": ""}, "logprobs": None,
                  "finish_reason": None}
        chunk = self._chunk([choice])
        if self.options.return_token_ids:
            chunk["prompt_token_ids"] = final.prompt_token_ids
        return chunk

    def delta_choice(self, index: int, text: str, logprobs: dict | None, output: CompletionOutput) -> dict | None:
        delta: dict[str, Any] = {}
        finish_reason = output.finish_reason
        if self.tool_parser is None:
            content = text
        else:
            stream = self._tool_streams.setdefault(index, ToolCallStream(self.tool_parser))
            first_call = stream.calls_sent
            content, calls = stream.feed(text, final=output.finished)
            calls = calls[: None if self.max_tool_calls is None else max(0, self.max_tool_calls - first_call)]
            if calls:
                delta["tool_calls"] = [call.as_openai(i) for i, call in enumerate(calls, start=first_call)]
            if output.finished and stream.calls_sent:
                finish_reason = self.tool_parser.finish_reason or finish_reason
        if content:
            delta["content"] = content
        if not (delta or logprobs or output.finished):
            return None
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                "stop_reason": output.stop_reason}

    def logprobs_body(self, entries: list[tuple[int, TokenLogprobs]], text_offset: int) -> dict:
        def token_entry(token_id: int, logprob: float) -> dict:
            token = self.token_label(token_id)
            return {"token": token, "logprob": _finite(logprob), "bytes": list(self.token_text(token_id).encode())}

        content = [
            {
                **token_entry(token_id, logprobs.get(token_id, -math.inf)),
                "top_logprobs": [token_entry(t, lp) for t, lp in self.top_alternatives(logprobs)],
            }
            for token_id, logprobs in entries
        ]
        return {"content": content, "refusal": None}
