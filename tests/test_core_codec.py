"""The engine core's wire format: every message survives encode -> decode unchanged, and is plain msgpack."""

from __future__ import annotations

import msgpack
import pytest

from engine.core_codec import (
    AbortRequests,
    CoreFailed,
    CoreReady,
    Shutdown,
    StepOutputs,
    StopSequences,
    decode,
    encode,
)
from engine.core_messages import (
    CoreLimits,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
    PromptLogprobs,
    RequestScheduled,
    SequenceDelta,
)
from engine.errors import EngineDeadError, ModelLoadError
from engine.sampling import SamplingParams, StructuredOutputSpec

EVERY_SAMPLING_FIELD = SamplingParams(
    n=3, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=0.5, frequency_penalty=-0.25,
    repetition_penalty=1.1, seed=1234, stop=["\n\n", "END"], stop_token_ids=[7, 9], include_stop_str_in_output=True,
    ignore_eos=True, max_tokens=None, min_tokens=2, logprobs=5, skip_special_tokens=False, prompt_logprobs=-1,
    allowed_token_ids=[3, 4], bad_words=["bad", "very bad"], bad_words_token_ids=[[5], [6, 5]],
)
STATS = EngineStats(num_waiting=2, num_running=5, kv_cache_usage=0.375, num_blocks_total=512, num_blocks_free=320,
                    prefix_cache_queries=900, prefix_cache_hits=128, num_preemptions=1, num_chunked_prefills=4,
                    prompt_tokens_total=1500, generation_tokens_total=70000)

MESSAGES = [
    EngineCoreRequest("cmpl-1-0", [1, 15043, 29892], EVERY_SAMPLING_FIELD, 12345.678, 2045),
    EngineCoreRequest("default", [5], SamplingParams(), 0.5, 16),
    EngineCoreRequest("json", [5, 6], SamplingParams(structured_output=StructuredOutputSpec.json_schema(
        {"type": "object"}, "response_format"), seed=-(2**63)), 0.5, 16),
    EngineCoreRequest("choice", [7], SamplingParams(structured_output=StructuredOutputSpec("choice", ("a", "b"))), 1.0, 2),
    EngineCoreRequest("compact", [8], SamplingParams(structured_output=StructuredOutputSpec.json_schema(
        {"type": "object"}, "tool_choice", compact=True)), 1.0, 2),
    AbortRequests(["a", "b"]),
    StopSequences([("cmpl-1-0", 2), ("x", 0)]),
    Shutdown(),
    CoreReady(CoreLimits(max_model_len=4096, vocab_size=32000, block_size=16, num_kv_blocks=999,
                         eos_token_ids=(2, 32000), max_num_batched_tokens=8192), STATS),
    CoreReady(CoreLimits(max_model_len=32768, vocab_size=32000, block_size=16, num_kv_blocks=99,
                         eos_token_ids=(2,), max_num_batched_tokens=512, kv_window=4096, max_logprobs=32000), STATS),
    StepOutputs(EngineCoreOutputs(), 0),
    StepOutputs(EngineCoreOutputs(stats=STATS), 3),
    StepOutputs(
        EngineCoreOutputs(
            deltas=[
                SequenceDelta("r", 0, [11, 12], [{11: -0.5, 3: -1.25}, {12: -0.125}],
                              prompt_logprobs=PromptLogprobs([{4: -3.5, 1: -0.25}, {9: -0.75}], [7, 1])),
                SequenceDelta("r", 1, [2], None, finish_reason="stop", stop_reason=2),
                SequenceDelta("s", 0, [9], None, finish_reason="length"),
                SequenceDelta("t", 0, [], None, finish_reason="abort"),
            ],
            scheduled=[RequestScheduled("s", 98765.4321, 32)],
            stats=STATS,
        ),
        7,
    ),
    CoreFailed("RuntimeError", "CUDA error: an illegal memory access was encountered"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    assert decode(encode(message)) == message


def test_messages_are_msgpack_arrays_of_plain_values():
    for message in MESSAGES:
        tag, *_ = msgpack.unpackb(encode(message), strict_map_key=False)
        assert isinstance(tag, int)


def test_token_id_keys_of_logprobs_stay_ints():
    delta = decode(encode(MESSAGES[-2])).outputs.deltas[0]
    assert all(isinstance(token, int) for entry in delta.new_logprobs for token in entry)


def test_a_decoded_request_is_validated_again():
    fields = msgpack.unpackb(encode(MESSAGES[0]))
    fields[3][1] = -1.0  # temperature
    with pytest.raises(ValueError, match="temperature"):
        decode(msgpack.packb(fields))


def test_unknown_tags_are_refused():
    with pytest.raises(ValueError, match="unknown core message tag 99"):
        decode(msgpack.packb([99]))


def test_failures_keep_load_errors_and_wrap_the_rest():
    assert isinstance(CoreFailed.of(ModelLoadError("model.safetensors is missing")).to_exception(), ModelLoadError)
    crashed = CoreFailed.of(RuntimeError("illegal memory access")).to_exception()
    assert isinstance(crashed, EngineDeadError) and str(crashed) == "RuntimeError: illegal memory access"
