"""SamplingParams and EngineConfig reject bad values with errors that name the field."""

import pytest

from engine.config import EngineConfig
from engine.core_messages import CoreLimits
from engine.errors import ConfigError, InvalidRequestError
from engine.sampling import SamplingParams


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 1.5),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("n", 0),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0.0),
        ("logprobs", -2),
        ("prompt_logprobs", -2),
        ("bad_words", ["  "]),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        ("seed", 1.5),
    ],
)
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(InvalidRequestError) as error:
        SamplingParams(**{field: value})
    assert error.value.param == field
    assert field in str(error.value)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_logprobs_beyond_the_engines_max_logprobs_name_the_field(field):
    limits = CoreLimits(max_model_len=64, vocab_size=100, block_size=16, num_kv_blocks=8, eos_token_ids=(2,),
                        max_num_batched_tokens=64, max_logprobs=20)
    limits.check_prompt([1, 2], SamplingParams(**{field: 20}))
    for too_many in (21, -1):  # -1: the whole vocabulary, 100
        with pytest.raises(InvalidRequestError, match="greater than max allowed: 20") as error:
            limits.check_prompt([1, 2], SamplingParams(**{field: too_many}))
        assert error.value.param == field
    with pytest.raises(InvalidRequestError) as error:
        limits.check_prompt([1, 2], SamplingParams(bad_words=["x"], bad_words_token_ids=[[100]]))
    assert error.value.param == "bad_words"


def test_min_tokens_may_not_exceed_max_tokens():
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_normalisation():
    params = SamplingParams(stop="###", top_k=0, temperature=0.0)
    assert params.stop == ["###"] and params.top_k == -1 and params.greedy


@pytest.mark.parametrize(
    "field, value",
    [
        ("dtype", "float64"),
        ("device", "tpu"),
        ("block_size", 0),
        ("block_size", 24),
        ("num_kv_blocks", 0),
        ("gpu_memory_utilization", 0.0),
        ("gpu_memory_utilization", 1.5),
        ("max_num_seqs", 0),
        ("max_num_batched_tokens", -1),
        ("max_model_len", 0),
        ("tensor_parallel_size", 0),
        ("max_logprobs", -2),
    ],
)
def test_invalid_engine_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        EngineConfig(model="some/folder", **{field: value})


def test_engine_config_resolves_against_the_model():
    config = EngineConfig(model="m", dtype="bf16", device="cpu")
    resolved = config.resolve(model_max_len=4096, checkpoint_dtype=None)
    assert (resolved.dtype, resolved.max_model_len, resolved.max_num_batched_tokens) == ("bfloat16", 4096, 8192)
    with pytest.raises(ConfigError, match="max_model_len"):
        EngineConfig(model="m", device="cpu", max_model_len=8192).resolve(model_max_len=4096, checkpoint_dtype=None)
    assert EngineConfig(model="m", device="cpu").resolve(4096, None).dtype == "float32"
