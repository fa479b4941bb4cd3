"""Beam search as transformers' `generate(num_beams=...)` defines it, driven one token at a time.

The search itself is pure: `BeamSearch` holds one prompt's running beams and
finished hypotheses, says which token sequences to extend next
(`pending`), and takes each one's top log-probabilities (`advance`). The
front ends (LLM.beam_search offline, AsyncLLMEngine.beam_search for the
server) run every pending beam as an ordinary engine request of one token
with `num_candidates` logprobs, as vLLM V1 does. The engine's prefix cache
shares the prompt's and the beams' common full KV blocks between those
requests, so each step computes only the tokens past the last full block,
not the whole sequence; beams need no special support in the scheduler.

The rules are transformers' (generation/utils.py, `_beam_search`), so the
results are the same on the same model:
- each step keeps the top `num_candidates` = max(2, 1 + number of EOS ids) *
  beam_width continuations of all beams by accumulated log-probability;
- of those, the ones that end (an EOS id, or max_tokens reached) become
  finished hypotheses only if they rank among the first beam_width; the best
  beam_width of the others keep running;
- a finished hypothesis scores sum_logprobs / generated_length ** length_penalty
  (the length counts the EOS token);
- early_stopping True ends the search once beam_width hypotheses are finished;
  False and "never" end it once the best running beam can no longer beat the
  worst finished hypothesis, estimated at the current length (False, and
  "never" with length_penalty <= 0) or at max_tokens ("never" otherwise).
Scores are float32 sums, as transformers keeps them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from engine.core_messages import CoreLimits, TokenLogprobs
from engine.errors import InvalidRequestError
from engine.outputs import CompletionOutput
from engine.sampling import SamplingParams

EarlyStopping = bool | Literal["never"]

# The most top logprobs one engine request may ask for (SamplingParams' bound, OpenAI's).
MAX_CANDIDATES = 20


@dataclass
class BeamSearchParams:
    """vLLM's BeamSearchParams, plus transformers' early_stopping (vLLM's server has it too).

    temperature is accepted for vLLM's API: as in transformers' beam search without
    sampling and in vLLM V1 (which ranks beams by raw log-probabilities), it does not
    change the beams.
    """

    beam_width: int
    max_tokens: int | None  # None: up to the model's context length (as SamplingParams)
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    early_stopping: EarlyStopping = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not (value is None and name == "max_tokens") and not _positive_int(value):
                raise InvalidRequestError(f"{name} must be an integer >= 1, got {value!r}", param=name)
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}", param="temperature")
        if self.early_stopping not in (True, False, "never"):
            raise InvalidRequestError(f'early_stopping must be true, false or "never", got {self.early_stopping!r}',
                                      param="early_stopping")

    def num_candidates(self, num_eos_tokens: int) -> int:
        """Continuations kept per step: enough that beam_width survive even if the best all end."""
        return max(2, 1 + num_eos_tokens) * self.beam_width


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _length_penalised(score: np.float32, length: int, length_penalty: float) -> np.float32:
    """transformers' hypothesis score (in float32, as its tensors)."""
    return np.float32(score / np.float32(length**length_penalty))


@dataclass
class BeamSearchSequence:
    """One hypothesis, as vLLM returns it: `tokens` include the prompt, `text` decodes all of them."""

    tokens: list[int]
    logprobs: list[TokenLogprobs]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (an EOS id) | "length" | "abort"
    stop_reason: int | None = None
    score: float = 0.0  # cum_logprob / generated_length ** length_penalty: the ranking


@dataclass
class BeamSearchOutput:
    """The best beam_width hypotheses of one prompt, best first (vLLM's type)."""

    sequences: list[BeamSearchSequence]


@dataclass
class _Beam:
    tokens: list[int]  # generated so far
    logprobs: list[TokenLogprobs]
    score: np.float32  # accumulated log-probability


@dataclass
class _Hypothesis:
    beam: _Beam
    score: np.float32  # length-penalised
    finish_reason: str  # "stop" (an EOS id) | "length" | "abort"


@dataclass
class BeamSearch:
    """One prompt's search state."""

    prompt_token_ids: list[int]
    params: BeamSearchParams
    eos_token_ids: frozenset[int]
    running: list[_Beam] = field(init=False)
    finished: list[_Hypothesis] = field(default_factory=list)  # best first, at most beam_width
    num_generated: int = 0
    done: bool = False
    _improvable: bool = True  # transformers' is_early_stop_heuristic_unsatisfied

    def __post_init__(self) -> None:
        if self.params.ignore_eos:
            self.eos_token_ids = frozenset()
        if self.num_candidates > MAX_CANDIDATES:
            raise InvalidRequestError(
                f"beam width {self.params.beam_width} needs the top {self.num_candidates} logprobs per step "
                f"(at most {MAX_CANDIDATES}): use a beam width of at most "
                f"{MAX_CANDIDATES // max(2, 1 + len(self.eos_token_ids))}", param="beam_width")
        # transformers starts beam_width copies of the prompt, all but the first at -1e9: only the first
        # one's continuations can be chosen in the first step.
        self.running = [_Beam([], [], np.float32(0.0))]

    @property
    def num_candidates(self) -> int:
        return self.params.num_candidates(len(self.eos_token_ids))

    def step_params(self) -> SamplingParams:
        """What each pending beam runs as: one token, with the top candidates' log-probabilities."""
        return SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=self.num_candidates)

    def pending(self) -> list[list[int]]:
        """The token ids (prompt and beam) whose next-token log-probabilities the next advance() needs."""
        return [] if self.done else [self.prompt_token_ids + beam.tokens for beam in self.running]

    def advance(self, top_logprobs: list[TokenLogprobs]) -> None:
        """One step: top_logprobs[i] holds (at least) the top num_candidates next tokens of pending()[i]."""
        params, width = self.params, self.params.beam_width
        candidates = sorted(
            ((np.float32(beam.score + np.float32(logprob)), order, beam, token, entry)
             for order, (beam, entry) in enumerate(zip(self.running, top_logprobs))
             for token, logprob in entry.items()),
            key=lambda candidate: (-candidate[0], candidate[1]),
        )[: self.num_candidates]
        length = self.num_generated + 1
        at_limit = length >= params.max_tokens
        running, all_end = [], True
        may_finish = self._improvable and not (params.early_stopping is True and len(self.finished) == width)
        for rank, (score, _, beam, token, entry) in enumerate(candidates):
            extended = _Beam(beam.tokens + [token], beam.logprobs + [entry], score)
            ends_with_eos = token in self.eos_token_ids
            if ends_with_eos or at_limit:
                if rank < width and may_finish:
                    penalised = _length_penalised(score, length, params.length_penalty)
                    self.finished.append(_Hypothesis(extended, penalised, "stop" if ends_with_eos else "length"))
            else:
                all_end = False
                if len(running) < width:
                    running.append(extended)
        self.finished = sorted(self.finished, key=lambda h: -h.score)[:width]
        self.running = running
        self.num_generated = length
        if running and len(self.finished) == width:  # transformers' _check_early_stop_heuristic
            never = params.early_stopping == "never" and params.length_penalty > 0.0
            best_length = params.max_tokens if never else length
            best_possible = _length_penalised(running[0].score, best_length, params.length_penalty)
            self._improvable = self._improvable and bool(best_possible > self.finished[-1].score)
        full = params.early_stopping is True and len(self.finished) == width
        self.done = all_end or not running or not self._improvable or full

    def abort(self) -> None:
        """Ends the search now: the running beams join the finished hypotheses with finish_reason "abort"."""
        length, penalty = max(self.num_generated, 1), self.params.length_penalty
        self.finished = sorted(
            self.finished + [_Hypothesis(beam, _length_penalised(beam.score, length, penalty), "abort")
                             for beam in self.running],
            key=lambda h: -h.score,
        )[: self.params.beam_width]
        self.running, self.done = [], True

    def output(self) -> BeamSearchOutput:
        """The finished hypotheses, best first (text is filled in by the front end)."""
        return BeamSearchOutput([
            BeamSearchSequence(
                tokens=self.prompt_token_ids + h.beam.tokens,
                logprobs=h.beam.logprobs,
                cum_logprob=float(h.beam.score),
                finish_reason=h.finish_reason,
                stop_reason=None,
                score=float(h.score),
            )
            for h in self.finished
        ])


