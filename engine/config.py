"""EngineConfig: every engine knob, validated in one place.

The server CLI, the offline LLM class and the operator's engine args all end
up here. Fields left as None or "auto" are resolved against the model and the
machine by `resolve()`, which the engine calls once the model's config.json
has been read; everything after that reads only resolved values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from engine.errors import ConfigError
from engine.layers.quantization.kv_cache import check_kv_cache_dtype, kv_cache_torch_dtype
from engine.layers.quantization.names import QUANTIZATION_METHODS
from engine.model_config import DTYPES, auto_dtype
from engine.sampling import DEFAULT_MAX_LOGPROBS

DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}

# Token budget per step when the user gives none. Long prompts are chunked to
# fit, so this bounds activation memory rather than the prompt length; 8192 is
# vLLM's default for offline use and keeps decode batches of max_num_seqs whole.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192

# Largest step, in tokens, replayed from a CUDA graph when the user gives no bound.
# Graphs pay where launching a step's kernels one by one takes longer than running
# them: on an H200 that is up to about 2k tokens for a 0.5B model (an 8B step of
# that size is compute-bound and hides its launches). Bigger bounds cost capture
# time and a pool as large as one step's activations at the bound.
DEFAULT_MAX_CUDAGRAPH_CAPTURE_SIZE = 2048


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"  # "auto": see engine.model_config.auto_dtype_choice
    device: str = "auto"  # "auto": cuda when available, else cpu
    block_size: int = 16  # tokens per KV-cache block
    num_kv_blocks: int | None = None  # None: sized from memory (see ModelRunner)
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256  # sequences in one step
    max_num_batched_tokens: int | None = None  # tokens in one step; None: DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    seed: int = 0  # seeds unseeded sampling, so a whole run is reproducible
    tensor_parallel_size: int = 1
    enforce_eager: bool = False  # True: no CUDA graphs
    # Largest step (tokens) replayed from a CUDA graph; None: DEFAULT_MAX_CUDAGRAPH_CAPTURE_SIZE.
    # Never above max_num_batched_tokens; decode graphs also stop at max_num_seqs sequences.
    max_cudagraph_capture_size: int | None = None
    overlap_scheduling: bool = True  # schedule step n+1 while step n runs
    # tensor parallelism on GPUs: small float32/bfloat16 all-reduces through torch's symmetric-memory
    # one-shot kernel instead of NCCL (engine.distributed.small_all_reduce); NCCL where it cannot run
    small_all_reduce: bool = False
    served_model_name: str | None = None  # the name clients use; None: the model path
    tokenizer: str | None = None  # tokenizer folder; None: the model's own (its folder, or its GGUF metadata)
    quantization: str | None = None  # fp8, awq, gptq, compressed-tensors; None: what config.json says
    max_logprobs: int = DEFAULT_MAX_LOGPROBS  # the most (prompt) logprobs a request may ask for; -1: the whole vocabulary
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; "fp8" / "fp8_e4m3": float8_e4m3fn with scales

    def __post_init__(self) -> None:
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        self._validate()

    def _validate(self) -> None:
        def positive(name: str, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

        if not self.model:
            raise ConfigError("model must name a model folder or a GGUF file")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        positive("block_size")
        if self.block_size & (self.block_size - 1) or self.block_size > 256:
            raise ConfigError(f"block_size must be a power of two <= 256, got {self.block_size}")
        positive("num_kv_blocks", optional=True)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        positive("max_num_seqs")
        positive("max_num_batched_tokens", optional=True)
        positive("max_model_len", optional=True)
        positive("max_cudagraph_capture_size", optional=True)
        positive("tensor_parallel_size")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ConfigError(
                f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (or unset), got {self.quantization!r}"
            )
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < -1:
            raise ConfigError(f"max_logprobs must be -1 (the whole vocabulary) or an integer >= 0, got {self.max_logprobs!r}")
        check_kv_cache_dtype(self.kv_cache_dtype)
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            raise ConfigError("dtype is not resolved yet; call EngineConfig.resolve() first")
        return DTYPES[self.dtype]

    @property
    def kv_cache_torch_dtype(self) -> torch.dtype:
        return kv_cache_torch_dtype(self.kv_cache_dtype, self.torch_dtype)

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    def resolve(self, model_max_len: int, checkpoint_dtype: torch.dtype | None) -> EngineConfig:
        """A copy with every 'auto'/None that depends on the model or machine filled in."""
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={self.device!r} but no CUDA GPU is available")
        dtype = self.dtype
        if dtype == "auto":
            by_torch = {v: k for k, v in DTYPES.items()}
            dtype = by_torch[auto_dtype(checkpoint_dtype, device)]
        max_model_len = self.max_model_len or model_max_len
        if max_model_len > model_max_len:
            raise ConfigError(
                f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={model_max_len}"
            )
        max_num_batched_tokens = self.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS
        capture_size = self.max_cudagraph_capture_size or DEFAULT_MAX_CUDAGRAPH_CAPTURE_SIZE
        return dataclasses.replace(
            self,
            device=device,
            dtype=dtype,
            max_model_len=max_model_len,
            max_num_batched_tokens=max_num_batched_tokens,
            max_cudagraph_capture_size=min(capture_size, max_num_batched_tokens),
        )
