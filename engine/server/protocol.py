"""OpenAI request bodies as pydantic models, and their translation to SamplingParams.

Type errors are caught here (FastAPI turns them into 400s); range checks live in
SamplingParams so that the offline API and the server reject the same values
with the same messages.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from engine.errors import InvalidRequestError
from engine.sampling import SamplingParams

# Seeds feed torch generators, which take 64-bit integers.
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)]
Prompt = str | list[int]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _SamplingFields(BaseModel):
    """The fields completions and chat share; unknown fields are ignored, as OpenAI clients expect."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

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

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
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
            max_tokens=max_tokens,
            logprobs=logprobs,
            **given,
        )


class CompletionRequest(_SamplingFields):
    prompt: Any
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        prompts_of(value)  # raises ValueError with a precise message
        return value

    @property
    def prompts(self) -> list[Prompt]:
        return prompts_of(self.prompt)

    def to_sampling_params(self) -> SamplingParams:
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError(
                "echo with logprobs is not supported: the engine does not compute prompt logprobs", param="echo"
            )
        return self._sampling_params(self.max_tokens, self.logprobs)


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
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def as_template_input(self) -> dict[str, str]:
        """The {role, content} dict chat templates expect; text parts are joined by newlines."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None

    @property
    def num_top_logprobs(self) -> int | None:
        """Alternatives per token (0: only the chosen token's logprob); None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling_params(max_tokens, self.num_top_logprobs)
