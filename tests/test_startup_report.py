"""Start-up says what the engine chose, in one log record read from the loaded engine."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from engine import model_config
from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.server.logs import JsonFormatter
from engine.startup_report import dtype_reason, log_startup_report, startup_report
from kernels import cpu_linear


@pytest.fixture(scope="module")
def engine(tiny_model_folder):
    return EngineCore(EngineConfig(model=str(tiny_model_folder("llama")), device="cpu", num_kv_blocks=40,
                                   max_model_len=512, served_model_name="tiny"))


def test_report_reads_what_the_engine_chose(engine, tiny_model_folder):
    requested = EngineConfig(model=str(tiny_model_folder("llama")))
    report = startup_report(engine, requested, "http://127.0.0.1:8000")
    assert report.served_model_name == "tiny" and report.architecture == "LlamaForCausalLM"
    assert (report.dtype, report.device) == ("float32", "cpu")
    assert report.dtype_reason == "auto: the checkpoint's float32 on CPU"
    assert (report.max_model_len, report.kv_blocks, report.kv_block_tokens) == (512, 40, 16)
    assert report.kv_cache_gib == pytest.approx(40 * engine.model_runner.bytes_per_block / 2**30)
    assert report.cuda_graph_batch_sizes == () and report.cuda_graph_token_sizes == ()
    text = report.text()
    assert "http://127.0.0.1:8000" in text and "40 blocks x 16 tokens = 640 tokens" in text
    assert "none (eager)" in text


def test_one_json_log_record_carries_every_field(engine, tiny_model_folder, caplog):
    with caplog.at_level(logging.INFO, logger="kubellm.startup"):
        log_startup_report(engine, EngineConfig(model="x", dtype="float32"), "http://0.0.0.0:9000")
    (record,) = caplog.records
    line = json.loads(JsonFormatter().format(record))
    assert line["dtype_reason"] == "set by --dtype"
    assert line["address"] == "http://0.0.0.0:9000" and line["kv_blocks"] == 40
    assert line["message"].startswith("kubellm serving 'tiny' at http://0.0.0.0:9000\n")


def test_dtype_reason_on_a_gpu_names_the_checkpoint_dtype():
    assert dtype_reason("auto", torch.float16, "cuda:0").startswith("auto: the checkpoint's dtype on a GPU (float16")


@pytest.mark.parametrize("checkpoint", [torch.bfloat16, torch.float16])
def test_auto_on_cpu_serves_half_checkpoints_in_bfloat16_only_where_torch_vectorises_it(monkeypatch, checkpoint):
    monkeypatch.setattr(model_config, "fast_cpu_bfloat16", lambda: "torch's AVX2 kernels vectorise the bfloat16 GEMV")
    choice = model_config.auto_dtype_choice(checkpoint, "cpu")
    assert choice.dtype == torch.bfloat16 and "AVX2" in choice.reason
    monkeypatch.setattr(model_config, "fast_cpu_bfloat16", lambda: None)
    choice = model_config.auto_dtype_choice(checkpoint, "cpu")
    assert choice.dtype == torch.float32 and "no vectorised bfloat16" in choice.reason
    assert model_config.auto_dtype_choice(checkpoint, "cuda:0").dtype == checkpoint


def test_fast_cpu_bfloat16_follows_torchs_kernel_build(monkeypatch):
    monkeypatch.setattr(cpu_linear, "native_half_gemm", lambda _: False)
    for capability, fast in (("AVX2", True), ("AVX512", True), ("DEFAULT", False), ("SVE256", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert (cpu_linear.fast_cpu_bfloat16() is not None) == fast, capability
    monkeypatch.setattr(cpu_linear, "native_half_gemm", lambda dtype: dtype == torch.bfloat16)
    assert "natively" in cpu_linear.fast_cpu_bfloat16()


def test_graphs_line_names_both_kinds_and_their_memory(engine, tiny_model_folder):
    import dataclasses

    report = dataclasses.replace(
        startup_report(engine, EngineConfig(model=str(tiny_model_folder("llama"))), None),
        cuda_graph_batch_sizes=(1, 2, 4, 8, 16), cuda_graph_token_sizes=(16, 32, 64, 128),
        cuda_graph_gib=0.25, cuda_graph_capture_s=1.5,
    )
    assert report.graphs_text() == (
        "decode batches 1-16 (5 graphs), mixed steps of 16-128 tokens (4 graphs); 0.25 GiB, captured in 1.5 s"
    )
    assert "CUDA graphs    decode batches" in report.text()