def new_search(prompt_token_ids: list[int], params: BeamSearchParams, limits: CoreLimits) -> BeamSearch:
    """A search for one tokenized prompt; 400s (InvalidRequestError) for a prompt or width the engine cannot serve."""
    max_tokens = limits.check_prompt(prompt_token_ids, SamplingParams(max_tokens=params.max_tokens))
    return BeamSearch(list(prompt_token_ids), replace(params, max_tokens=max_tokens), frozenset(limits.eos_token_ids))


def completion_outputs(search: BeamSearch, decode: Callable[[list[int]], str]) -> list[CompletionOutput]:
    """The hypotheses as the server's choices, best first: generated tokens only; a final EOS id
    is left out of the text unless include_stop_str_in_output (as vLLM's server does)."""
    outputs = []
    num_prompt_tokens = len(search.prompt_token_ids)
    for index, sequence in enumerate(search.output().sequences):
        token_ids = sequence.tokens[num_prompt_tokens:]
        text_ids = token_ids
        if sequence.finish_reason == "stop" and not search.params.include_stop_str_in_output:
            text_ids = token_ids[:-1]
        outputs.append(CompletionOutput(index, decode(text_ids), token_ids, sequence.cum_logprob, None,
                                        sequence.finish_reason, sequence.stop_reason))
    return outputs
