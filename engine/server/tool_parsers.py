"""Tool calls out of generated text, for the formats of the common tool-calling model families.

`--tool-call-parser NAME` picks one (vLLM's names). Each parser knows where
its calls start in the text and how to read them; `ToolCallStream` feeds a
parser a stream's text deltas: content is passed on as it comes, text that may
be the start of a call is held back, and each call is sent as one delta once
it is complete (the name and the whole JSON arguments). OpenAI clients join
argument deltas, so one whole piece reads the same as many small ones.
"""

from __future__ import annotations

import json
import random
import re
import string
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str

    def as_openai(self, index: int | None = None) -> dict:
        call: dict[str, Any] = {"id": self.id, "type": "function",
                                "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            call["index"] = index
        return call


class ToolCallParser:
    """One format: the marker its calls start with, and how the text from there on holds the calls."""

    name: ClassVar[str]
    start: ClassVar[str]  # text that starts the calls
    keeps_special_tokens: ClassVar[bool] = False  # the marker is a special token: decode with it
    finish_reason: ClassVar[str | None] = "tool_calls"  # a reply's finish reason once it made calls (None: keep)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a whole output; text that does not parse as calls stays content."""
        position = self.calls_start(text)
        if position is None:
            return text, []
        calls = self.complete_calls(text[position:], final=True)
        if calls is None:
            return text, []
        return text[:position], calls

    def calls_start(self, text: str) -> int | None:
        position = text.find(self.start)
        return None if position < 0 else position

    def complete_calls(self, text: str, final: bool) -> list[ToolCall] | None:
        """The calls complete so far in `text` (which starts at the marker); None: not calls after all."""
        raise NotImplementedError

    def content_end(self, text: str) -> int:
        """How much of `text` (no calls started in it yet) is surely content: what could still grow into
        the start marker waits."""
        for length in range(min(len(self.start) - 1, len(text)), 0, -1):
            if self.start.startswith(text[-length:]):
                return len(text) - length
        return len(text)

    def new_id(self) -> str:
        return f"call_{uuid.uuid4().hex[:24]}"

    def call_from_json(self, item: Any) -> ToolCall | None:
        """A {"name": ..., "arguments"|"parameters": {...}} object as a call; None for anything else."""
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as JSON text already
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        return ToolCall(item["name"], json.dumps(arguments, ensure_ascii=False), self.new_id())


class HermesParser(ToolCallParser):
    """Hermes and Qwen2.5/Qwen3: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one per call."""

    name = "hermes"
    start = "<tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def complete_calls(self, text: str, final: bool) -> list[ToolCall] | None:
        """Every closed <tool_call> block; text after the last one (an unclosed call) is dropped, as vLLM does."""
        calls = []
        for match in self._CALL.finditer(text):
            try:
                call = self.call_from_json(json.loads(match.group(1)))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return None
            calls.append(call)
        return None if final and not calls else calls


class _JSONCallsParser(ToolCallParser):
    """Formats whose calls are JSON values after a marker: read them with a JSON decoder as they complete."""

    _decoder = json.JSONDecoder()

    def json_values(self, text: str) -> tuple[list[Any], str]:
        """The JSON values complete in `text` (separated by whitespace, ',' or ';') and the rest."""
        values, position = [], 0
        while True:
            while position < len(text) and text[position] in " \t\r\n,;":
                position += 1
            if position == len(text):
                return values, ""
            try:
                value, position = self._decoder.raw_decode(text, position)
            except json.JSONDecodeError:
                return values, text[position:]
            values.append(value)


class Llama3JSONParser(_JSONCallsParser):
    """Llama 3.1/3.2 JSON tool calls: {"name": ..., "parameters": {...}}, optionally after <|python_tag|>."""

    name = "llama3_json"
    start = "{"
    keeps_special_tokens = True
    PYTHON_TAG = "<|python_tag|>"

    def calls_start(self, text: str) -> int | None:
        """Calls are the whole output: it starts (after whitespace or the python tag) with '{'."""
        stripped = text.lstrip()
        if stripped.startswith(self.PYTHON_TAG):
            stripped = stripped[len(self.PYTHON_TAG):].lstrip()
        if stripped.startswith("{"):
            return 0
        return None

    def content_end(self, text: str) -> int:
        """The first characters decide whether the whole output is a call: until then nothing is content."""
        stripped = text.lstrip()
        return 0 if not stripped or self.PYTHON_TAG.startswith(stripped[: len(self.PYTHON_TAG)]) else len(text)

    def complete_calls(self, text: str, final: bool) -> list[ToolCall] | None:
        body = text.lstrip()
        if body.startswith(self.PYTHON_TAG):
            body = body[len(self.PYTHON_TAG):]
        values, rest = self.json_values(body)
        calls = [self.call_from_json(value) for value in values]
        if any(call is None for call in calls) or (final and rest.strip()):
            return None
        return calls


class MistralParser(_JSONCallsParser):
    """Mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]; call ids are 9 letters and digits."""

    name = "mistral"
    start = "[TOOL_CALLS]"
    keeps_special_tokens = True
    _ID_ALPHABET = string.ascii_letters + string.digits

    def new_id(self) -> str:
        return "".join(random.choices(self._ID_ALPHABET, k=9))  # noqa: S311 - an id, not a secret

    def complete_calls(self, text: str, final: bool) -> list[ToolCall] | None:
        values, rest = self.json_values(text[len(self.start):])
        if not values:
            return None if final else []
        if len(values) != 1 or not isinstance(values[0], list):
            return None
        calls = [self.call_from_json(item) for item in values[0]]
        if any(call is None for call in calls) or (final and rest.strip()):
            return None
        return calls


class _WholeOutputParser(_JSONCallsParser):
    """A forced call (tool_choice required or named): the grammar makes the whole output the call(s)."""

    start = ""

    def calls_start(self, text: str) -> int | None:
        return 0

    def content_end(self, text: str) -> int:
        return 0


class NamedCallParser(_WholeOutputParser):
    """tool_choice naming a function: the output is that function's arguments object."""

    name = "named"
    finish_reason = None  # OpenAI and vLLM keep "stop" for a named call

    def __init__(self, function_name: str):
        self.function_name = function_name

    def complete_calls(self, text: str, final: bool) -> list[ToolCall] | None:
        if not final:
            return []
        values, rest = self.json_values(text)
        if len(values) != 1 or not isinstance(values[0], dict) or rest.strip():
            return None  # cut short (max_tokens): what was written stays content
        return [ToolCall(self.function_name, json.dumps(values[0], ensure_ascii=False), self.new_id())]


class RequiredCallsParser(_WholeOutputParser):
    """tool_choice "required": the output is a JSON array of {"name", "parameters"} (forced_calls_schema)."""

    name = "required"

    def complete_calls(self, text: str, final: bool) -> list[ToolCall] | None:
        if not final:
            return []
        values, rest = self.json_values(text)
        if len(values) != 1 or not isinstance(values[0], list) or rest.strip():
            return None
        calls = [self.call_from_json(item) for item in values[0]]
        return None if not calls or any(call is None for call in calls) else calls


def forced_calls_schema(tools: list[dict], function_name: str | None, parallel: bool) -> dict:
    """The JSON schema that makes every output a valid call: of `function_name`, or of any tool (required).

    A named call is the function's arguments object; "required" is an array of
    {"name", "parameters"} objects, one or more (exactly one without parallel calls).
    """
    parameters = {tool["function"]["name"]: tool["function"].get("parameters") or {"type": "object"}
                  for tool in tools}
    if function_name is not None:
        return parameters[function_name]
    call = {"anyOf": [
        {"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
         "required": ["name", "parameters"], "additionalProperties": False}
        for name, schema in parameters.items()
    ]}
    return {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})}


TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {
    parser.name: parser for parser in (HermesParser, Llama3JSONParser, MistralParser)
}


class ToolCallStream:
    """One choice's streamed text, split into content deltas and whole tool-call deltas."""

    def __init__(self, parser: ToolCallParser):
        self.parser = parser
        self.text = ""  # everything received
        self.sent = 0  # characters of text passed on as content (or where the calls start)
        self.calls_start: int | None = None
        self.plain = False  # what looked like calls did not parse: the rest is all content
        self.calls_sent = 0

    def feed(self, delta: str, final: bool) -> tuple[str, list[ToolCall]]:
        """(content to send, calls completed) after `delta`; `final`: the output ended with it."""
        self.text += delta
        if self.plain:
            return self._content_until(len(self.text)), []
        content = ""
        if self.calls_start is None:
            position = self.parser.calls_start(self.text)
            if position is None:
                return self._content_until(len(self.text) if final else self.parser.content_end(self.text)), []
            content, self.calls_start = self._content_until(position), position
        calls = self.parser.complete_calls(self.text[self.calls_start:], final)
        if calls is None:
            if not self.calls_sent:  # never calls: the held-back text is content after all
                self.plain = True
                content += self._content_until(len(self.text))
            return content, []
        new_calls = calls[self.calls_sent:]
        self.calls_sent = len(calls)
        return content, new_calls

    def _content_until(self, end: int) -> str:
        content = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return content
