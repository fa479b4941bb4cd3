"""The wire format between the API process and the engine core process: msgpack arrays.

Every message is one msgpack array `[tag, *fields]`; each type below is written
field by field in a fixed order (no pickle, no field names on the wire), so a
step's outputs cost one `packb` of lists of ints, floats and strings. Both
processes run the same code, so the order is the only contract.

API -> core: EngineCoreRequest, AbortRequests, StopSequences, Shutdown.
Core -> API: CoreReady (once, after loading), StepOutputs (after every step,
or after applying inputs while idle), CoreFailed (then the core exits).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Any

import msgpack

from engine.core_messages import (
    CoreLimits,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
    PromptLogprobs,
    RequestScheduled,
    SequenceDelta,
)
from engine.errors import ConfigError, EngineDeadError, KubellmError, ModelLoadError, UnsupportedModelError
from engine.sampling import SamplingParams, StructuredOutputSpec


@dataclass
class AbortRequests:
    request_ids: list[str]


@dataclass
class StopSequences:
    """Completions (request id, index) that a stop string ended in the API process."""

    stopped: list[tuple[str, int]]


@dataclass
class Shutdown:
    pass


@dataclass
class CoreReady:
    """The model is loaded: what the API process validates requests against, and the first stats."""

    limits: CoreLimits
    stats: EngineStats


@dataclass
class StepOutputs:
    outputs: EngineCoreOutputs
    # EngineCoreRequests the core has taken in so far: the API process counts the ones
    # still in transit as waiting (they are in no EngineStats yet).
    num_requests_received: int


@dataclass
class CoreFailed:
    """Loading or the step loop failed; the core process exits after sending this."""

    error_type: str
    message: str

    @classmethod
    def of(cls, error: BaseException) -> CoreFailed:
        return cls(type(error).__name__, str(error))

    def to_exception(self) -> KubellmError:
        """The error as the API process raises it: load and config errors keep their type."""
        known = {kind.__name__: kind for kind in (ModelLoadError, UnsupportedModelError, ConfigError, EngineDeadError)}
        if self.error_type in known:
            return known[self.error_type](self.message)
        return EngineDeadError(f"{self.error_type}: {self.message}")


ToCore = EngineCoreRequest | AbortRequests | StopSequences | Shutdown
FromCore = CoreReady | StepOutputs | CoreFailed


class _Tag(enum.IntEnum):
    ADD = 1
    ABORT = 2
    STOP = 3
    SHUTDOWN = 4
    READY = 10
    OUTPUTS = 11
    FAILED = 12


_SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))
_SPEC_FIELDS = tuple(f.name for f in fields(StructuredOutputSpec))
_STATS_FIELDS = tuple(f.name for f in fields(EngineStats))
_LIMITS_FIELDS = tuple(f.name for f in fields(CoreLimits))


def _values(obj: Any, names: tuple[str, ...]) -> list:
    return [getattr(obj, name) for name in names]


def _params(params: SamplingParams) -> list:
    """SamplingParams' fields in order; the structured-output spec as its own fields in order."""
    values = _values(params, _SAMPLING_FIELDS)
    spec = params.structured_output
    values[_SAMPLING_FIELDS.index("structured_output")] = None if spec is None else _values(spec, _SPEC_FIELDS)
    return values


def _decode_params(values: list) -> SamplingParams:
    position = _SAMPLING_FIELDS.index("structured_output")
    spec = values[position]
    if spec is not None:
        fields_of_spec = dict(zip(_SPEC_FIELDS, spec))
        if isinstance(fields_of_spec["value"], list):  # msgpack reads the choices' tuple back as a list
            fields_of_spec["value"] = tuple(fields_of_spec["value"])
        values[position] = StructuredOutputSpec(**fields_of_spec)
    return SamplingParams(*values)


def _delta(delta: SequenceDelta) -> list:
    prompt = delta.prompt_logprobs
    return [delta.request_id, delta.index, delta.new_token_ids, delta.new_logprobs, delta.finish_reason,
            delta.stop_reason, None if prompt is None else [prompt.entries, prompt.ranks]]


def _decode_delta(fields: list) -> SequenceDelta:
    *head, prompt = fields
    return SequenceDelta(*head, prompt_logprobs=None if prompt is None else PromptLogprobs(*prompt))


def _outputs(outputs: EngineCoreOutputs) -> list:
    return [
        [_delta(d) for d in outputs.deltas],
        [[s.request_id, s.scheduled_time, s.num_cached_tokens] for s in outputs.scheduled],
        _values(outputs.stats, _STATS_FIELDS) if outputs.stats is not None else None,
    ]


def _to_fields(message: ToCore | FromCore) -> list:
    match message:
        case EngineCoreRequest():
            return [_Tag.ADD, message.request_id, message.prompt_token_ids, _params(message.params),
                    message.arrival_time, message.max_tokens]
        case AbortRequests():
            return [_Tag.ABORT, message.request_ids]
        case StopSequences():
            return [_Tag.STOP, [list(s) for s in message.stopped]]
        case Shutdown():
            return [_Tag.SHUTDOWN]
        case CoreReady():
            return [_Tag.READY, _values(message.limits, _LIMITS_FIELDS), _values(message.stats, _STATS_FIELDS)]
        case StepOutputs():
            return [_Tag.OUTPUTS, _outputs(message.outputs), message.num_requests_received]
        case CoreFailed():
            return [_Tag.FAILED, message.error_type, message.message]
    raise TypeError(f"cannot encode {type(message).__name__}")


def encode(message: ToCore | FromCore) -> bytes:
    return msgpack.packb(_to_fields(message))


def _decode_outputs(deltas: list, scheduled: list, stats: list | None) -> EngineCoreOutputs:
    return EngineCoreOutputs(
        deltas=[_decode_delta(d) for d in deltas],
        scheduled=[RequestScheduled(*s) for s in scheduled],
        stats=EngineStats(*stats) if stats is not None else None,
    )


def decode(raw: bytes) -> ToCore | FromCore:
    # strict_map_key=False: logprobs maps are keyed by token id (int).
    tag, *body = msgpack.unpackb(raw, strict_map_key=False)
    match tag:
        case _Tag.ADD:
            request_id, prompt_token_ids, params, arrival_time, max_tokens = body
            return EngineCoreRequest(request_id, prompt_token_ids, _decode_params(params), arrival_time, max_tokens)
        case _Tag.ABORT:
            return AbortRequests(body[0])
        case _Tag.STOP:
            return StopSequences([(request_id, index) for request_id, index in body[0]])
        case _Tag.SHUTDOWN:
            return Shutdown()
        case _Tag.READY:
            limits, stats = body
            limits = dict(zip(_LIMITS_FIELDS, limits))
            limits["eos_token_ids"] = tuple(limits["eos_token_ids"])
            return CoreReady(CoreLimits(**limits), EngineStats(*stats))
        case _Tag.OUTPUTS:
            outputs, num_requests_received = body
            return StepOutputs(_decode_outputs(*outputs), num_requests_received)
        case _Tag.FAILED:
            return CoreFailed(*body)
    raise ValueError(f"unknown core message tag {tag!r}")
