"""OpenAI's Responses API (POST /v1/responses): text and function tools, streamed or not.

A Responses request is a chat request in other clothes: `input` items become
chat messages (instructions first as the system message, function calls and
their outputs as assistant tool calls and tool messages), and generation,
sampling defaults, tool-call parsing and validation are the chat route's.
Only the shapes differ: output items instead of choices, and a stream of
typed events (response.created ... response.completed) instead of chunks.
Nothing is stored, so `previous_response_id` cannot be served.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from engine.errors import InvalidRequestError
from engine.outputs import RequestOutput
from engine.server.errors import as_api_error, error_body
from engine.server.generation import Generation, token_counts
from engine.server.protocol import UNSUPPORTED_FIELDS, ChatCompletionRequest, reject_unsupported
from engine.server.tool_parsers import ToolCall, ToolCallParser, ToolCallStream

# Responses fields this server cannot honour, on top of the chat ones.
UNSUPPORTED_RESPONSES_FIELDS = {
    **UNSUPPORTED_FIELDS,
    "previous_response_id": "responses are not stored; send the whole conversation as input",
    "conversation": "responses are not stored; send the whole conversation as input",
    "background": "responses run in the foreground only",
    "prompt": "stored prompt templates are not supported",
    "prompt_logprobs": "vLLM's sampling extensions are taken by /v1/chat/completions, not here",
    "bad_words": "vLLM's sampling extensions are taken by /v1/chat/completions, not here",
}


class InputText(BaseModel):
    type: Literal["input_text", "output_text", "text"]
    text: StrictStr


class MessageItem(BaseModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: StrictStr | list[InputText]


class FunctionCallItem(BaseModel):
    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr
    id: StrictStr | None = None
    status: StrictStr | None = None


class FunctionCallOutputItem(BaseModel):
    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr
    id: StrictStr | None = None
    status: StrictStr | None = None


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem


class FunctionTool(BaseModel):
    type: Literal["function"]
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class NamedFunctionChoice(BaseModel):
    type: Literal["function"]
    name: StrictStr


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"] = "text"


class TextOptions(BaseModel):
    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: StrictStr | None = None
    input: StrictStr | list[InputItem]
    instructions: StrictStr | None = None
    max_output_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    stream: StrictBool = False
    store: StrictBool | None = None  # accepted; nothing is stored either way
    text: TextOptions | None = None
    metadata: dict[str, StrictStr] | None = None
    user: StrictStr | None = None

    def to_chat(self) -> ChatCompletionRequest:
        """The equivalent chat request, validated by the chat request's own rules."""
        reject_unsupported(self.model_extra or {}, UNSUPPORTED_RESPONSES_FIELDS)
        chat: dict[str, Any] = {
            "model": self.model, "messages": self._messages(), "max_tokens": self.max_output_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "parallel_tool_calls": self.parallel_tool_calls,
            "stream": self.stream,
        }
        if self.tools:
            chat["tools"] = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                             for tool in self.tools]
        if isinstance(self.tool_choice, NamedFunctionChoice):
            chat["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            chat["tool_choice"] = self.tool_choice
        if self.text is not None and self.text.format.type != "text":
            chat["response_format"] = _chat_response_format(self.text.format)
        return ChatCompletionRequest.model_validate({k: v for k, v in chat.items() if v is not None})

    def _messages(self) -> list[dict]:
        messages: list[dict] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}]
        for item in self.input:
            if isinstance(item, MessageItem):
                content = item.content if isinstance(item.content, str) else "\n".join(p.text for p in item.content)
                messages.append({"role": item.role, "content": content})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                    messages[-1]["tool_calls"].append(call)  # parallel calls belong to one assistant turn
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        if not messages:
            raise InvalidRequestError("input must hold at least one item", param="input")
        return messages


def _chat_response_format(text_format: TextFormat) -> dict:
    """Responses' text.format (schema fields inline) as chat's response_format (schema under json_schema)."""
    if text_format.type == "json_object":
        return {"type": "json_object"}
    fields = text_format.model_extra or {}
    return {"type": "json_schema", "json_schema": {"name": fields.get("name"), "schema": fields.get("schema"),
                                                   "strict": fields.get("strict")}}


