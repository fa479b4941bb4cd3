"""Offline inference with vLLM's names, so scripts can switch with one import:

    from engine import LLM, SamplingParams
    llm = LLM(model="path/to/hf-folder")
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceOf
from typing import Union

from tqdm.auto import tqdm

from engine.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams, new_search
from engine.config import EngineConfig
from engine.generation_defaults import AUTO, load_sampling_defaults
from engine.cpu_threads import configure_cpu_threads
from engine.errors import InvalidRequestError
from engine.core_messages import EngineStats
from engine.llm_engine import LLMEngine
from engine.output_processor import OutputKind
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams

# A prompt is text, or pre-tokenized ids as {"prompt_token_ids": [...]} (vLLM's TokensPrompt).
Prompt = Union[str, dict]
Conversation = list[dict]


class LLM:
    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        device: str = "auto",
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        gpu_memory_utilization: float = 0.9,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        generation_config: str = AUTO,
        **other_engine_args,
    ):
        """generation_config: where default sampling comes from, as `kubellm serve --generation-config`:
        "auto" (the model's generation_config.json), "vllm" (none), or a folder."""
        config = EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            **other_engine_args,
        )
        configure_cpu_threads()
        self.llm_engine = LLMEngine(config)
        self._request_ids = itertools.count()
        self._sampling_defaults = load_sampling_defaults(model, generation_config)

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate() and chat() use when given no SamplingParams: the model's own sampling
        (generation_config.json), as vLLM and transformers do, over SamplingParams' defaults."""
        defaults = self._sampling_defaults
        max_tokens = {"max_tokens": defaults.max_tokens} if defaults.max_tokens is not None else {}
        return SamplingParams(**defaults.sampling, **max_tokens)

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_stats(self) -> EngineStats:
        return self.llm_engine.get_stats()

    def generate(
        self,
        prompts: Prompt | SequenceOf[Prompt],
        sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        return self._run([_prompt_input(p) for p in prompts], sampling_params, use_tqdm)

    def chat(
        self,
        messages: Conversation | SequenceOf[Conversation],
        sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        engine = self.llm_engine
        texts = [engine.apply_chat_template(conversation) for conversation in conversations]
        return self._run(texts, sampling_params, use_tqdm)

    def beam_search(
        self,
        prompts: Prompt | SequenceOf[Prompt],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """transformers' beam search (engine.beam_search) for each prompt, all prompts' beams batched
        together; outputs come back in the order of the prompts, each with its best beam_width
        sequences, best first. A sequence's tokens and text include its prompt, as in vLLM."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        engine = self.llm_engine
        searches = [new_search(_prompt_token_ids(engine, _prompt_input(p)), params, engine.core.limits)
                    for p in prompts]
        longest = max((search.params.max_tokens for search in searches), default=0)
        with tqdm(total=longest, desc="Beam search", disable=not use_tqdm) as progress:
            while any(not search.done for search in searches):
                self._beam_search_step([search for search in searches if not search.done])
                progress.update(1)
        outputs = [search.output() for search in searches]
        for output in outputs:
            for sequence in output.sequences:
                sequence.text = engine.tokenizer.decode(sequence.tokens)
        return outputs

    def _beam_search_step(self, searches: list[BeamSearch]) -> None:
        """Extends every running beam of `searches` by one token: one engine request per beam."""
        pending = [search.pending() for search in searches]
        finals = iter(self._run([tokens for beams in pending for tokens in beams],
                                [search.step_params() for search, beams in zip(searches, pending) for _ in beams],
                                use_tqdm=False))
        for search, beams in zip(searches, pending):
            search.advance([next(finals).outputs[0].logprobs[0] for _ in beams])

    def _run(
        self,
        prompts: list[str | list[int]],
        sampling_params: SamplingParams | SequenceOf[SamplingParams] | None,
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = _params_per_prompt(sampling_params, len(prompts))
        engine = self.llm_engine
        request_ids = [str(next(self._request_ids)) for _ in prompts]
        try:
            for request_id, prompt, request_params in zip(request_ids, prompts, params):
                engine.add_request(request_id, prompt, request_params, output_kind=OutputKind.FINAL_ONLY)
        except Exception:
            engine.abort_request(request_ids)  # all or nothing: the engine stays clean
            raise
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(prompts), desc="Generating", disable=not use_tqdm) as progress:
            while len(finished) < len(prompts):
                for output in engine.step():
                    finished[output.request_id] = output
                    progress.update(1)
        return [finished[request_id] for request_id in request_ids]


def _prompt_token_ids(engine: LLMEngine, prompt: str | list[int]) -> list[int]:
    return engine.tokenize(prompt) if isinstance(prompt, str) else prompt


def _prompt_input(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        return list(prompt["prompt_token_ids"])
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
        return prompt["prompt"]
    raise InvalidRequestError(
        f"a prompt must be a string or a dict with 'prompt_token_ids' or 'prompt', got {prompt!r:.80}", param="prompt"
    )


def _params_per_prompt(
    sampling_params: SamplingParams | SequenceOf[SamplingParams], num_prompts: int
) -> list[SamplingParams]:
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * num_prompts
    if len(sampling_params) != num_prompts:
        raise InvalidRequestError(
            f"got {len(sampling_params)} SamplingParams for {num_prompts} prompts; pass one, or one per prompt",
            param="sampling_params",
        )
    return list(sampling_params)
