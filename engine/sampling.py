"""SamplingParams: per-request decoding settings with vLLM's field names.

Validation happens at construction so that a bad request fails before it is
queued and never disturbs the requests already running.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.errors import InvalidRequestError

# Seeds are signed 64-bit integers, as in vLLM. The sampler seeds output i of a request with
# seed + i, and torch generators take at most 2**64 - 1: a larger range would overflow there.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


StructuredOutputKind = Literal["json", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class StructuredOutputSpec:
    """A constraint on a completion's text (engine.structured_output compiles and applies it)."""

    kind: StructuredOutputKind
    value: str | tuple[str, ...] | None = None  # JSON schema text, regex, EBNF, the choices; None for json_object
    param: str = "structured_outputs"  # the request field it came from, for error messages
    # JSON with fixed separators (", ", ": ") and no other whitespace. For output only programs read
    # (forced tool calls): free whitespace lets a model ramble in blanks until max_tokens cuts it short.
    compact: bool = False

    @classmethod
    def json_schema(cls, schema: Any, param: str, compact: bool = False) -> StructuredOutputSpec:
        """A schema given as an object or as JSON text."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"{param}: the JSON schema is not valid JSON: {exc}", param=param) from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequestError(f"{param}: a JSON schema must be an object", param=param)
        return cls("json", json.dumps(schema), param, compact)


# The most top logprobs a request may ask for unless the engine is told otherwise (vLLM's --max-logprobs).
DEFAULT_MAX_LOGPROBS = 20


def num_top_logprobs(wanted: int, vocab_size: int) -> int:
    """A logprobs or prompt_logprobs count with -1 (vLLM: the whole vocabulary) resolved."""
    return vocab_size if wanted == -1 else wanted


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) disables top-k
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0
    logprobs: int | None = None  # top logprobs per generated token (0: only the chosen one; -1: the whole vocabulary)
    prompt_logprobs: int | None = None  # top logprobs per prompt token, with the prompt token's own (-1: all)
    skip_special_tokens: bool = True
    structured_output: StructuredOutputSpec | None = None  # the completion must match this constraint
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI: -100..100)
    allowed_token_ids: list[int] | None = None  # sample only among these
    # Words never to generate: the last token of a word's tokens is banned after the others (vLLM's bad_words).
    bad_words: list[str] | None = None
    # The token ids of bad_words, filled by the front end that tokenizes them (engine.bad_words).
    bad_words_token_ids: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self._validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def _validate(self) -> None:
        def fail(param: str, message: str) -> None:
            raise InvalidRequestError(message, param=param)

        if not isinstance(self.n, int) or self.n < 1:
            fail("n", f"n must be an integer >= 1, got {self.n!r}")
        if self.n > 128:
            fail("n", f"n must be at most 128, got {self.n}")
        if self.temperature < 0.0:
            fail("temperature", f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            fail("top_k", f"top_k must be -1 (disabled) or a positive integer, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            fail("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            fail("presence_penalty", f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            fail("frequency_penalty", f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            fail("repetition_penalty", f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            fail("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            fail("min_tokens", f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logit_bias is not None and any(
            not isinstance(t, int) or t < 0 or not isinstance(b, (int, float)) or not -100 <= b <= 100
            for t, b in self.logit_bias.items()
        ):
            fail("logit_bias", "logit_bias maps token ids (integers >= 0) to biases in [-100, 100]")
        if self.allowed_token_ids is not None and (
            not self.allowed_token_ids or any(not isinstance(t, int) or t < 0 for t in self.allowed_token_ids)
        ):
            fail("allowed_token_ids", "allowed_token_ids must be a non-empty list of token ids (integers >= 0)")
        for name in ("logprobs", "prompt_logprobs"):  # the upper bound is the engine's (CoreLimits.max_logprobs)
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < -1):
                fail(name, f"{name} must be -1 (the whole vocabulary) or an integer >= 0, got {value!r}")
        if self.bad_words is not None and any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            fail("bad_words", "bad_words must be a list of non-blank strings")
        if self.seed is not None and (not isinstance(self.seed, int) or not SEED_MIN <= self.seed <= SEED_MAX):
            fail("seed", f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            fail("stop", "stop must be a non-empty string or a list of non-empty strings")
        if len(self.stop) > 16:
            fail("stop", f"at most 16 stop strings are allowed, got {len(self.stop)}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "stop_token_ids must be non-negative integers")
