"""The benchmark scripts run end to end on the tiny model with tiny workloads, so they cannot rot.

They measure nothing here (CPU, a 2-layer model); the numbers are checked only for shape.
The hf-cb baseline is left out: transformers' continuous batching spends ~25 s
sizing its cache on CPU, over this file's budget; it runs in every GPU benchmark.
"""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import kernel_trace, latency, perplexity, routing, serving, structured_output, throughput
from engine.testing import default_model_path


def run_main(module, monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    module.main()


@pytest.mark.parametrize("system", ["kubellm", "hf-static"])
def test_throughput_system_runs(system, tmp_path, monkeypatch):
    result_file = tmp_path / "result.json"
    run_main(throughput, monkeypatch, "--model", "tiny", "--model-root", str(tmp_path), "--dtype", "float32",
             "--workload", "mixed", "--num-requests", "3", "--baseline-requests", "2", "--static-batch", "2",
             "--length-scale", "0.01", "--max-num-seqs", "4", "--max-model-len", "64",
             "--system", system, "--result-file", str(result_file))
    result = json.loads(result_file.read_text())
    assert result["system"] == system
    assert result["requests"] == (3 if system == "kubellm" else 2)
    assert result["output_tokens"] > 0 and result["output_tok_s"] > 0
    if system == "kubellm":  # on CPU every step runs eagerly
        assert result["steps"]["eager"] > 0 and result["steps"]["mixed_graph"] == 0


def test_latency_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "latency.json"
    run_main(latency, monkeypatch, "--model", "tiny", "--model-root", str(tmp_path), "--dtype", "float32",
             "--batches", "1,2", "--prompt-len", "4", "--new-tokens", "3", "--ttft-lens", "16", "--out", str(out))
    result = json.loads(out.read_text())
    assert [row["batch"] for row in result["decode"]] == [1, 2]
    assert all(row["decode_steps"] >= 1 for row in result["decode"])
    assert result["ttft"][0]["prompt_len"] == 16 and result["ttft"][0]["eager_steps"] >= 1
    assert "decode latency" in capsys.readouterr().out


def test_kernel_trace_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "trace.json"
    run_main(kernel_trace, monkeypatch, "--model", "tiny", "--model-root", str(tmp_path), "--dtype", "float32",
             "--batch", "2", "--steps", "3", "--warmup-steps", "1", "--prompt-len", "8", "--new-tokens", "4",
             "--prefill-tokens", "32", "--trace-dir", str(tmp_path / "traces"), "--out", str(out))
    result = json.loads(out.read_text())
    decode, prefill = result["decode"], result["prefill"]
    assert decode["batch"] == 2 and decode["steps"] == 3 and prefill["steps"] == 1
    for summary in (decode, prefill):  # on CPU: the ops of the steps
        assert summary["source"] == "cpu ops" and 0 < summary["kernel_us"] <= summary["wall_us"]
        families = {row["name"] for row in summary["families"]}
        assert {"GEMM", "attention", "norm", "cache write", "sampler"} <= families
        assert sum(row["us_per_step"] for row in summary["families"]) == pytest.approx(summary["kernel_us"])
    assert decode["latency_ms_per_step"] > 0 and prefill["forward_passes"]["eager"] == 1
    assert len(list((tmp_path / "traces").glob("*.json.gz"))) == 2
    assert "| family | launches/step |" in capsys.readouterr().out


def test_serving_runs_against_a_real_server(tmp_path, monkeypatch):
    out = tmp_path / "serving.json"
    run_main(serving, monkeypatch, "--model", "tiny", "--model-root", str(tmp_path), "--rates", "8",
             "--num-requests", "3", "--length-scale", "0.02", "--server-args", "--dtype float32 --max-model-len 128",
             "--out", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert row["requests"] == 3 and row["errors"] == 0
    assert row["output_tok_s"] > 0 and row["ttft_p50_ms"] > 0


def test_structured_output_runs(tmp_path, monkeypatch):
    out = tmp_path / "so.json"
    run_main(structured_output, monkeypatch, "--tokenizer", str(default_model_path()), "--batch", "4",
             "--steps", "20", "--device", "cpu", "--out", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert row["batch"] == 4 and row["steps"] == 20 and row["fill_ms_median"] > 0


@pytest.mark.slow  # four `kubellm serve` starts
def test_routing_runs_both_policies_against_two_real_replicas(tmp_path, monkeypatch):
    out = tmp_path / "routing.json"
    run_main(routing, monkeypatch, "--model", "tiny", "--model-root", str(tmp_path), "--num-requests", "6",
             "--rate", "20", "--systems", "2", "--system-len", "32", "--output-len", "2", "--out", str(out))
    rows = {row["policy"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"picker", "random"}
    for row in rows.values():
        assert row["requests"] == 6 and row["errors"] == 0 and row["ttft_p50_ms"] > 0
        assert 0 <= row["prefix_hit_rate"] <= 1 and sum(map(int, row["routed"].split("/"))) == 6


def test_perplexity_measures_what_transformers_does(tiny_model_folder, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from engine.config import EngineConfig
    from engine.engine_core import EngineCore

    folder = tiny_model_folder("llama")
    tokens = torch.randint(3, 500, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    core = EngineCore(EngineConfig(model=str(folder), device="cpu", dtype="float32", num_kv_blocks=8,
                                   max_model_len=128, max_num_batched_tokens=16))
    ours, count = perplexity.window_nll(core, tokens, chunk=16)  # five chunks, four read earlier ones back
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0]
    theirs = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(tokens[1:]), reduction="sum")
    assert count == 69 and ours == pytest.approx(float(theirs), rel=1e-5)

    out = tmp_path / "perplexity.json"
    run_main(perplexity, monkeypatch, "--model", str(folder), "--device", "cpu", "--window", "48", "--chunk", "16",
             "--max-tokens", "100", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [row["tokens"] for row in rows] == [97] * 4  # windows of 48, 48 and 4 tokens and rows[0]["vs_dense_%"] == 0
    assert all(1 < row["perplexity"] < 1e4 for row in rows)
