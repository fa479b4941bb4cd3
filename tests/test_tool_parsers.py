"""Tool-call parsers on whole outputs and on streams cut where a real tokenizer cuts them.

A stream's content deltas joined must equal the whole output's content, and its
calls the whole output's calls, whatever the token boundaries.
"""

from __future__ import annotations

import json

import pytest

from engine.server.tool_parsers import TOOL_CALL_PARSERS, NamedCallParser, RequiredCallsParser, ToolCallStream
from engine.testing.tokenizer import trained_tokenizer

WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
TIME = {"name": "get_time", "arguments": {"zone": "Europe/Paris"}}

# (parser, model family whose tokenizer cuts the stream, output, expected content, expected calls)
CASES = [
    ("hermes", "qwen2", "Let me check.\n<tool_call>\n" + json.dumps(WEATHER) + "\n</tool_call>",
     "Let me check.\n", [WEATHER]),
    ("hermes", "qwen2", "<tool_call>" + json.dumps(WEATHER) + "</tool_call>\n<tool_call>" + json.dumps(TIME)
     + "</tool_call>", "", [WEATHER, TIME]),
    ("hermes", "qwen2", "No tools needed: 2 < 3 and <tool is not a tag.", "No tools needed: 2 < 3 and <tool is "
     "not a tag.", []),
    ("hermes", "qwen2", "<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    ("llama3_json", "llama", json.dumps({"name": "get_weather", "parameters": WEATHER["arguments"]}), "", [WEATHER]),
    ("llama3_json", "llama", "<|python_tag|>" + json.dumps(WEATHER) + "; " + json.dumps(TIME), "", [WEATHER, TIME]),
    ("llama3_json", "llama", "The weather is {unknown}.", "The weather is {unknown}.", []),
    ("llama3_json", "llama", '{"answer": 42}', '{"answer": 42}', []),
    ("mistral", "mistral", "[TOOL_CALLS] " + json.dumps([WEATHER, TIME]), "", [WEATHER, TIME]),
    ("mistral", "mistral", "Sure. [TOOL_CALLS]" + json.dumps([WEATHER]), "Sure. ", [WEATHER]),
    ("mistral", "mistral", "[TOOL_CALLS] [{\"name\": ", "[TOOL_CALLS] [{\"name\": ", []),
]


def as_dicts(calls) -> list[dict]:
    return [{"name": call.name, "arguments": json.loads(call.arguments)} for call in calls]


@pytest.mark.parametrize(("parser_name", "family", "text", "content", "calls"), CASES)
def test_whole_output(parser_name, family, text, content, calls):
    parsed_content, parsed_calls = TOOL_CALL_PARSERS[parser_name]().parse(text)
    assert parsed_content == content
    assert as_dicts(parsed_calls) == calls


@pytest.mark.parametrize(("parser_name", "family", "text", "content", "calls"), CASES)
def test_stream_cut_at_token_boundaries_reads_the_same(parser_name, family, text, content, calls):
    tokenizer = trained_tokenizer(family)
    token_ids = tokenizer.encode(text, add_special_tokens=False).ids
    pieces, decoded = [], ""
    for end in range(1, len(token_ids) + 1):  # incremental decoding, as the detokenizer delivers text
        now = tokenizer.decode(token_ids[:end], skip_special_tokens=False)
        if not now.endswith("\ufffd"):
            pieces.append(now[len(decoded):])
            decoded = now
    assert decoded == text
    stream = ToolCallStream(TOOL_CALL_PARSERS[parser_name]())
    streamed_content, streamed_calls = "", []
    for i, piece in enumerate(pieces):
        new_content, new_calls = stream.feed(piece, final=i == len(pieces) - 1)
        streamed_content += new_content
        streamed_calls += new_calls
    assert streamed_content == content
    assert as_dicts(streamed_calls) == calls


def test_calls_are_sent_as_soon_as_they_are_complete():
    stream = ToolCallStream(TOOL_CALL_PARSERS["hermes"]())
    first = "<tool_call>" + json.dumps(WEATHER) + "</tool_call>"
    assert stream.feed("<tool", final=False) == ("", [])
    _, calls = stream.feed(first[len("<tool"):] + "<tool_call>{\"na", final=False)
    assert as_dicts(calls) == [WEATHER]


def test_mistral_call_ids_are_nine_alphanumerics():
    _, calls = TOOL_CALL_PARSERS["mistral"]().parse("[TOOL_CALLS]" + json.dumps([WEATHER]))
    assert len(calls[0].id) == 9 and calls[0].id.isalnum()


def test_forced_calls_are_the_whole_output_and_arrive_at_the_end():
    required = json.dumps([{"name": "get_weather", "parameters": WEATHER["arguments"]}, TIME])
    for parser, text, expected in [(RequiredCallsParser(), required, [WEATHER, TIME]),
                                   (NamedCallParser("get_weather"), json.dumps(WEATHER["arguments"]), [WEATHER])]:
        assert as_dicts(parser.parse(text)[1]) == expected
        stream = ToolCallStream(parser)
        assert stream.feed(text[:10], final=False) == ("", [])
        content, calls = stream.feed(text[10:], final=True)
        assert content == "" and as_dicts(calls) == expected
    cut_short = '[{"name": "get_weather", "param'
    assert RequiredCallsParser().parse(cut_short) == (cut_short, [])