class ResponsesFormat:
    """One response's ids and shapes, for the whole body and for its stream of events."""

    def __init__(self, model_name: str, request: ResponsesRequest, tool_parser: ToolCallParser | None):
        self.model_name = model_name
        self.request = request
        self.tool_parser = tool_parser
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.max_calls = None if request.parallel_tool_calls is not False else 1
        self._sequence = 0

    # --- whole response ------------------------------------------------------------------------

    def response(self, finals: list[RequestOutput]) -> dict:
        final = finals[0]  # one input, n = 1
        output = final.outputs[0]
        content, calls = output.text, []
        if self.tool_parser is not None:
            content, calls = self.tool_parser.parse(output.text)
        items = []
        if content.strip() or not calls:
            items.append(self.message_item(f"msg_{uuid.uuid4().hex}", content, "completed"))
        items += [self.call_item(call, "completed") for call in calls[: self.max_calls]]
        return self.body(items, final, output.finish_reason)

    def body(self, items: list[dict], final: RequestOutput | None, finish_reason: str | None) -> dict:
        status = "in_progress" if final is None else "incomplete" if finish_reason in ("length", "abort") else "completed"
        incomplete = None
        if status == "incomplete":
            incomplete = {"reason": "max_output_tokens" if finish_reason == "length" else "interrupted"}
        request = self.request
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "model": self.model_name,
            "status": status, "output": items, "incomplete_details": incomplete, "error": None,
            "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "temperature": request.temperature, "top_p": request.top_p,
            "tools": [tool.model_dump(exclude_none=True) for tool in request.tools or []],
            "tool_choice": (request.tool_choice.model_dump() if isinstance(request.tool_choice, BaseModel)
                            else request.tool_choice or "auto"),
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "text": {"format": {"type": "text"}}, "metadata": request.metadata or {}, "store": False,
            "usage": self.usage(final) if final is not None else None,
        }

    @staticmethod
    def usage(final: RequestOutput) -> dict:
        input_tokens, output_tokens = token_counts([final])
        return {"input_tokens": input_tokens, "output_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
                "input_tokens_details": {"cached_tokens": final.num_cached_tokens},
                "output_tokens_details": {"reasoning_tokens": 0}}

    @staticmethod
    def message_item(item_id: str, text: str, status: str) -> dict:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" \
            else []
        return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def call_item(call: ToolCall, status: str) -> dict:
        return {"type": "function_call", "id": f"fc_{call.id}", "call_id": call.id, "name": call.name,
                "arguments": call.arguments if status == "completed" else "", "status": status}

    # --- stream of events ----------------------------------------------------------------------

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def stream(self, generation: Generation) -> AsyncIterator[str]:
        yield self.event("response.created", response=self.body([], None, None))
        yield self.event("response.in_progress", response=self.body([], None, None))
        items: list[dict] = []
        message: dict | None = None  # the open message item, while text streams into it
        text, final = "", None
        tool_stream = ToolCallStream(self.tool_parser) if self.tool_parser is not None else None
        try:
            async for _, output in generation.outputs():
                final = generation.total(0)
                completion = output.outputs[0]
                delta = completion.text
                content, calls = (delta, []) if tool_stream is None else tool_stream.feed(delta, completion.finished)
                if content:
                    if message is None:
                        message = self.message_item(f"msg_{uuid.uuid4().hex}", "", "in_progress")
                        items.append(message)
                        for event in self._open_message(message, len(items) - 1):
                            yield event
                    text += content
                    yield self.event("response.output_text.delta", item_id=message["id"], output_index=len(items) - 1,
                                     content_index=0, delta=content, logprobs=[])
                for call in calls[: None if self.max_calls is None else self.max_calls - self._calls(items)]:
                    if message is not None:
                        for event in self._close_message(message, items.index(message), text):
                            yield event
                        message = None
                    items.append(self.call_item(call, "completed"))
                    for event in self._call_events(call, len(items) - 1):
                        yield event
        except Exception as exc:  # noqa: BLE001 - headers are sent: the error travels as an event
            error = as_api_error(exc)
            yield self.event("error", **error_body(error.status, error.message, error.param, error.code)["error"])
            return
        if message is not None:
            for event in self._close_message(message, items.index(message), text):
                yield event
        if not items:  # an empty reply is still one (empty) message
            message = self.message_item(f"msg_{uuid.uuid4().hex}", "", "in_progress")
            items.append(message)
            for event in [*self._open_message(message, 0), *self._close_message(message, 0, "")]:
                yield event
        body = self.body(items, final, final.outputs[0].finish_reason)
        yield self.event("response.completed" if body["status"] == "completed" else "response.incomplete",
                         response=body)

    @staticmethod
    def _calls(items: list[dict]) -> int:
        return sum(item["type"] == "function_call" for item in items)

    def _open_message(self, message: dict, index: int) -> list[str]:
        return [self.event("response.output_item.added", output_index=index, item=dict(message)),
                self.event("response.content_part.added", item_id=message["id"], output_index=index, content_index=0,
                           part={"type": "output_text", "text": "", "annotations": []})]

    def _close_message(self, message: dict, index: int, text: str) -> list[str]:
        message.update(self.message_item(message["id"], text, "completed"))
        part = message["content"][0]
        return [self.event("response.output_text.done", item_id=message["id"], output_index=index, content_index=0,
                           text=text, logprobs=[]),
                self.event("response.content_part.done", item_id=message["id"], output_index=index, content_index=0,
                           part=part),
                self.event("response.output_item.done", output_index=index, item=message)]

    def _call_events(self, call: ToolCall, index: int) -> list[str]:
        item_id = f"fc_{call.id}"
        return [self.event("response.output_item.added", output_index=index, item=self.call_item(call, "in_progress")),
                self.event("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                           delta=call.arguments),
                self.event("response.function_call_arguments.done", item_id=item_id, output_index=index,
                           name=call.name, arguments=call.arguments),
                self.event("response.output_item.done", output_index=index, item=self.call_item(call, "completed"))]
