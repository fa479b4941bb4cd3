"""Tool calling and the Responses API through the official client.

Tools are rendered by the chat template and calls parsed out of replies.

The tiny test model writes no tool calls of its own, so the calls come from an
echoed, continued assistant message (`continue_final_message` + `echo`): the
reply then begins with a call in the Hermes format, and what the model adds
after it is dropped, as vLLM's hermes parser drops text after the last call.
"""

from __future__ import annotations

import json

import httpx
import pytest

from server_harness import SERVED_NAME, running_server

# A Hermes/Qwen-style template that writes the tools and earlier calls into the prompt.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>"
    "<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}<|im_start|>user\n<tool_response>{{ message.content }}</tool_response><|im_end|>\n"
    "{%- elif message.tool_calls %}<|im_start|>assistant\n{% for call in message.tool_calls %}"
    "<tool_call>{{ call.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
# The assistant message the reply continues: one whole call, then whatever the model writes.
CONTINUED = [*QUESTION, {"role": "assistant", "content": f"<tool_call>{json.dumps(CALL)}</tool_call>"}]
CONTINUE = {"chat_template": TOOLS_TEMPLATE, "add_generation_prompt": False, "continue_final_message": True,
            "echo": True}


@pytest.fixture(scope="module")
def server():
    with running_server(enable_auto_tool_choice=True, tool_call_parser="hermes") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json={"model": SERVED_NAME, **body}, timeout=60)


def rendered(server, body: dict) -> str:
    tokens = post(server, "/tokenize", {"chat_template": TOOLS_TEMPLATE, **body}).json()["tokens"]
    return post(server, "/detokenize", {"tokens": tokens}).json()["prompt"]


def test_tools_and_earlier_calls_are_rendered_by_the_template(server):
    prompt = rendered(server, {"messages": QUESTION, "tools": [WEATHER_TOOL]})
    assert '"name": "get_weather"' in prompt and "Current weather of a city" in prompt
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    # Arguments reach the template as an object: tojson writes JSON, not a quoted string.
    assert '"arguments": {"city": "Paris"}' in rendered(server, {"messages": history})
    assert "<tool_response>sunny</tool_response>" in rendered(server, {"messages": history})


def test_auto_tool_choice_parses_the_call(client):
    response = client.chat.completions.create(model=SERVED_NAME, messages=CONTINUED, tools=[WEATHER_TOOL],
                                              max_tokens=4, temperature=0, extra_body=CONTINUE)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == CALL["arguments"]


def test_streamed_tool_call_deltas(client):
    chunks = list(client.chat.completions.create(model=SERVED_NAME, messages=CONTINUED, tools=[WEATHER_TOOL],
                                                 max_tokens=4, temperature=0, stream=True, extra_body=CONTINUE))
    calls = [call for chunk in chunks for call in (chunk.choices[0].delta.tool_calls or [])]
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", CALL["arguments"])]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""


def test_tool_choice_none_leaves_the_reply_as_content(client):
    response = client.chat.completions.create(model=SERVED_NAME, messages=CONTINUED, tools=[WEATHER_TOOL],
                                              tool_choice="none", max_tokens=4, temperature=0, extra_body=CONTINUE)
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].message.content.startswith("<tool_call>")


# Tools whose arguments are short enough for a random model to finish (enums): a forced call is
# always valid, whatever the model, once the grammar is complete.
CITY_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
FORCED = dict(model=SERVED_NAME, messages=QUESTION, tools=[CITY_TOOL, TIME_TOOL], max_tokens=150, temperature=1.0)


@pytest.mark.parametrize("seed", [1, 2])
def test_tool_choice_required_always_gives_valid_calls(client, seed):
    response = client.chat.completions.create(**FORCED, tool_choice="required", seed=seed)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        arguments = json.loads(call.function.arguments)
        assert (call.function.name, set(arguments)) in (("get_weather", {"city"}), ("get_time", {"zone"}))
    single = client.chat.completions.create(**FORCED, tool_choice="required", seed=seed, parallel_tool_calls=False)
    assert len(single.choices[0].message.tool_calls) == 1


def test_named_tool_choice_streamed_and_not(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    response = client.chat.completions.create(**FORCED, tool_choice=named, seed=4)
    [call] = response.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("UTC", "CET")
    assert response.choices[0].finish_reason == "stop"  # as OpenAI and vLLM report a named call
    chunks = list(client.chat.completions.create(**FORCED, tool_choice=named, seed=4, stream=True))
    [streamed] = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or [])]
    assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)


@pytest.mark.parametrize(("body", "message"), [
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among"),
    ({"tool_choice": "auto"}, "requires tools"),
])
def test_tool_choice_errors(server, body, message):
    response = post(server, "/v1/chat/completions", {"messages": QUESTION, **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"
    assert message in response.json()["error"]["message"]


def test_a_forced_call_and_another_constraint_is_400(server):
    response = post(server, "/v1/chat/completions", {"messages": QUESTION, "tools": [WEATHER_TOOL],
                                                     "tool_choice": "required",
                                                     "response_format": {"type": "json_object"}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"


def test_auto_tool_choice_needs_the_server_flags():
    with running_server() as plain:
        response = post(plain, "/v1/chat/completions", {"messages": QUESTION, "tools": [WEATHER_TOOL]})
    assert response.status_code == 400
    assert "--enable-auto-tool-choice and --tool-call-parser" in response.json()["error"]["message"]


# --- the Responses API ------------------------------------------------------------------------------


def test_responses_text_equals_chat(client):
    response = client.responses.create(model=SERVED_NAME, instructions="You are terse.", input="Say hello.",
                                       max_output_tokens=6, temperature=0)
    chat = client.chat.completions.create(model=SERVED_NAME, max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}])
    assert response.output_text == chat.choices[0].message.content
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == 6
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"


def test_responses_stream_events(client):
    request = dict(model=SERVED_NAME, input="Say hello.", max_output_tokens=6, temperature=0)
    whole = client.responses.create(**request)
    events = list(client.responses.create(**request, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text


def test_responses_take_function_tools_and_call_history(client, server):
    tool = {"type": "function", "name": "get_weather", "description": "Current weather of a city",
            "parameters": WEATHER_TOOL["function"]["parameters"]}
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    response = client.responses.create(model=SERVED_NAME, input=history, tools=[tool], max_output_tokens=3)
    assert response.status in ("completed", "incomplete") and response.output
    stored = post(server, "/v1/responses", {"input": "hi", "previous_response_id": "resp_1"})
    assert stored.status_code == 400 and stored.json()["error"]["param"] == "previous_response_id"
