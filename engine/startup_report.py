"""One start-up log record saying what the server chose: model, dtype and why, context, cache, graphs, address.

Read from a loaded EngineCore and the settings the user asked for, so the
record states what happened rather than what was requested.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.model_config import auto_dtype_choice

logger = logging.getLogger("kubellm.startup")


@dataclass(frozen=True)
class StartupReport:
    model: str
    served_model_name: str
    architecture: str
    dtype: str
    dtype_reason: str
    device: str
    max_model_len: int
    kv_blocks: int
    kv_block_tokens: int
    kv_cache_gib: float
    kv_cache_dtype: str  # the cache's element type: the model's dtype, or float8_e4m3fn (--kv-cache-dtype fp8)
    cuda_graph_batch_sizes: tuple[int, ...]  # decode steps: padded batch sizes
    cuda_graph_token_sizes: tuple[int, ...]  # steps with prompt tokens: padded token counts
    cuda_graph_gib: float  # device memory the capture took (pool, static buffers)
    cuda_graph_capture_s: float
    address: str | None  # None: the core runs without an HTTP server in front (offline)

    def graphs_text(self) -> str:
        if not self.cuda_graph_batch_sizes and not self.cuda_graph_token_sizes:
            return "none (eager)"
        parts = [f"decode batches {_size_range(self.cuda_graph_batch_sizes)}"]
        if self.cuda_graph_token_sizes:
            parts.append(f"mixed steps of {_size_range(self.cuda_graph_token_sizes, ' tokens')}")
        return (f"{', '.join(parts)}; {self.cuda_graph_gib:.2f} GiB, "
                f"captured in {self.cuda_graph_capture_s:.1f} s")

    def text(self) -> str:
        graphs = self.graphs_text()
        return "\n".join([
            f"kubellm serving {self.served_model_name!r} at {self.address or 'no address (offline)'}",
            f"  model          {self.model} ({self.architecture})",
            f"  dtype          {self.dtype} on {self.device} ({self.dtype_reason})",
            f"  max_model_len  {self.max_model_len} tokens",
            f"  KV cache       {self.kv_blocks} blocks x {self.kv_block_tokens} tokens = "
            f"{self.kv_blocks * self.kv_block_tokens} tokens, {self.kv_cache_gib:.2f} GiB, {self.kv_cache_dtype}",
            f"  CUDA graphs    {graphs}",
        ])


def _size_range(sizes: tuple[int, ...], unit: str = "") -> str:
    if len(sizes) == 1:
        return f"{sizes[0]}{unit} (1 graph)"
    return f"{sizes[0]}-{sizes[-1]}{unit} ({len(sizes)} graphs)"


def dtype_reason(requested: str, checkpoint_dtype: torch.dtype, device: str) -> str:
    """Why the serving dtype is what it is."""
    if requested != "auto":
        return "set by --dtype"
    return f"auto: {auto_dtype_choice(checkpoint_dtype, device).reason}"


def log_startup_report(engine: EngineCore, requested: EngineConfig, address: str | None) -> None:
    """The report as one log record: readable text, and each field as a key of the JSON line."""
    report = startup_report(engine, requested, address)
    logger.info(report.text(), extra=dataclasses.asdict(report))


def startup_report(engine: EngineCore, requested: EngineConfig, address: str | None) -> StartupReport:
    config, runner = engine.config, engine.model_runner
    graphs = runner.cuda_graphs
    batch_sizes, token_sizes = graphs.sizes() if graphs else ((), ())
    return StartupReport(
        model=config.model,
        served_model_name=config.name,
        architecture=engine.model_config.architecture,
        dtype=config.dtype,
        dtype_reason=dtype_reason(requested.dtype, engine.model_config.dtype, config.device),
        device=config.device,
        max_model_len=config.max_model_len,
        kv_blocks=runner.num_kv_blocks,
        kv_block_tokens=config.block_size,
        kv_cache_gib=runner.num_kv_blocks * runner.bytes_per_block / 2**30,
        kv_cache_dtype=str(config.kv_cache_torch_dtype).removeprefix("torch."),
        cuda_graph_batch_sizes=batch_sizes,
        cuda_graph_token_sizes=token_sizes,
        cuda_graph_gib=graphs.memory_bytes / 2**30 if graphs else 0.0,
        cuda_graph_capture_s=graphs.capture_seconds if graphs else 0.0,
        address=address,
    )
