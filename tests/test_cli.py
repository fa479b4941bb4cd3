"""`kubellm`: every flag documented, flags mapped to EngineConfig, bad values -> exit 2 with one line."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import build_parser, engine_config_from_args, main, resolve_api_key, resolve_model
from engine.config import EngineConfig
from engine.server.app import kubellm_version

SERVE_FLAGS = [
    "--host", "--port", "--served-model-name", "--api-key", "--api-key-file", "--dtype", "--device",
    "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--block-size", "--gpu-memory-utilization",
    "--enable-prefix-caching", "--no-enable-prefix-caching", "--max-pending-requests", "--shutdown-timeout",
    "--log-level", "--tensor-parallel-size", "--enforce-eager", "--num-kv-blocks", "--seed", "--quantization",
    "--max-cudagraph-capture-size",
]


def serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_serve_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    for flag in SERVE_FLAGS:
        assert flag in help_text, flag
    serve_parser = build_parser()._subparsers._group_actions[0].choices["serve"]
    assert all(action.help for action in serve_parser._actions), "every argument has a help text"


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"kubellm {kubellm_version()}"


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("kubellm")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("kubellm ")


def test_defaults_are_engine_config_defaults(tmp_path):
    args = serve_args(str(tmp_path))
    assert (args.host, args.port, args.api_key, args.max_pending_requests) == ("127.0.0.1", 8000, None, None)
    config = engine_config_from_args(args, str(tmp_path), "name")
    assert config == EngineConfig(model=str(tmp_path), served_model_name="name")


def test_every_engine_flag_reaches_engine_config(tmp_path):
    args = serve_args(
        str(tmp_path), "--dtype", "bf16", "--device", "cpu", "--max-model-len", "1024", "--max-num-seqs", "7",
        "--max-num-batched-tokens", "512", "--block-size", "32", "--num-kv-blocks", "99",
        "--gpu-memory-utilization", "0.5", "--no-enable-prefix-caching", "--tensor-parallel-size", "2",
        "--enforce-eager", "--seed", "5", "--quantization", "fp8", "--max-cudagraph-capture-size", "256",
        "--kv-cache-dtype", "fp8",
    )
    config = engine_config_from_args(args, str(tmp_path), "served")
    assert dataclasses.asdict(config) == dataclasses.asdict(EngineConfig(
        model=str(tmp_path), dtype="bfloat16", device="cpu", max_model_len=1024, max_num_seqs=7,
        max_num_batched_tokens=512, block_size=32, num_kv_blocks=99, gpu_memory_utilization=0.5,
        enable_prefix_caching=False, tensor_parallel_size=2, enforce_eager=True, seed=5, served_model_name="served",
        quantization="fp8", max_cudagraph_capture_size=256, kv_cache_dtype="fp8",
    ))
    assert serve_args("--enable-prefix-caching").enable_prefix_caching is True


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--port", "abc"], "--port"),
        (["--port", "70000"], "--port"),
        (["--log-level", "loud"], "--log-level"),
        (["--dtype", "int3"], "--dtype"),
        (["--quantization", "bitsandbytes"], "--quantization"),
        (["--kv-cache-dtype", "fp8_e5m2"], "--kv-cache-dtype"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
        (["--max-pending-requests", "0"], "--max-pending-requests"),
        (["--max-num-seqs", "many"], "--max-num-seqs"),
        (["--no-such-flag"], "unrecognized"),
        (["MODEL", "--block-size", "3"], "block_size"),
        (["MODEL", "--max-num-seqs", "0"], "max_num_seqs"),
        (["MODEL", "--gpu-memory-utilization", "1.5"], "gpu_memory_utilization"),
        (["MODEL", "--tensor-parallel-size", "0"], "tensor_parallel_size"),
        (["MODEL", "--max-cudagraph-capture-size", "0"], "max_cudagraph_capture_size"),
        (["MODEL", "--device", "tpu"], "device"),
        (["MODEL", "--api-key-file", "/nonexistent/key"], "--api-key-file"),
        (["/nonexistent/model"], "does not exist"),
        (["MODEL", "--generation-config", "/nonexistent"], "--generation-config"),
        (["--tool-call-parser", "nope"], "--tool-call-parser"),
        (["MODEL", "--enable-auto-tool-choice"], "--tool-call-parser"),
    ],
)
def test_bad_values_exit_2_with_one_line(tmp_path, capsys, argv, fragment):
    argv = [str(tmp_path) if a == "MODEL" else a for a in argv]
    with pytest.raises(SystemExit) as exited:
        sys.exit(main(["serve", *argv]))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.match(r"kubellm( serve)?: error: ", err) and fragment in err


def test_api_key_sources_in_order(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("KUBELLM_API_KEY", "from-env")
    assert resolve_api_key(serve_args("--api-key", "flag", "--api-key-file", str(key_file))) == "flag"
    assert resolve_api_key(serve_args("--api-key-file", str(key_file))) == "from-file"
    assert resolve_api_key(serve_args()) == "from-env"
    monkeypatch.delenv("KUBELLM_API_KEY")
    assert resolve_api_key(serve_args()) is None


def test_no_model_means_the_built_in_model(tmp_path):
    from engine.builtin_model import BUILTIN_MODEL_NAME, builtin_model_path

    assert resolve_model(serve_args()) == (str(builtin_model_path()), BUILTIN_MODEL_NAME)
    assert builtin_model_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"")
    assert resolve_model(serve_args(str(gguf_file))) == (str(gguf_file), str(gguf_file))
    assert resolve_model(serve_args(str(tmp_path))) == (str(tmp_path), str(tmp_path))
    assert resolve_model(serve_args(str(tmp_path), "--served-model-name", "x")) == (str(tmp_path), "x")


def test_fetch_is_a_registered_subcommand(tmp_path):
    args = build_parser().parse_args(["fetch", f"file://{tmp_path}", "--dest", str(tmp_path / "out")])
    assert args.command == "fetch" and args.source == f"file://{tmp_path}"


def test_a_model_folder_that_fails_to_load_exits_1_with_the_reason(tmp_path):
    script = Path(sys.executable).with_name("kubellm")
    result = subprocess.run([str(script), "serve", str(tmp_path), "--port", "0"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "config.json is missing" in result.stderr
