"""OpenAI request bodies as pydantic models, and their translation to SamplingParams.

Type errors are caught here (FastAPI turns them into 400s); range checks live in
SamplingParams so that the offline API and the server reject the same values
with the same messages.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from engine.beam_search import BeamSearchParams, EarlyStopping
from engine.errors import InvalidRequestError
from engine.generation_defaults import SamplingDefaults
from engine.sampling import SEED_MAX, SEED_MIN, SamplingParams
from engine.sampling import StructuredOutputSpec
from engine.server.tool_parsers import forced_calls_schema

Seed = Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)]
Prompt = str | list[int]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM: usage on every chunk, not only at the end


# Fields OpenAI or vLLM define that this server accepts but cannot honour yet: a request that
# sets one to anything but its neutral value is a 400 naming it, never silently ignored.
UNSUPPORTED_FIELDS: dict[str, str] = {
    "spaces_between_special_tokens": "the detokenizer always decodes special tokens without extra spaces",
    "priority": "the scheduler serves requests first come, first served",
    "logits_processors": "custom logits processors are not supported",
}
# The values of those fields that ask for nothing (besides None, False and empty containers).
NEUTRAL_VALUES: dict[str, object] = {"spaces_between_special_tokens": True, "priority": 0}


def reject_unsupported(fields: dict[str, Any], unsupported: dict[str, str]) -> None:
    """400 for the first field in `unsupported` whose value asks for something."""
    for name, reason in unsupported.items():
        value = fields.get(name)
        neutral = (None, NEUTRAL_VALUES[name]) if name in NEUTRAL_VALUES else (None, False, {}, [])
        if not any(value is candidate or (value == candidate and type(value) is type(candidate))
                   for candidate in neutral):
            raise InvalidRequestError(f"{name} is not supported: {reason}", param=name)


class JSONSchemaFormat(BaseModel):
    name: StrictStr | None = None
    description: StrictStr | None = None
    json_schema: Any = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormatField(BaseModel):
    """OpenAI's response_format."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsField(BaseModel):
    """vLLM's structured_outputs: exactly one constraint."""

    model_config = ConfigDict(extra="forbid")

    json_: Any = Field(default=None, alias="json")
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = None
    grammar: StrictStr | None = None
    json_object: StrictBool | None = None


def structured_output_specs(body: _SamplingFields) -> list[StructuredOutputSpec]:
    """Every constraint a request states, from response_format, structured_outputs and vLLM's older guided_*."""
    specs = []
    response_format = body.response_format
    if response_format is not None and response_format.type == "json_object":
        specs.append(StructuredOutputSpec("json_object", param="response_format"))
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None or response_format.json_schema.json_schema is None:
            raise InvalidRequestError("response_format json_schema needs json_schema.schema",
                                      param="response_format")
        specs.append(StructuredOutputSpec.json_schema(response_format.json_schema.json_schema, "response_format"))
    extra = body.model_extra or {}
    outputs = body.structured_outputs
    candidates = [
        ("json", outputs and outputs.json_, "structured_outputs"), ("json", extra.get("guided_json"), "guided_json"),
        ("regex", outputs and outputs.regex, "structured_outputs"), ("regex", extra.get("guided_regex"), "guided_regex"),
        ("choice", outputs and outputs.choice, "structured_outputs"),
        ("choice", extra.get("guided_choice"), "guided_choice"),
        ("grammar", outputs and outputs.grammar, "structured_outputs"),
        ("grammar", extra.get("guided_grammar"), "guided_grammar"),
        ("json_object", outputs and outputs.json_object, "structured_outputs"),
    ]
    for kind, value, param in candidates:
        if value is None or value is False:
            continue
        if kind == "json":
            specs.append(StructuredOutputSpec.json_schema(value, param))
        elif kind == "json_object":
            specs.append(StructuredOutputSpec("json_object", param=param))
        elif kind == "choice":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
                raise InvalidRequestError(f"{param}: choice must be a non-empty list of strings", param=param)
            specs.append(StructuredOutputSpec("choice", tuple(value), param))
        elif not isinstance(value, str):
            raise InvalidRequestError(f"{param}: {kind} must be a string", param=param)
        else:
            specs.append(StructuredOutputSpec(kind, value, param))
    if len(specs) > 1:
        raise InvalidRequestError("only one structured output constraint may be given per request "
                                  f"(got {', '.join(spec.param for spec in specs)})", param=specs[1].param)
    return specs


