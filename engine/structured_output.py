"""Structured outputs through xgrammar: a request's constraint compiled into a grammar, token bitmasks per step.

The parts, in the order a request meets them:
- `engine.sampling.StructuredOutputSpec`: what the request asked for (a JSON
  schema, any JSON object, a regex, a choice of strings, an EBNF grammar), as
  the server reads it from `response_format` or vLLM's `structured_outputs`.
- `GrammarCompiler.compile`: the spec compiled against the model's tokenizer
  (cached by xgrammar); an invalid schema, regex or grammar raises
  InvalidRequestError, so the server answers 400 before the request is queued.
- `RequestGrammar`: one request's matcher. Each step the batch's bitmask is
  filled (`fill_bitmask`, one row per sequence, all ones for unconstrained
  rows), applied to the logits (`apply_bitmask`, on the logits' device), and the
  sampled token is accepted (`accept`). A row with no allowed token is a
  grammar that cannot go on: `fill_bitmask` names those rows so the engine can
  fail the request with a clear error instead of sampling from nothing.

The engine core compiles each request's grammar when it arrives, fills the
bitmask of the sampling rows each step (engine.sampling_batch), applies it in
the sampler, and accepts each sampled token in Scheduler.update, which
finishes a sequence whose matcher has terminated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import torch
import xgrammar

from engine.errors import InvalidRequestError
from engine.sampling import StructuredOutputSpec

# xgrammar's errors start with "[hh:mm:ss] /path/to/file.cc:123: "; clients need only the rest.
_XGRAMMAR_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


class GrammarCompiler:
    """Compiles specs for one tokenizer; compiled grammars are cached by their text."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int], max_threads: int = 4):
        self.vocab_size = vocab_size  # the model's (logits') width, which may exceed the tokenizer's
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(stop_token_ids))
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=max_threads)

    def compile(self, spec: StructuredOutputSpec) -> xgrammar.CompiledGrammar:
        try:
            if spec.kind == "json":
                return self._compiler.compile_json_schema(spec.value, any_whitespace=not spec.compact)
            if spec.kind == "json_object":
                return self._compiler.compile_builtin_json_grammar()
            if spec.kind == "regex":
                return self._compiler.compile_regex(spec.value)
            if spec.kind == "choice":
                return self._compiler.compile_grammar(choice_grammar(spec.value))
            return self._compiler.compile_grammar(spec.value)
        except RuntimeError as exc:  # xgrammar reports every invalid input this way
            message = _XGRAMMAR_LOCATION.sub("", str(exc).strip())
            raise InvalidRequestError(f"{spec.param}: invalid {spec.kind}: {message}", param=spec.param) from None


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar matching exactly one of `choices` (JSON string escapes are EBNF string escapes)."""
    if not choices:
        raise InvalidRequestError("choice must list at least one string", param="structured_outputs")
    return "root ::= " + " | ".join(json.dumps(choice) for choice in choices)


class RequestGrammar:
    """One sequence's place in its grammar."""

    def __init__(self, compiled: xgrammar.CompiledGrammar):
        self._matcher = xgrammar.GrammarMatcher(compiled)

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False if the grammar does not allow it (a bug upstream of here)."""
        return self._matcher.accept_token(token_id)

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token accepted: the sequence is finished."""
        return self._matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)


def allocate_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """A (batch, ceil(vocab / 32)) int32 CPU tensor; reuse it from step to step."""
    return xgrammar.allocate_token_bitmask(batch_size, vocab_size)


def fill_bitmask(grammars: Sequence[RequestGrammar | None], bitmask: torch.Tensor) -> list[int]:
    """Fills row i for grammars[i] (all tokens allowed where None); returns the rows that allow no token."""
    xgrammar.reset_token_bitmask(bitmask)  # all ones
    stuck = []
    for row, grammar in enumerate(grammars):
        if grammar is not None:
            grammar.fill(bitmask, row)
            if not bool(bitmask[row].any()):
                stuck.append(row)
    return stuck


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Sets the logits of disallowed tokens to -inf in place, on the logits' device."""
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                         vocab_size=logits.shape[-1])
