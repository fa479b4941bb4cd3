"""`kubellm fetch`: file:// copies, pvc:// checks, and hf:// against a local stand-in for the Hub."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine import fetch
from operator_fixtures.fake_hub import COMMIT, GOOD_TOKEN, FakeHub, Repo, serve

REPO = "tiny-org/tiny-llama"
NEEDED = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "chat_template.jinja"}


def model_files(tmp_path: Path) -> dict[str, bytes]:
    """A small but real model folder's files, plus files an engine does not need."""
    weights = tmp_path / "weights.safetensors"
    rng = np.random.default_rng(0)
    save_file({"embed.weight": rng.standard_normal((64, 256)).astype(np.float32)}, str(weights))
    return {
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 256}).encode(),
        "generation_config.json": b'{"eos_token_id": 2}',
        "model.safetensors": weights.read_bytes(),
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
        "tokenizer_config.json": b'{"model_max_length": 2048}',
        "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
        "pytorch_model.bin": b"pickled weights the engine never loads",
        "README.md": b"# tiny",
    }


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    files = model_files(tmp_path)
    files["original/consolidated.safetensors"] = files["model.safetensors"]  # sub-folders are skipped
    state, shutdown = serve(FakeHub(repos={REPO: Repo(files), "acme/private": Repo(files, private=True)}))
    monkeypatch.setenv("HF_ENDPOINT", state.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    yield state
    shutdown()


def run(source: str, dest: Path, revision: str = "main") -> int:
    return fetch.run_fetch(argparse.Namespace(source=source, revision=revision, dest=dest))


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


# --- hf:// --------------------------------------------------------------------------------------------------------


def test_hub_download_fetches_only_model_files_and_marks_completion(hub, tmp_path):
    dest = tmp_path / "models" / REPO / "main"
    assert run(f"hf://{REPO}", dest) == 0
    assert {p.name for p in dest.iterdir() if not p.name.startswith(".")} == NEEDED
    assert (dest / "model.safetensors").read_bytes() == hub.repos[REPO].files["model.safetensors"]
    marker = json.loads((dest / fetch.MARKER).read_text())
    assert (marker["source"], marker["revision"], marker["commit"]) == (f"hf://{REPO}", "main", COMMIT)
    assert not any("original" in path or "pytorch_model" in path for _, path, _ in hub.requests)

    hub.requests.clear()
    assert run(f"hf://{REPO}", dest) == 0
    assert hub.requests == [], "a completed revision must not touch the network"


def test_hub_download_resumes_a_partial_file_without_refetching_finished_ones(hub, tmp_path, capsys):
    dest = tmp_path / "dest"
    weights = hub.repos[REPO].files["model.safetensors"]
    hub.break_file("model.safetensors")
    assert run(f"hf://{REPO}", dest) == 1
    assert "run the fetch again to resume" in error_line(capsys)
    assert not (dest / fetch.MARKER).exists() and not (dest / "model.safetensors").exists()
    finished = {name for name in NEEDED if hub.downloads(name)} - {"model.safetensors"}
    assert finished, "the files before the broken one were downloaded"

    assert run(f"hf://{REPO}", dest) == 0
    assert hub.downloads("model.safetensors") == [None, f"bytes={len(weights) // 2}-"]
    assert (dest / "model.safetensors").read_bytes() == weights
    for name in finished:
        assert len(hub.downloads(name)) == 1, f"{name} was downloaded again"


def test_corrupt_download_is_rejected_by_its_sha256(hub, tmp_path, capsys):
    dest = tmp_path / "dest"
    dest.mkdir()
    weights = hub.repos[REPO].files["model.safetensors"]
    (dest / "model.safetensors.partial").write_bytes(b"x" * (len(weights) // 2))  # wrong bytes, right length
    assert run(f"hf://{REPO}", dest) == 1
    assert "does not match the Hub's sha256" in error_line(capsys)
    assert run(f"hf://{REPO}", dest) == 0
    assert (dest / "model.safetensors").read_bytes() == weights


def test_private_repo_needs_a_token(hub, tmp_path, capsys, monkeypatch):
    assert run("hf://acme/private", tmp_path / "a") == 1
    message = error_line(capsys)
    assert "401" in message and "hfTokenSecret" in message

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert run("hf://acme/private", tmp_path / "b") == 1
    assert "401" in error_line(capsys)

    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    assert run("hf://acme/private", tmp_path / "c") == 0


def test_unknown_repo_and_revision_are_404(hub, tmp_path, capsys):
    assert run("hf://acme/missing", tmp_path / "a") == 1
    assert "404" in error_line(capsys)
    assert run(f"hf://{REPO}", tmp_path / "b", revision="v9") == 1
    assert "no revision 'v9'" in error_line(capsys)


def test_full_disk_is_reported_before_downloading(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fetch, "free_bytes", lambda path: 1000)
    assert run(f"hf://{REPO}", tmp_path / "dest") == 1
    message = error_line(capsys)
    assert "not enough space" in message and "spec.cache.size" in message
    assert not any(method == "GET" and "/resolve/" in path for method, path, _ in hub.requests)


# --- file:// and pvc:// -----------------------------------------------------------------------------------------------


def test_file_source_copies_model_files_and_reruns_are_free(tmp_path, monkeypatch):
    source = write_folder(tmp_path / "src", model_files(tmp_path))
    dest = tmp_path / "dest"
    assert run(f"file://{source}", dest) == 0
    assert {p.name for p in dest.iterdir() if p.name != fetch.MARKER} == NEEDED

    monkeypatch.setattr(fetch, "copy_file", lambda *args: pytest.fail("copied again"))
    assert run(f"file://{source}", dest) == 0


def test_file_copy_resumes_and_skips_finished_files(tmp_path, monkeypatch):
    source = write_folder(tmp_path / "src", model_files(tmp_path))
    dest = tmp_path / "dest"
    assert run(f"file://{source}", dest) == 0
    (dest / fetch.MARKER).unlink()
    (dest / "model.safetensors").unlink()
    (dest / "model.safetensors.partial").write_bytes(b"half")  # an interrupted copy
    copied = []
    original = fetch.copy_file
    monkeypatch.setattr(fetch, "copy_file", lambda src, dst, advance: (copied.append(src.name), original(src, dst, advance)))
    assert run(f"file://{source}", dest) == 0
    assert copied == ["model.safetensors"]
    assert (dest / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()


def test_file_source_in_place_is_verified(tmp_path, capsys):
    source = write_folder(tmp_path / "src", model_files(tmp_path))
    assert run(f"file://{source}", source) == 0
    assert not (source / fetch.MARKER).exists(), "a folder verified in place is not written to"
    (source / "config.json").unlink()
    assert run(f"file://{source}", source) == 1
    assert "config.json is missing" in error_line(capsys)


def test_file_copy_reports_a_full_disk(tmp_path, capsys, monkeypatch):
    source = write_folder(tmp_path / "src", model_files(tmp_path))
    monkeypatch.setattr(fetch, "free_bytes", lambda path: 10)
    assert run(f"file://{source}", tmp_path / "dest") == 1
    assert "not enough space" in error_line(capsys)


def test_pvc_source_verifies_shards_in_place(tmp_path, capsys):
    files = model_files(tmp_path)
    files["model.safetensors.index.json"] = json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}).encode()
    files["model-00001-of-00002.safetensors"] = files.pop("model.safetensors")
    folder = write_folder(tmp_path / "claim" / "llama", files)
    assert run("pvc://claim/llama", folder) == 1
    assert "model-00002-of-00002.safetensors is missing" in error_line(capsys)
    (folder / "model-00002-of-00002.safetensors").write_bytes(files["model-00001-of-00002.safetensors"])
    assert run("pvc://claim/llama", folder) == 0
    assert not (folder / fetch.MARKER).exists(), "pvc:// folders are read-only: verified, never written"


@pytest.mark.parametrize("files,fragment", [
    ({"config.json": b"{not json"}, "config.json: not valid JSON"),
    ({"config.json": b"{}", "tokenizer.json": b"{}"}, "no *.safetensors weights"),
    ({"config.json": b"{}", "model.safetensors": b""}, "no tokenizer"),
])
def test_incomplete_folders_name_what_is_missing(tmp_path, capsys, files, fragment):
    folder = write_folder(tmp_path / "m", files)
    assert run(f"file://{folder}", folder) == 1
    assert fragment in error_line(capsys)


def test_command_line_entry_point_without_torch(tmp_path):
    """`python -m engine.fetch` prints one line on error and never imports torch (slim Job images)."""
    code = ("import sys, runpy; sys.argv = ['fetch', 'hf://acme/model', '--dest', sys.argv[1]]\n"
            "try:\n    runpy.run_module('engine.fetch', run_name='__main__')\n"
            "finally:\n    assert 'torch' not in sys.modules, 'torch was imported'")
    # Not from the repo root: its operator/ folder would shadow the standard library's `operator`.
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d")], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60, env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("kubellm fetch: error: network error while fetching hf://acme/model")
    assert result.stderr.count("\n") == 1, result.stderr


def test_kubellm_cli_runs_fetch(tmp_path, capsys):
    """The `kubellm fetch` subcommand (engine/cli.py) is wired to this module's arguments and exit codes."""
    from engine import cli

    source = write_folder(tmp_path / "src", model_files(tmp_path))
    assert cli.main(["fetch", f"file://{source}", "--dest", str(tmp_path / "dest")]) == 0
    assert (tmp_path / "dest" / fetch.MARKER).is_file()
    assert cli.main(["fetch", f"file://{tmp_path / 'nowhere'}", "--dest", str(tmp_path / "d2")]) == 1
    assert error_line(capsys).endswith("nowhere: no such folder")