class _SamplingFields(BaseModel):
    """The fields completions and chat share; unknown fields are ignored, as OpenAI clients expect."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: StrictStr | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    min_p: float | None = None
    n: StrictInt = 1
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: Seed | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = 0
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    # vLLM: keep only the last k prompt tokens (-1: as many as the context holds).
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=-1)] | None = None
    return_token_ids: StrictBool = False  # vLLM: prompt and output token ids in the response
    return_tokens_as_token_ids: StrictBool = False  # vLLM: logprob tokens spelled "token_id:<id>"
    response_format: ResponseFormatField | None = None
    structured_outputs: StructuredOutputsField | None = None
    logit_bias: dict[StrictStr, float] | None = None  # OpenAI: token id, as a string -> bias in [-100, 100]
    allowed_token_ids: list[StrictInt] | None = None  # vLLM: sample only among these
    prompt_logprobs: StrictInt | None = None  # vLLM: top logprobs per prompt token (-1: the whole vocabulary)
    bad_words: list[StrictStr] | None = None  # vLLM: words never to generate
    # vLLM: beam search of width n, ranked and stopped as transformers' generate(num_beams=n) does
    use_beam_search: StrictBool = False
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False

    @property
    def structured_output(self) -> StructuredOutputSpec | None:
        """The request's output constraint, if it states one (400 if it states several)."""
        specs = structured_output_specs(self)
        return specs[0] if specs else None

    def check_supported(self) -> None:
        """400s a body can earn before any work: fields not honoured, contradictory options."""
        reject_unsupported(self.model_extra or {}, UNSUPPORTED_FIELDS)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options can only be set when stream is true", param="stream_options")
        if self.prompt_logprobs is not None and self.stream:  # vLLM's rule: they are not streamed
            raise InvalidRequestError("prompt_logprobs are not available when stream is true", param="prompt_logprobs")
        self._check_beam_search()

    def _check_beam_search(self) -> None:
        """Beam search ranks the model's raw log-probabilities: fields that change them or end a beam
        otherwise than by EOS or max_tokens are a 400 with it, and its own fields are one without it."""
        if not self.use_beam_search:
            for name, neutral in (("length_penalty", 1.0), ("early_stopping", False)):
                if getattr(self, name) != neutral:
                    raise InvalidRequestError(f"{name} only applies to beam search (use_beam_search: true)",
                                              param=name)
            return
        for name in self.fields_set_that_beam_search_ignores():
            raise InvalidRequestError(f"{name} cannot be combined with use_beam_search", param=name)

    def fields_set_that_beam_search_ignores(self) -> list[str]:
        names = ["stop", "stop_token_ids", "presence_penalty", "frequency_penalty", "repetition_penalty",
                 "logit_bias", "allowed_token_ids", "min_tokens", "bad_words", "prompt_logprobs"]
        constraint = self.structured_output  # response_format, structured_outputs, a forced tool call
        return [name for name in names if getattr(self, name)] + ([constraint.param] if constraint else [])

    @property
    def best_of_n(self) -> int | None:
        """n, when more candidates are generated than returned (completions' best_of); None otherwise."""
        return None

    def beam_search_params(self, max_tokens: int | None, defaults: SamplingDefaults) -> BeamSearchParams | None:
        """use_beam_search: a search of width n (None without it)."""
        if not self.use_beam_search:
            return None
        temperature = self.temperature if self.temperature is not None else defaults.sampling.get("temperature", 0.0)
        return BeamSearchParams(
            beam_width=self.n,
            max_tokens=max_tokens if max_tokens is not None else defaults.max_tokens,
            ignore_eos=self.ignore_eos,
            temperature=temperature,
            length_penalty=self.length_penalty,
            include_stop_str_in_output=self.include_stop_str_in_output,
            early_stopping=self.early_stopping,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None, defaults: SamplingDefaults,
                         prompt_logprobs: int | None = None) -> SamplingParams:
        """`defaults` (the model's generation config) fill the sampling fields the request leaves unset."""
        given = {
            name: getattr(self, name)
            for name in (
                "temperature", "top_p", "top_k", "min_p", "seed",
                "presence_penalty", "frequency_penalty", "repetition_penalty",
            )
            if getattr(self, name) is not None
        }
        return SamplingParams(
            n=self.n,
            stop=self.stop or [],
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            max_tokens=max_tokens if max_tokens is not None else defaults.max_tokens,
            structured_output=self.structured_output,
            logit_bias=_token_biases(self.logit_bias),
            allowed_token_ids=self.allowed_token_ids or None,
            prompt_logprobs=self.prompt_logprobs if self.prompt_logprobs is not None else prompt_logprobs,
            bad_words=self.bad_words or None,
            **(defaults.sampling | given),
        )


def _token_biases(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias keys are token ids written as strings."""
    if not logit_bias:
        return None
    try:
        return {int(token): bias for token, bias in logit_bias.items()}
    except ValueError:
        raise InvalidRequestError("logit_bias keys must be token ids (integers as strings)", param="logit_bias") from None


class CompletionRequest(_SamplingFields):
    prompt: Any
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        prompts_of(value)  # raises ValueError with a precise message
        return value

    @property
    def prompts(self) -> list[Prompt]:
        return prompts_of(self.prompt)

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of is not None and self.best_of < self.n:
            raise InvalidRequestError(f"best_of must be at least n ({self.n}), got {self.best_of}", param="best_of")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise InvalidRequestError("best_of cannot be streamed: the best candidates are known only at the end",
                                      param="best_of")
        if self.best_of is not None and self.best_of > self.n and self.use_beam_search:
            raise InvalidRequestError("best_of cannot be combined with use_beam_search (n is the beam width)",
                                      param="best_of")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported: no served model does fill-in-the-middle",
                                      param="suffix")

    @property
    def echo_only(self) -> bool:
        """OpenAI's echo with max_tokens 0: the response is the prompt (with its logprobs), nothing generated."""
        return self.echo and self.max_tokens == 0

    @property
    def best_of_n(self) -> int | None:
        """n, when best_of asks for more candidates than that (the n most likely are returned)."""
        return self.n if self.best_of is not None and self.best_of > self.n else None

    def fields_set_that_beam_search_ignores(self) -> list[str]:
        return super().fields_set_that_beam_search_ignores() + (["logprobs"] if self.logprobs is not None else [])

    def to_sampling_params(self, defaults: SamplingDefaults) -> SamplingParams:
        """Echo with logprobs reports the prompt's too; with max_tokens 0 the engine still samples one
        token, which the response leaves out (as vLLM). With best_of, best_of candidates are generated."""
        max_tokens = 1 if self.echo_only else self.max_tokens
        prompt_logprobs = self.logprobs if self.echo else None
        if self.best_of_n is None:
            return self._sampling_params(max_tokens, self.logprobs, defaults, prompt_logprobs=prompt_logprobs)
        # The candidates are ranked by cumulative logprob, which the engine sums only when logprobs are on.
        params = self._sampling_params(max_tokens, self.logprobs or 0, defaults, prompt_logprobs=prompt_logprobs)
        return replace(params, n=self.best_of)

    def to_beam_search_params(self, defaults: SamplingDefaults) -> BeamSearchParams | None:
        return self.beam_search_params(self.max_tokens, defaults)


def prompts_of(value: Any) -> list[Prompt]:
    """OpenAI's four prompt forms -> a list of prompts (each a string or a list of token ids)."""

    def is_token_ids(item: Any) -> bool:
        return isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item)

    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if is_token_ids(value):
            return [list(value)]
        if all(isinstance(item, str) for item in value):
            return list(value)
        if all(is_token_ids(item) and item for item in value):
            return [list(item) for item in value]
    raise ValueError(
        "prompt must be a string, a non-empty list of strings, a list of token ids, "
        "or a non-empty list of non-empty token id lists"
    )


class TextPart(BaseModel):
    type: Literal["text", "input_text", "output_text"]
    text: StrictStr


class FunctionCall(BaseModel):
    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: StrictStr | None = None  # a tool result's call

    @property
    def text(self) -> str:
        """The content as one string; text parts are joined by newlines."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""

    def as_template_input(self) -> dict[str, Any]:
        """The message dict chat templates expect.

        Tool-call arguments are handed over as objects, not JSON text: templates
        (Qwen, Llama 3, Mistral) serialise them with `tojson` themselves, as vLLM
        and transformers pass them.
        """
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.text}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": _json_arguments(call.function.arguments)}}
                for call in self.tool_calls
            ]
        return message


def _json_arguments(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        raise InvalidRequestError(f"tool call arguments are not valid JSON: {arguments[:80]!r}",
                                  param="messages") from None


class FunctionDefinition(BaseModel):
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None  # JSON schema of the arguments
    strict: StrictBool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: StrictStr


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatTemplateFields(BaseModel):
    """What rendering messages through the chat template takes (chat completions and /tokenize)."""

    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template: StrictStr | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None

    @property
    def tool_definitions(self) -> list[dict] | None:
        """The tools as chat templates take them (OpenAI's JSON shape)."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None

    def check_template_flags(self) -> None:
        if self.add_generation_prompt and self.continue_final_message:
            raise InvalidRequestError("add_generation_prompt and continue_final_message cannot both be true",
                                      param="continue_final_message")


class ChatCompletionRequest(_SamplingFields, ChatTemplateFields):
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: bool | None = False  # lax: vLLM also takes the string "true"
    top_logprobs: StrictInt | None = None
    echo: StrictBool = False  # vLLM: the reply starts with the last message when it has the reply's role
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, "none" without (OpenAI's defaults)
    parallel_tool_calls: StrictBool | None = None  # False: at most one call per reply

    @property
    def num_top_logprobs(self) -> int | None:
        """Alternatives per token (0: only the chosen token's logprob); None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def reply_role(self) -> str:
        """The role of the generated message: a new assistant turn, or the continued last message's."""
        return "assistant" if self.add_generation_prompt else self.messages[-1].role

    @property
    def effective_tool_choice(self) -> ToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        self.check_template_flags()
        self._check_tool_choice()

    def _check_tool_choice(self) -> None:
        choice = self.effective_tool_choice
        if choice != "none" and not self.tools:
            raise InvalidRequestError("tool_choice requires tools to be set", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in self.tools}:
            raise InvalidRequestError(f"tool_choice names the function {choice.function.name!r}, which is not "
                                      "among the tools", param="tool_choice")

    @property
    def structured_output(self) -> StructuredOutputSpec | None:
        """A forced tool call (tool_choice required or named) is a JSON-schema constraint on the reply."""
        stated = super().structured_output
        choice = self.effective_tool_choice
        if choice != "required" and not isinstance(choice, NamedToolChoice):
            return stated
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        if stated is not None:
            raise InvalidRequestError(f"{stated.param} cannot be combined with a forced tool call (tool_choice "
                                      f"{named or choice!r}): the call already constrains the reply", param=stated.param)
        schema = forced_calls_schema(self.tool_definitions, named, parallel=self.parallel_tool_calls is not False)
        return StructuredOutputSpec.json_schema(schema, "tool_choice", compact=True)

    @property
    def resolved_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def fields_set_that_beam_search_ignores(self) -> list[str]:
        return super().fields_set_that_beam_search_ignores() + (["logprobs"] if self.logprobs else [])

    def to_sampling_params(self, defaults: SamplingDefaults) -> SamplingParams:
        return self._sampling_params(self.resolved_max_tokens, self.num_top_logprobs, defaults)

    def to_beam_search_params(self, defaults: SamplingDefaults) -> BeamSearchParams | None:
        return self.beam_search_params(self.resolved_max_tokens, defaults)


class TokenizeCompletionRequest(BaseModel):
    """vLLM's POST /tokenize with a prompt."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class TokenizeChatRequest(ChatTemplateFields):
    """vLLM's POST /tokenize with chat messages (rendered as chat completions would render them)."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    add_special_tokens: StrictBool = False  # the template writes the special tokens itself
    return_token_strs: StrictBool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    tokens: list[StrictInt]
